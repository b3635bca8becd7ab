"""Equal-resources studies: the [study.equal_resources] controls (granularity, dense shape, reuse, counts written
as 6.5B), the run configs they derive, and the report's answer (r_a* with a seed-bootstrap interval, a warning
when the grid does not bracket it) from a fabricated study directory."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from megatron_moe import directories
from megatron_moe.config import ConfigError
from megatron_moe.study.design import format_arms, design_study
from megatron_moe.study.records import load_results
from megatron_moe.study.report import build_results, render_markdown, tables, write_report
from megatron_moe.study.report_er import er_tables
from megatron_moe.study.spec import load_study
from megatron_moe.study.studydir import write_study_files
from megatron_moe.train.result import RunResult, write_result
from tests.conftest import write_study

# The CPU example's backbone on the synthetic corpus (planning only reads [model], [parallel], [train]).
ER = """
[study]
name = "er"
arms = ["equal_resources"]
seeds = [1, 2]

[study.equal_resources]
r_a = [0.15, 0.2, 0.3, 0.52]
total_params = "4M"
unique_tokens = 160_000
top_k = [2, 3, 4, 6, 8]
max_experts = 64

[model]
vocab_size = 512
seq_length = 128
num_layers = 4
hidden_size = 128
num_attention_heads = 4
num_query_groups = 2
ffn_hidden_size = 352

[model.moe]
num_experts = 8
top_k = 2
expert_ffn_hidden_size = 128
shared_expert_ffn_hidden_size = 256
first_k_dense = 1
topk_renormalize = false

[train]
micro_batch_size = 16
global_batch_size = 16
lr_warmup_steps = 5
eval_interval = 50
"""


def _study(tmp_path: Path, *overrides: str, text: str = ER):
    return load_study(write_study(tmp_path / "er.toml", text), list(overrides))


# ---------------------------------------------------------------- spec and run configs


@pytest.mark.parametrize("value, expected", [('"4M"', 4_000_000), ("4e6", 4_000_000), ("4_000_000", 4_000_000),
                                             ('"4.0e6"', 4_000_000)])
def test_counts_as_researchers_write_them(tmp_path, value, expected):
    cfg = _study(tmp_path, text=ER.replace('total_params = "4M"', f"total_params = {value}"))
    assert cfg.study.equal_resources.total_params == expected
    assert isinstance(cfg.study.equal_resources.total_params, int)
    cfg = _study(tmp_path, 'study.equal_resources.unique_tokens="0.16M"')  # a dotted override too
    assert cfg.study.equal_resources.unique_tokens == 160_000


@pytest.mark.parametrize("override, message", [
    ('study.equal_resources.total_params="4X"', r"study.equal_resources.total_params = '4X' is not a count"),
    ("study.equal_resources.total_params=4.5", r"total_params = '4.5' is 4.5, not a whole number"),
    ("study.equal_resources.reuse='twice'", r"study.equal_resources.reuse = 'twice' is not allowed"),
    ("study.equal_resources.granularity='hold_top_k'", r"top_k = \[2, 3, 4, 6, 8\]: granularity = 'hold_top_k' "
                                                       r"keeps K fixed across r_a, so give one value"),
    ("study.equal_resources.expert_ffn_hidden_size=64", r"holds D_e only with granularity = 'hold_expert_size'"),
    ("study.equal_resources.dense_ffn=-1", r"study.equal_resources.dense_ffn = -1 must be >= 0"),
    ("study.equal_resources.r_a=[0.2, 0.2]", r"agree to two decimals"),
    ("study.equal_resources.r_a=[0.2, 0.204, 0.3]", r"agree to two decimals"),  # one arm name for two rates
])
def test_bad_equal_resources_specs_fail_with_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as exc:
        _study(tmp_path, override)
    assert "\n" not in str(exc.value)


def test_strict_and_fresh_reuse_run_configs(tmp_path):
    strict = design_study(_study(tmp_path), tmp_path / "s")
    fresh = design_study(_study(tmp_path, "study.equal_resources.reuse='fresh'"), tmp_path / "l")
    per_step = 16 * 128
    assert strict.family["reuse"] == "strict" and fresh.family["reuse"] == "fresh"
    for design in (strict, fresh):
        # one data config for every arm (one fingerprint per seed), an unbounded reuse schedule
        assert len({json.dumps(r.config.data.__dict__, sort_keys=True) for r in design.runs if r.seed == 1}) == 1
        assert all(r.config.data.epochs == 0 and r.config.data.consumed_tokens == 0 for r in design.runs)
    s_arms, l_arms = {a.name: a for a in strict.arms}, {a.name: a for a in fresh.arms}
    assert list(s_arms) == list(l_arms) == ["er_dense", "er_moe_ra0.15", "er_moe_ra0.20", "er_moe_ra0.30",
                                            "er_moe_ra0.52"]
    for name, s in s_arms.items():
        lo = l_arms[name]
        consumed = s.match["consumed_tokens"]
        # the same compute, so the same steps either way: consumed tokens / tokens per step
        assert s.config.train.train_steps == lo.config.train.train_steps == consumed // per_step
        assert s.config.data.unique_tokens == 160_000 == s.match["unique_tokens"]  # strict: D for every arm
        assert lo.match["unique_tokens"] == consumed and lo.match["repeats"] == 1.0  # fresh: fresh tokens
    assert s_arms["er_dense"].match["repeats"] == 1.0
    assert s_arms["er_moe_ra0.15"].match["repeats"] > 5  # strict: the sparsest arm repeats D most
    # fresh: a pool as large as the largest arm's budget, of which every arm reads a prefix once
    pool = max(a.match["consumed_tokens"] for a in l_arms.values())
    assert pool == l_arms["er_moe_ra0.15"].match["consumed_tokens"] > 5 * 160_000
    assert {a.config.data.unique_tokens for a in l_arms.values()} == {pool} == {fresh.family["data_unique_tokens"]}
    assert all(a.config.train.train_steps * per_step <= pool for a in l_arms.values())
    # the dry-run table shows unique tokens and epochs per arm
    table = format_arms(fresh, 1, False).splitlines()
    header = table[0].split()
    assert header[:9] == ["arm", "params", "active", "N", "(non-emb)", "r_a", "E", "K", "D_e"]
    row = table[2].split()
    assert row[0] == "er_moe_ra0.15" and row[header.index("epochs") - 1] == "1.00"  # 'N (non-emb)' is two words


def test_granularity_and_dense_shape_reach_the_arms(tmp_path):
    held_k = design_study(_study(tmp_path, "study.equal_resources.granularity='hold_top_k'",
                               "study.equal_resources.top_k=[2]"), tmp_path / "k")
    moes = [a for a in held_k.arms if a.config.model.is_moe]
    assert {a.config.model.moe.top_k for a in moes} == {2} and held_k.family["granularity"] == "hold_top_k"
    assert all(a.match["granularity"]["top_k"] == 2 for a in moes)
    held_d = design_study(_study(tmp_path, "study.equal_resources.granularity='hold_expert_size'",
                               "study.equal_resources.expert_ffn_hidden_size=16", "study.equal_resources.r_a=[0.13, 0.17]",
                               "study.equal_resources.top_k=[2, 3, 4, 5, 6, 7, 8]", "study.equal_resources.max_experts=256"),
                     tmp_path / "d")
    moes = [a for a in held_d.arms if a.config.model.is_moe]
    assert {a.config.model.expert_ffn for a in moes} == {16}
    assert all(abs(a.match["residual_pct"]) <= 0.5 for a in held_d.arms)
    # E, K, D_e and D_se in the dry-run table, one column each
    lines = format_arms(held_d, 1, False).splitlines()
    cols = {h: lines[0].index(h) for h in (" E ", " K ", " D_e ", " D_se ")}
    for line, a in zip(lines[1:], held_d.arms):
        g = a.config.model.moe
        if a.config.model.is_moe:
            assert line[:cols[" D_e "] + 4].split()[-1] == "16"
            assert line[:cols[" D_se "] + 5].split()[-1] == str(16 * g.top_k)
    dense = design_study(_study(tmp_path, "study.equal_resources.dense_layers=6",
                                "study.equal_resources.dense_hidden=192"), tmp_path / "dense")
    d = dense.arms[0]
    assert d.name == "er_dense" and (d.config.model.num_layers, d.config.model.hidden_size) == (6, 192)
    assert d.config.model.num_attention_heads == 6 and d.config.model.num_query_groups == 3  # head dim 32 kept
    assert abs(d.ledger.nonembedding_params - 4e6) <= 0.005 * 4e6  # matched on N by its FFN
    assert all(abs(a.match["residual_pct"]) <= 0.5 for a in dense.arms)


# ---------------------------------------------------------------- the report


def _fake_er_study(tmp_path: Path, loss_of, *overrides: str, seeds_noise: float = 0.01, shortfall: int = 13) -> Path:
    """An equal-resources study directory: study.json from the planner, each run's metrics and result.json with
    best validation loss loss_of(r_a) + noise (seed 1 up, seed 2 down); the dense arm at 2.05. The data pool is
    `shortfall` tokens under the planned budget, as whole documents leave it."""
    cfg = _study(tmp_path, *overrides)
    design = design_study(cfg, tmp_path / "study")
    per_step = 16 * 128
    pool = design.family["data_unique_tokens"] - shortfall

    def described(run) -> dict:
        consumed = run.config.train.train_steps * per_step
        return {"source": "synthetic", "unique_tokens": pool, "consumed_tokens": consumed, "epochs": consumed / pool,
                "fingerprint": f"f{run.seed}", "data_seed": run.config.data.seed}

    data = {str(s): {r.arm: described(r) for r in design.runs if r.seed == s} for s in cfg.study.seeds}
    write_study_files(design, "er.toml", data)
    arms = {a.name: a for a in design.arms}
    for run in design.runs:
        arm = arms[run.arm]
        base = loss_of(arm.ledger.r_a) if arm.config.model.is_moe else 2.05
        best = base + (seeds_noise if run.seed == 1 else -seeds_noise)
        steps = run.config.train.train_steps
        rows = [{"kind": "train", "step": steps, "loss": best + 0.1},
                {"kind": "eval", "step": steps // 2, "val_loss": best + 0.3, "val_bpb": (best + 0.3) / math.log(2) / 3},
                {"kind": "eval", "step": steps, "val_loss": best, "val_bpb": best / math.log(2) / 3}]
        run.dir.mkdir(parents=True)
        (run.dir / directories.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_result(run.dir, RunResult(steps=steps, final_train_loss=best, best_val_loss=best, best_val_step=steps,
                                        train_time_s=1.0, tokens_per_step=per_step, data=described(run)))
    return design.out_dir


def _bowl(r: float) -> float:
    return 2.0 + 0.5 * math.log(r / 0.22) ** 2  # the optimum at r_a = 0.22, inside the grid 0.15..0.52


def test_report_recovers_the_optimum(tmp_path):
    res = build_results(_fake_er_study(tmp_path, _bowl))
    er = res.equal_resources
    fit = er["fit"]
    # the arms' means lie on a quadratic in log r_a, so the fit recovers its minimum exactly
    assert fit["x_opt"] == pytest.approx(0.22, rel=1e-6) and fit["y_opt"] == pytest.approx(2.0, abs=1e-9)
    assert fit["interior"] and not fit["at_edge"] and fit["best_arm"] == "er_moe_ra0.20"
    # two seeds: too few for an interval, and the report says so rather than give one
    assert fit["ci"] == [None, None] and fit["resamples"] == 0 and fit["bootstrap_seed"] == 0
    assert any("too few seeds for an interval" in w for w in res.warnings)
    assert "too few seeds for an interval" in [row for _, _, _, rows in er_tables(res) for row in rows][0]
    assert not [w for w in res.warnings if "edge" in w]
    arms = {x["arm"]: x for x in er["arms"]}
    dense = arms["er_dense"]
    assert dense["best_val_loss"]["mean"] == pytest.approx(2.05) and dense["epochs"] == pytest.approx(1.0)
    assert dense["best_val_loss"]["ci"] == [None, None]  # two seeds: no band
    sparse = arms["er_moe_ra0.15"]
    assert (sparse["experts"], sparse["top_k"], sparse["expert_ffn"], sparse["shared_ffn"]) == (55, 2, 56, 112)
    # strict reuse: D unique tokens (the pool), read consumed / D times
    assert sparse["unique_tokens"] == 160_000 - 13 and sparse["epochs"] == pytest.approx(
        sparse["consumed_tokens"] / (160_000 - 13))
    assert sparse["best_val_bpb"]["mean"] == pytest.approx(sparse["best_val_loss"]["mean"] / math.log(2) / 3)
    assert arms["er_moe_ra0.20"]["gap_vs_dense"]["mean"] == pytest.approx(2.05 - _bowl(0.1995), abs=2e-3)
    assert "er_moe_ra0.20" in er["answer"] and "r_a* = 0.22" in er["answer"]
    # the answer comes first in the report, with granularity per arm
    titles = [t for t, _, _, _ in tables(res)]
    assert titles[:2] == ["Equal resources: optimal activation rate", "Equal resources: arms"]
    _, note, header, rows = tables(res)[1]
    assert header[3:7] == ["E", "K", "D_e", "D_se"] and "epochs" in header
    assert rows[1][:7] == ["er_moe_ra0.15", "0.15", f"{sparse['r_a']:.4f}", "55", "2", "56", "112"]
    _, note, header, rows = tables(res)[0]
    assert rows[0][0] == "0.2200" and "bootstrap" in note and "quadratic in log r_a" in note
    assert "Equal resources: Fitted optimum r_a* = 0.22" in render_markdown(res, [])


def test_report_files_have_the_equal_resources_plots(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_report(_fake_er_study(tmp_path, _bowl))
    assert {"er_loss_vs_ra.png", "er_tokens.png"} <= set(paths)
    assert paths["er_loss_vs_ra.png"].read_bytes()[:4] == b"\x89PNG"
    md = paths["report.md"].read_text()
    assert "](plots/er_loss_vs_ra.png)" in md and "## Equal resources: optimal activation rate" in md
    results = load_results(paths[directories.RESULTS])
    assert results.equal_resources["fit"]["x_opt"] == pytest.approx(0.22, rel=1e-6)
    assert "r_a*" in paths["report.html"].read_text()


@pytest.mark.parametrize("loss_of, why, side", [
    (lambda r: 2.0 + 0.5 * math.log(r / 0.8) ** 2, r"the quadratic's minimum \(r_a = 0.8\) lies outside the grid", "above"),
    (lambda r: 2.0 + 0.5 * math.log(r / 0.1) ** 2, r"the quadratic's minimum \(r_a = 0.1\) lies outside the grid", "below"),
    (lambda r: 2.0 - 0.5 * math.log(r / 0.22) ** 2, "the fitted quadratic has no minimum", None),
    # an interior vertex, but the lowest mean is the sparsest arm: the minimum is not bracketed by the data
    (lambda r: 1.95 if r < 0.17 else 1.96 if r < 0.25 else 1.97 if r < 0.4 else 2.2,
     r"lowest mean loss is at the grid's end \(r_a = 0.152\)", "below"),
])
def test_an_optimum_at_the_grid_edge_is_warned_about(tmp_path, loss_of, why, side):
    res = build_results(_fake_er_study(tmp_path, loss_of))
    fit = res.equal_resources["fit"]
    assert fit["at_edge"]
    (warning,) = [w for w in res.warnings if "edge of the grid" in w]
    assert re.search(why, warning), warning
    if side:
        assert f"Extend study.equal_resources.r_a {side} it" in warning
    if side and not fit["interior"]:  # no minimum inside: r_a* is the grid's end where the curve is lowest
        assert fit["x_opt"] == pytest.approx(fit["x_max"] if side == "above" else fit["x_min"])
    assert "at the edge of the grid" in res.equal_resources["answer"]
    assert tables(res)[0][3][0][3] == "no (edge)"


def test_fresh_reuse_report_counts_fresh_tokens(tmp_path):
    res = build_results(_fake_er_study(tmp_path, _bowl, "study.equal_resources.reuse='fresh'"))
    er = res.equal_resources
    assert er["reuse"] == "fresh" and "fresh reuse" in tables(res)[0][1]
    for x in er["arms"]:  # every arm reads a prefix of the pool once: its unique tokens are its consumed tokens
        assert x["unique_tokens"] == x["consumed_tokens"] == x["train_steps"] * 16 * 128 and x["epochs"] == 1.0
    # a pool that fell short of the largest arm's budget (whole documents): the re-read tokens show as epochs > 1
    res = build_results(_fake_er_study(tmp_path / "short", _bowl, "study.equal_resources.reuse='fresh'",
                                       shortfall=3000))
    big = next(x for x in res.equal_resources["arms"] if x["arm"] == "er_moe_ra0.15")
    assert big["unique_tokens"] < big["consumed_tokens"] and 1.0 < big["epochs"] < 1.01


def test_one_seed_gives_a_fit_without_an_interval(tmp_path):
    res = build_results(_fake_er_study(tmp_path, _bowl, "study.seeds=[1]", seeds_noise=0.0))
    fit = res.equal_resources["fit"]
    assert fit["x_opt"] == pytest.approx(0.22, rel=1e-6) and fit["ci"] == [None, None]
    assert any("too few seeds for an interval" in w for w in res.warnings)
