"""Study reports: the report built from a fabricated study directory (resumed metrics, an incomplete run,
unequal data fingerprints), and study.json that cannot be read."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from megatron_moe import directories
from megatron_moe.config import ConfigError
from megatron_moe.files import atomic_write_json
from megatron_moe.study.design import design_study
from megatron_moe.study.records import STUDY_RECORD_VERSION, load_results, load_study_record
from megatron_moe.study.report import build_results, render_html, render_markdown, tables, write_report
from megatron_moe.study.spec import load_study
from megatron_moe.study.studydir import write_study_files
from megatron_moe.train.result import RunResult, write_result
from tests.conftest import cli, write_study
from tests.study.test_study import MINI


# ---------------------------------------------------------------- a fabricated study directory

# Validation loss at steps 2 and 4 of every run. moe seed 3 is best at step 2 (the best is the minimum, not the
# last evaluation); dense_total seed 3 never finished.
CURVES = {
    ("dense_active", 1): [1.80, 1.70], ("dense_active", 2): [1.75, 1.65], ("dense_active", 3): [1.72, 1.62],
    ("moe", 1): [1.70, 1.60], ("moe", 2): [1.68, 1.60], ("moe", 3): [1.56, 1.57],
    ("dense_total", 1): [1.60, 1.50], ("dense_total", 2): [1.62, 1.52], ("dense_total", 3): [1.61],
}


def _fake_study(tmp_path: Path, fingerprints: dict[tuple[str, int], str] | None = None,
                curves: dict[tuple[str, int], list[float]] | None = None) -> Path:
    """study.json from the real planner and study record, and run directories as the trainer writes them. Each seed has
    its own data order (fingerprint f00d<seed>), shared by its arms unless `fingerprints` says otherwise."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "mini.toml"
    write_study(spec, MINI)
    cfg = load_study(spec, ["study.arms=['dense_active', 'moe', 'dense_total']", "study.seeds=[1, 2, 3]"])
    design = design_study(cfg, tmp_path / "study")
    fingerprints, curves = fingerprints or {}, curves or CURVES

    def described(arm: str, seed: int) -> dict:
        return {"source": "synthetic", "unique_tokens": 34618, "consumed_tokens": 1024, "epochs": 1024 / 34618,
                "fingerprint": fingerprints.get((arm, seed), f"f00d{seed}"), "data_seed": 1234 + seed}

    data = {str(seed): {a.name: described(a.name, seed) for a in design.arms} for seed in cfg.study.seeds}
    write_study_files(design, str(spec), data)
    for run in design.runs:
        curve = curves[(run.arm, run.seed)]
        rows = []
        for i, val in enumerate(curve):
            step = 2 * (i + 1)
            load = {"layer_imbalance": [1.0 + val / 10, 1.0 + val / 20]} if run.arm == "moe" else {}
            rows += [{"kind": "train", "step": step - 1, "loss": val + 0.2, **load},
                     {"kind": "train", "step": step, "loss": val + 0.1, **load},
                     {"kind": "eval", "step": step, "val_loss": val, "val_bpb": val / math.log(2)}]
        if (run.arm, run.seed) == ("dense_total", 1):
            # resumed from a step-2 checkpoint: the first attempt's step-4 rows are logged again by the second
            rows[3:3] = [{"kind": "train", "step": 3, "loss": 9.0}, {"kind": "eval", "step": 4, "val_loss": 1.45}]
        run.dir.mkdir(parents=True)
        (run.dir / directories.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
        if len(curve) == 2:
            best = min(curve)
            write_result(run.dir, RunResult(
                steps=4, final_train_loss=curve[-1] + 0.1, best_val_loss=best, best_val_step=2 * (curve.index(best) + 1),
                train_time_s=1.0, tokens_per_step=256, data=described(run.arm, run.seed)))
    return design.out_dir


def test_results_from_run_directories(tmp_path):
    study_dir = _fake_study(tmp_path)
    res = build_results(study_dir)
    arms = {a["arm"]: a for a in res.arms}
    assert arms["moe"]["best_val_loss"]["per_seed"] == {"1": 1.60, "2": 1.60, "3": 1.56}
    assert arms["moe"]["best_val_bpb"]["mean"] == pytest.approx((1.60 + 1.60 + 1.56) / 3 / math.log(2), abs=1e-12)
    # the resumed run's stale step-4 eval (1.45) is replaced by the row logged after the resume (1.50)
    assert arms["dense_total"]["best_val_loss"]["per_seed"] == {"1": 1.50, "2": 1.52}
    assert arms["dense_total"]["missing_seeds"] == [3] and arms["dense_total"]["best_val_loss"]["n"] == 2
    st = arms["dense_active"]["best_val_loss"]
    assert st["mean"] == pytest.approx((1.70 + 1.65 + 1.62) / 3, abs=1e-12)
    assert st["std"] == pytest.approx(math.sqrt(((1.70 - 1.6566667) ** 2 + (1.65 - 1.6566667) ** 2
                                                 + (1.62 - 1.6566667) ** 2) / 2), abs=1e-7)
    gaps = {g["name"]: g for g in res.gaps}
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
    assert total["ci"] == [None, None]  # two seeds: too few for an interval (t(.975, 1) = 12.7 would say nothing)
    ((_, _, _, gap_rows),) = [t for t in tables(res) if t[0].startswith("Paired gaps")]
    assert gap_rows[1][5] == "too few seeds for an interval"
    # contract: the planner's numbers from study.json, tokens and fingerprints from result.json
    contract = {c["arm"]: c for c in res.contract}
    raw = json.loads((study_dir / directories.STUDY_JSON).read_text())
    for a in raw["arms"]:
        c = contract[a["name"]]
        assert (c["total_params"], c["active_params"], c["flops_train_per_token"]) == (
            a["total_params"], a["active_params"], a["flops_train_per_token"])
        assert c["residual_pct"] == (a["match"] or {}).get("residual_pct")
        assert c["consumed_tokens"] == 1024
    assert contract["dense_active"]["changed_fields"] == list(raw["arms"][0]["changed_fields"])
    # one data order per seed, the same for every arm of it: fingerprints reported per seed
    assert contract["moe"]["fingerprint"] == "s1 f00d1, s2 f00d2, s3 f00d3"
    assert contract["dense_total"]["fingerprints"] == {"1": "f00d1", "2": "f00d2", "3": "f00d3"}  # seed 3 planned
    assert res.fingerprints["2"] == {"dense_active": "f00d2", "moe": "f00d2", "dense_total": "f00d2"}
    assert res.data_fingerprints_equal is True and res.data_order == "per_seed"
    assert res.data_seeds == {"1": 1235, "2": 1236, "3": 1237}
    assert not [w for w in res.warnings if "DATA" in w]
    assert len(res.warnings) == 4 and "dense_total seed 3" in res.warnings[-1]
    assert res.warnings[0].startswith("3 of 3 arms train on fewer tokens than they have parameters")  # the design's
    assert res.warnings[2].startswith("too few seeds for an interval where fewer than 3 seeds are complete: "
                                         "dense_total (2);")


def test_an_unreadable_line_before_the_last_is_refused_unless_allowed(tmp_path, capsys):
    """A torn last line is what a killed writer leaves and is skipped quietly; a bad line anywhere else means the
    file was damaged, so the report refuses it (one line) or, with --allow-damaged, names the lines it left out."""
    from megatron_moe.cli import main

    study_dir = _fake_study(tmp_path)
    metrics = next(p for p in study_dir.glob("runs/moe-s2-*/metrics.jsonl"))
    lines = metrics.read_text().splitlines()
    lines[1] = "garbage"  # moe seed 2's step-2 train row
    metrics.write_text("\n".join(lines) + "\n")
    assert main(["study", "report", str(study_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"megatron-moe: error: {metrics}: line 2 is not JSON (only a torn last line is skipped); repair "
                   "the file, or pass --allow-damaged to report without those lines")
    assert not (study_dir / directories.RESULTS).exists()
    assert main(["study", "report", str(study_dir), "--allow-damaged"]) == 0
    res = load_results(study_dir / directories.RESULTS)
    (warning,) = [w for w in res.warnings if "unreadable" in w]
    assert warning == f"{metrics.parent.relative_to(study_dir)}: 1 unreadable metrics.jsonl line left out (--allow-damaged): 2"
    # the rows around it still count: moe seed 2's best is unchanged
    assert {a["arm"]: a for a in res.arms}["moe"]["best_val_loss"]["per_seed"]["2"] == 1.60


def test_confidence_level_is_labelled_exactly(tmp_path):
    res = build_results(_fake_study(tmp_path), confidence=0.975)
    headers = [h for _, _, header, _ in tables(res) for h in header]
    assert "97.5% CI" in headers and "98% CI" not in headers


def test_unequal_data_within_a_seed_is_flagged_loudly(tmp_path):
    study_dir = _fake_study(tmp_path, fingerprints={("moe", 2): "beef"})
    paths = write_report(study_dir)
    res = load_results(paths[directories.RESULTS])
    assert res.data_fingerprints_equal is False
    warning = res.warnings[0]
    assert warning.startswith("DATA DIFFERS ACROSS ARMS") and "seed 2: dense_active f00d2, moe beef" in warning
    assert "seed 1" not in warning and "seed 3" not in warning  # seeds whose arms agree are not named
    md, page = paths["report.md"].read_text(), paths["report.html"].read_text()
    assert "> **WARNING:** DATA DIFFERS ACROSS ARMS" in md and "**NOT EQUAL ACROSS ARMS**" in md
    assert "<p class='warn'>WARNING: DATA DIFFERS ACROSS ARMS" in page
    data_rows = {row[0]: row for title, _, _, rows in tables(res) if title == "Data per seed" for row in rows}
    assert data_rows["2"][-1] == "NO" and data_rows["1"][-1] == data_rows["3"][-1] == "yes"
    assert data_rows["1"][1:3] == ["1235", "f00d1"]


def test_different_orders_across_seeds_are_not_unequal_data(tmp_path):
    # per-seed orders differ across seeds by design; only arms of one seed must agree
    res = build_results(_fake_study(tmp_path))
    assert len({fp for fps in res.fingerprints.values() for fp in fps.values()}) == 3
    assert res.data_fingerprints_equal is True


def test_a_version_0_study_record_without_data_order_is_read_as_shared(tmp_path):
    study_dir = _fake_study(tmp_path)
    raw = json.loads((study_dir / directories.STUDY_JSON).read_text())
    assert raw["version"] == STUDY_RECORD_VERSION
    legacy = {k: v for k, v in raw.items() if k not in ("data_order", "data_seeds", "version", "design_warnings")}
    legacy["data"] = {arm: {**d, "fingerprint": "f00d"} for arm, d in raw["data"]["1"].items()}
    # what records of that time lacked as well
    legacy["arms"] = [{k: v for k, v in arm.items() if k not in ("changes", "model")} for arm in raw["arms"]]
    legacy["pairs"] = [{k: v for k, v in pair.items() if k != "description"} for pair in raw["pairs"]]
    legacy["runs"] = [{k: v for k, v in run.items() if k != "hash"} for run in raw["runs"]]
    atomic_write_json(study_dir / directories.STUDY_JSON, legacy)
    loaded = load_study_record(study_dir)
    assert loaded.data_order == "shared" and loaded.data_seeds == {"1": 1234, "2": 1234, "3": 1234}
    assert loaded.data["3"]["moe"]["fingerprint"] == "f00d"
    assert loaded.arms[0].changes == {} and loaded.pairs[0].description == "" and loaded.design_warnings == []
    for path in study_dir.glob("runs/*/result.json"):
        path.unlink()
    res = build_results(study_dir)
    assert res.data_fingerprints_equal is True and res.fingerprints["2"]["dense_total"] == "f00d"


def test_a_version_0_equal_resources_record_calls_its_one_epoch_scheme_fresh():
    from megatron_moe.study.records import _upgraded

    assert _upgraded({"family": {"reuse": "loose", "flops": "x"}})["family"] == {"reuse": "fresh", "flops": "x"}


def test_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    study_dir = _fake_study(tmp_path)
    out = tmp_path / "elsewhere"
    paths = write_report(study_dir, out)
    plots = ("loss_curves", "loss_vs_compute", "expert_load", "gaps", "gap_intervals", "best_val_loss")
    assert {p.name for p in paths.values()} == {*(f"{png}.png" for png in plots), "results.json", "report.md",
                                                 "report.html"}
    md = paths["report.md"].read_text()
    for png in plots:
        assert f"](plots/{png}.png)" in md and (out / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| matched-active | dense_active | moe | 3 | 0.0700 ± 0.0265 | [0.0043, 0.1357] |" in md
    page = paths["report.html"].read_text()
    assert page.count("src='data:image/png;base64,") == len(plots) and "plots/" not in page  # self-contained
    assert not list(out.glob("**/*.tmp"))
    results = load_results(paths[directories.RESULTS])
    assert results.gaps[0]["mean"] == pytest.approx(0.07)
    # the final gaps' t intervals (what gap_intervals.png draws) and the gap-over-training intervals
    active, total = results.gaps
    assert active["ci"] == pytest.approx([0.07 - 0.0657243, 0.07 + 0.0657243], abs=1e-6)
    assert total["ci"] == [None, None]  # two seeds
    assert all(p["ci"][0] < p["mean"] < p["ci"][1] for p in active["over_training"])
    assert "(no plots" in render_markdown(results, [])


def test_wide_tables_scroll_instead_of_being_cut(tmp_path):
    results = build_results(_fake_study(tmp_path))
    page = render_html(results, {})
    (css,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    rules = {sel.strip(): body for sel, body in re.findall(r"([^{}]+)\{([^}]*)\}", css)}
    # overflow applies to block boxes, not to display:table ones, so the table becomes a block that scrolls
    table = dict(decl.split(":", 1) for decl in rules["table"].split(";"))
    assert table["overflow-x"] == "auto" and table["display"] == "block" and table["max-width"] == "100%"
    assert page.count("<table>") == len(tables(results)) > 0


def test_gap_over_training_uses_the_t_interval(tmp_path):
    res = build_results(_fake_study(tmp_path))
    (step4,) = [p for p in res.gaps[0]["over_training"] if p["step"] == 4]  # gaps .10 .05 .05
    half = 4.3026527 * step4["std"] / math.sqrt(3)  # t(.975, 2) x std / sqrt(3), not ± std
    assert step4["ci"] == pytest.approx([step4["mean"] - half, step4["mean"] + half], abs=1e-6)
    ((_, note, _, rows),) = [t for t in tables(res) if t[0] == "Gap over training"]
    assert "95% t interval" in note and "std" not in note
    assert rows[1][1] == f"0.0667 [{step4['ci'][0]:.4f}, {step4['ci'][1]:.4f}]"


def test_ordering_line_counts_the_seeds_where_it_holds(tmp_path):
    res = build_results(_fake_study(tmp_path / "a"))
    # dense_total seed 3 is incomplete: the all-arms ordering is over seeds 1 and 2, the pairs over theirs
    assert res.ordering["line"] == "dense_total < moe < dense_active in 2/2 seeds"
    lines = {g["name"]: g["ordering"]["line"] for g in res.gaps}
    assert lines == {"matched-active": "moe < dense_active in 3/3 seeds", "matched-total": "dense_total < moe in 2/2 seeds"}
    # seed 2's MoE ends worse than its dense_active (1.66 > 1.65): the means keep their order, seed 2 does not
    flipped = {**CURVES, ("moe", 2): [1.68, 1.66]}
    res = build_results(_fake_study(tmp_path / "b", curves=flipped))
    assert res.ordering["line"] == "dense_total < moe < dense_active in 1/2 seeds"
    assert res.ordering["per_seed"]["2"] == ["dense_total", "dense_active", "moe"]
    gaps = {g["name"]: g for g in res.gaps}
    assert gaps["matched-active"]["ordering"]["line"] == "moe < dense_active in 2/3 seeds"
    assert gaps["matched-active"]["ordering"]["seeds_holding"] == [1, 3]
    # shown in the table `study report` prints, and in report.md
    paired_rows = [rows for title, _, _, rows in tables(res) if title == "Paired gaps"][0]
    assert paired_rows[0][-1] == "moe < dense_active in 2/3 seeds"
    md = render_markdown(res, [])
    assert "- all arms: dense_total < moe < dense_active in 1/2 seeds" in md
    assert "- matched-total: dense_total < moe in 2/2 seeds" in md


def test_best_at_the_last_evaluation_is_warned_about(tmp_path):
    res = build_results(_fake_study(tmp_path / "a"))
    (warning,) = [w for w in res.warnings if "last evaluation" in w]
    # every complete run but moe seed 3 (best at step 2 of 4) is still improving at its last evaluation
    assert warning.startswith("7 of 8 complete runs have their best validation loss at their last evaluation")
    assert "moe seed 1" in warning and "moe seed 3" not in warning and "dense_total seed 3" not in warning
    assert [r["best_is_last"] for r in res.runs if r["arm"] == "moe"] == [True, True, False]
    # every run best at step 2 of 4: no warning
    peaked = {k: [min(v) - 0.01, min(v)] if len(v) == 2 else v for k, v in CURVES.items()}
    res = build_results(_fake_study(tmp_path / "b", curves=peaked))
    assert not [w for w in res.warnings if "last evaluation" in w]
    assert not any(r["best_is_last"] for r in res.runs)


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
    ('{"name": "mini"}', "is not a valid study.json: no 'seeds'"),
    ('{"name": "mini", "seeds": [1], "arms": [{"name": "moe"}], "pairs": [], "runs": []}',
     "is not a valid study.json: no 'arms[0].contract'"),
    ('{"name": "mini", "seeds": ["one"], "arms": [], "pairs": [], "runs": []}',
     "is not a valid study.json: seeds[0] = 'one' has the wrong type; expected int"),
    ('{"name": "mini", "seeds": [], "arms": [], "pairs": [], "runs": [], "data_order": "sorted"}',
     "is not a valid study.json: data_order = 'sorted' is not allowed; expected one of 'per_seed', 'shared'"),
    ('{"name": "mini", "seeds": [], "arms": [], "pairs": [], "runs": [], "version": 99}',
     "has layout version 99; this megatron-moe reads versions up to"),
])
def test_corrupt_study_json_fails_with_one_line(tmp_path, text, message):
    (tmp_path / directories.STUDY_JSON).write_text(text)
    for read in (load_study_record, build_results):
        with pytest.raises(ConfigError) as exc:
            read(tmp_path)
        assert str(exc.value).startswith(f"{tmp_path / 'study.json'} ") and message in str(exc.value)
        assert "\n" not in str(exc.value)


def test_study_json_naming_unknown_arms_is_refused(tmp_path):
    study_dir = _fake_study(tmp_path)
    assert load_study_record(study_dir).name == "mini"
    raw = json.loads((study_dir / directories.STUDY_JSON).read_text())
    # dense_active's runs dangle
    atomic_write_json(study_dir / directories.STUDY_JSON, {**raw, "arms": raw["arms"][1:]})
    with pytest.raises(ConfigError, match=r"study.json is not a valid study.json: pair matched-active names arm "
                                          r"'dense_active', which is not in 'arms'") as exc:
        build_results(study_dir)
    assert "\n" not in str(exc.value)


def test_report_before_any_run_is_complete(tmp_path):
    study_dir = _fake_study(tmp_path)
    for path in study_dir.glob("runs/*/result.json"):
        path.unlink()
    raw = json.loads((study_dir / directories.STUDY_JSON).read_text())
    # as `study launch` without a data check
    atomic_write_json(study_dir / directories.STUDY_JSON, {**raw, "data": None})
    res = build_results(study_dir)
    assert res.data_fingerprints_equal is None and all(a["best_val_loss"]["n"] == 0 for a in res.arms)
    assert [w for w in res.warnings if "DATA" in w] == [] and "9 of 9 runs are not complete" in res.warnings[1]
    assert "unknown (no run complete)" in render_markdown(res, [])


def test_the_regime_line_and_its_warning_when_extra_parameters_do_not_pay(tmp_path):
    # the default curves: dense_total ahead of dense_active by 0.20 (seed 1) and 0.13 (seed 2); seed 3 never finished
    pays = build_results(_fake_study(tmp_path / "pays")).regime
    assert pays["per_seed"] == pytest.approx({"1": 0.20, "2": 0.13}) and pays["wins"] == 2 and pays["n"] == 2
    assert pays["mean"] == pytest.approx(0.165) and pays["std"] == pytest.approx(0.07 / math.sqrt(2)) and pays["pays"]
    assert pays["line"] == ("dense_total ahead of dense_active by +0.1650 nats/token on average (seed spread 0.0495), "
                            "ahead in 2/2 seeds")
    # dense_total behind in seed 2: extra parameters do not pay yet, and the report says so
    curves = {**CURVES, ("dense_total", 1): [1.75, 1.69], ("dense_total", 2): [1.70, 1.68],
              ("dense_total", 3): [1.70, 1.63]}
    paths = write_report(_fake_study(tmp_path / "not", curves=curves))
    res = load_results(paths[directories.RESULTS])
    regime = res.regime
    assert regime["per_seed"] == pytest.approx({"1": 0.01, "2": -0.03, "3": -0.01}) and regime["wins"] == 1
    assert not regime["pays"] and regime["line"].startswith("dense_total not ahead of dense_active by -0.0100")
    (warning,) = [w for w in res.warnings if "do not pay" in w]
    assert warning.startswith(f"extra parameters do not pay yet at this budget ({regime['line']})")
    assert f"regime: {regime['line']}" in paths["report.md"].read_text()


def test_results_json_reads_back_as_built_and_refuses_another_layout(tmp_path):
    study_dir = _fake_study(tmp_path)
    paths = write_report(study_dir)
    loaded = load_results(paths[directories.RESULTS])
    assert loaded.version == 1 and loaded.arms == build_results(study_dir).arms
    raw = json.loads(paths[directories.RESULTS].read_text())
    atomic_write_json(paths[directories.RESULTS], {**raw, "version": 0})
    with pytest.raises(ConfigError, match=r"is not a results.json of layout version 1 \(found 0\)"):
        load_results(paths[directories.RESULTS])


def test_gaps_pair_by_seed_when_a_middle_seed_is_missing(tmp_path):
    """moe seed 2 never finished: the gaps of seeds 1 and 3 pair each seed with itself, not by position."""
    study_dir = _fake_study(tmp_path)
    (moe_s2,) = [d for d in (study_dir / directories.RUNS).iterdir() if d.name.startswith("moe-s2-")]
    (moe_s2 / directories.RESULT).unlink()
    res = build_results(study_dir)
    best = {(a["arm"], int(s)): v for a in res.arms for s, v in a["best_val_loss"]["per_seed"].items()}
    active = next(g for g in res.gaps if g["name"] == "matched-active")
    assert set(active["per_seed"]) == {"1", "3"}
    for seed in (1, 3):
        assert active["per_seed"][str(seed)] == pytest.approx(best[("dense_active", seed)] - best[("moe", seed)])
    assert active["per_seed"]["3"] != pytest.approx(best[("dense_active", 2)] - best[("moe", 3)])
