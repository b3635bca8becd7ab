"""Study reports: the report built from a fabricated study directory (resumed metrics, an incomplete run,
unequal data fingerprints), and study.json that cannot be read."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_moe.study.plan import plan_study
from megatron_moe.study.report import build_results, render_markdown, tables, write_report
from megatron_moe.study.rundir import load_manifest, manifest
from megatron_moe.study.spec import load_study
from megatron_moe.config import ConfigError
from megatron_moe.files import atomic_write_json
from tests.conftest import cli
from tests.study.test_study import MINI


# ---------------------------------------------------------------- a fabricated study directory

# Validation loss at steps 2 and 4 of every run. moe seed 3 is best at step 2 (the best is the minimum, not the
# last evaluation); dense_total seed 3 never finished.
CURVES = {
    ("dense_active", 1): [1.80, 1.70], ("dense_active", 2): [1.75, 1.65], ("dense_active", 3): [1.72, 1.62],
    ("moe", 1): [1.70, 1.60], ("moe", 2): [1.68, 1.60], ("moe", 3): [1.56, 1.57],
    ("dense_total", 1): [1.60, 1.50], ("dense_total", 2): [1.62, 1.52], ("dense_total", 3): [1.61],
}


def _fake_study(tmp_path: Path, fingerprints: dict[str, str] | None = None) -> Path:
    """study.json from the real planner/manifest, and run directories as the trainer writes them."""
    spec = tmp_path / "mini.toml"
    spec.write_text(MINI)
    cfg = load_study(spec, ["study.arms=['dense_active', 'moe', 'dense_total']", "study.seeds=[1, 2, 3]"])
    plan = plan_study(cfg, tmp_path / "study")
    fingerprints = fingerprints or {}
    data = {a.name: {"source": "synthetic", "unique_tokens": 34618, "consumed_tokens": 1024, "epochs": 1024 / 34618,
                     "fingerprint": fingerprints.get(a.name, "f00d")} for a in plan.arms}
    atomic_write_json(plan.out_dir / "study.json", manifest(plan, str(spec), data))
    for run in plan.runs:
        curve = CURVES[(run.arm, run.seed)]
        rows = []
        for i, val in enumerate(curve):
            step = 2 * (i + 1)
            rows += [{"kind": "train", "step": step - 1, "loss": val + 0.2}, {"kind": "train", "step": step, "loss": val + 0.1},
                     {"kind": "eval", "step": step, "val_loss": val, "val_bpb": val / math.log(2)}]
        if (run.arm, run.seed) == ("dense_total", 1):
            # resumed from a step-2 checkpoint: the first attempt's step-4 rows are logged again by the second
            rows[3:3] = [{"kind": "train", "step": 3, "loss": 9.0}, {"kind": "eval", "step": 4, "val_loss": 1.45}]
        run.dir.mkdir(parents=True)
        (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
        if len(curve) == 2:
            best = min(curve)
            atomic_write_json(run.dir / "result.json", {
                "steps": 4, "final_train_loss": curve[-1] + 0.1, "best_val_loss": best,
                "best_val_step": 2 * (curve.index(best) + 1), "train_time_s": 1.0, "tokens_per_step": 256,
                "data": {**data[run.arm], "fingerprint": fingerprints.get(run.arm, "f00d")},
            })
    return plan.out_dir


def test_results_from_run_directories(tmp_path):
    study_dir = _fake_study(tmp_path)
    res = build_results(study_dir)
    arms = {a["arm"]: a for a in res["arms"]}
    assert arms["moe"]["best_val_loss"]["per_seed"] == {"1": 1.60, "2": 1.60, "3": 1.56}
    assert arms["moe"]["best_val_bpb"]["mean"] == pytest.approx((1.60 + 1.60 + 1.56) / 3 / math.log(2), abs=1e-12)
    # the resumed run's stale step-4 eval (1.45) is replaced by the row logged after the resume (1.50)
    assert arms["dense_total"]["best_val_loss"]["per_seed"] == {"1": 1.50, "2": 1.52}
    assert arms["dense_total"]["missing_seeds"] == [3] and arms["dense_total"]["best_val_loss"]["n"] == 2
    st = arms["dense_active"]["best_val_loss"]
    assert st["mean"] == pytest.approx((1.70 + 1.65 + 1.62) / 3, abs=1e-12)
    assert st["std"] == pytest.approx(math.sqrt(((1.70 - 1.6566667) ** 2 + (1.65 - 1.6566667) ** 2
                                                 + (1.62 - 1.6566667) ** 2) / 2), abs=1e-7)
    gaps = {g["name"]: g for g in res["gaps"]}
    active = gaps["matched-active"]
    assert (active["baseline"], active["moe"], active["n"]) == ("dense_active", "moe", 3)
    assert active["mean"] == pytest.approx(0.07, abs=1e-12) and active["std"] == pytest.approx(math.sqrt(0.0007), abs=1e-12)
    assert active["ci"] == pytest.approx([0.07 - 0.0657243, 0.07 + 0.0657243], abs=1e-6)
    # over training: step 2 gaps .10 .07 .16 (mean .11), step 4 gaps .10 .05 .05 (mean .0666667)
    over = {p["step"]: p for p in active["over_training"]}
    assert over[2]["mean"] == pytest.approx(0.11, abs=1e-12) and over[4]["mean"] == pytest.approx(0.2 / 3, abs=1e-12)
    assert over[4]["tokens"] == 4 * 256
    total = gaps["matched-total"]  # dense_total - moe over seeds 1, 2: -0.10, -0.08
    assert total["per_seed"] == pytest.approx({"1": -0.10, "2": -0.08}, abs=1e-12) and total["n"] == 2
    assert total["mean"] == pytest.approx(-0.09, abs=1e-12) and total["std"] == pytest.approx(math.sqrt(2) / 100, abs=1e-12)
    assert total["ci"][1] - total["mean"] == pytest.approx(12.7062047 * 0.01, abs=1e-7)  # t(.975, 1) x std / sqrt(2)
    # contract: the planner's numbers from study.json, tokens and fingerprints from result.json
    contract = {c["arm"]: c for c in res["contract"]}
    man = json.loads((study_dir / "study.json").read_text())
    for a in man["arms"]:
        c = contract[a["name"]]
        assert (c["total_params"], c["active_params"], c["flops_train_per_token"]) == (
            a["total_params"], a["active_params"], a["flops_train_per_token"])
        assert c["residual_pct"] == (a["match"] or {}).get("residual_pct")
        assert c["fingerprint"] == "f00d" and c["consumed_tokens"] == 1024
    assert contract["dense_active"]["changed_fields"] == list(man["arms"][0]["changed_fields"])
    assert res["data_fingerprints_equal"] is True
    assert len(res["warnings"]) == 1 and "dense_total seed 3" in res["warnings"][0]


def test_confidence_level_is_labelled_exactly(tmp_path):
    res = build_results(_fake_study(tmp_path), confidence=0.975)
    headers = [h for _, _, header, _ in tables(res) for h in header]
    assert "97.5% CI" in headers and "98% CI" not in headers


def test_unequal_data_is_flagged_loudly(tmp_path):
    study_dir = _fake_study(tmp_path, fingerprints={"moe": "beef"})
    paths = write_report(study_dir)
    res = json.loads(paths["results.json"].read_text())
    assert res["data_fingerprints_equal"] is False
    assert res["warnings"][0].startswith("DATA DIFFERS ACROSS ARMS") and "beef" in res["warnings"][0]
    md, page = paths["report.md"].read_text(), paths["report.html"].read_text()
    assert "> **WARNING:** DATA DIFFERS ACROSS ARMS" in md and "**NOT EQUAL ACROSS ARMS**" in md
    assert "<p class='warn'>WARNING: DATA DIFFERS ACROSS ARMS" in page


def test_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    study_dir = _fake_study(tmp_path)
    out = tmp_path / "elsewhere"
    paths = write_report(study_dir, out)
    assert {p.name for p in paths.values()} == {"loss_curves.png", "gaps.png", "best_val_loss.png", "results.json",
                                                 "report.md", "report.html"}
    md = paths["report.md"].read_text()
    for png in ("loss_curves", "gaps", "best_val_loss"):
        assert f"](plots/{png}.png)" in md and (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| matched-active | dense_active | moe | 3 | 0.0700 ± 0.0265 | [0.0043, 0.1357] |" in md
    page = paths["report.html"].read_text()
    assert page.count("src='data:image/png;base64,") == 3 and "plots/" not in page  # self-contained
    assert not list(out.glob("**/*.tmp"))
    results = json.loads(paths["results.json"].read_text())
    assert results["gaps"][0]["mean"] == pytest.approx(0.07)
    assert "(no plots" in render_markdown(results, [])


def test_report_of_a_non_study_directory_fails_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not a study directory") as exc:
        build_results(tmp_path)
    assert "\n" not in str(exc.value)
    proc = cli("study", "report", str(tmp_path), check=False)
    assert proc.returncode == 2 and "is not a study directory" in proc.stderr


@pytest.mark.parametrize("text, message", [
    ('{"name": "mini", "runs": [', "is not a readable study.json (Expecting value"),
    ("[1, 2]", "is not a valid study.json: expected a JSON object, found list"),
    ("null", "is not a valid study.json: expected a JSON object, found NoneType"),
    ('{"name": "mini"}', "is not a valid study.json: no 'arms'"),
])
def test_corrupt_study_json_fails_with_one_line(tmp_path, text, message):
    (tmp_path / "study.json").write_text(text)
    for read in (load_manifest, build_results):
        with pytest.raises(ConfigError) as exc:
            read(tmp_path)
        assert str(exc.value).startswith(f"{tmp_path / 'study.json'} ") and message in str(exc.value)
        assert "\n" not in str(exc.value)


def test_study_json_naming_unknown_arms_is_refused(tmp_path):
    study_dir = _fake_study(tmp_path)
    assert load_manifest(study_dir).name == "mini"
    man = json.loads((study_dir / "study.json").read_text())
    atomic_write_json(study_dir / "study.json", {**man, "arms": man["arms"][1:]})  # dense_active's runs dangle
    with pytest.raises(ConfigError, match=r"study.json is not a valid study.json: pair matched-active names arm "
                                          r"'dense_active', which is not in 'arms'") as exc:
        build_results(study_dir)
    assert "\n" not in str(exc.value)


def test_report_before_any_run_is_complete(tmp_path):
    study_dir = _fake_study(tmp_path)
    for path in study_dir.glob("runs/*/result.json"):
        path.unlink()
    man = json.loads((study_dir / "study.json").read_text())
    atomic_write_json(study_dir / "study.json", {**man, "data": None})  # as `study launch` without a data check
    res = build_results(study_dir)
    assert res["data_fingerprints_equal"] is None and all(a["best_val_loss"]["n"] == 0 for a in res["arms"])
    assert [w for w in res["warnings"] if "DATA" in w] == [] and "9 of 9 runs are not complete" in res["warnings"][0]
    assert "unknown (no run complete)" in render_markdown(res, [])


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind
