"""Equal-resources families: granularity (free, K held, D_e held), an explicit dense baseline shape, strict and
fresh data reuse; counts as researchers write them, and planner tables that stay aligned at 7B scale."""

from __future__ import annotations

import json
import re

import pytest

from megatron_moe import directories
from megatron_moe.config import ConfigError, ModelConfig, MoEConfig
from megatron_moe.planner.family import equal_resources_family, explicit_dense
from megatron_moe.planner.format import format_family, format_ledger, format_matches
from megatron_moe.planner.ledger import ledger
from megatron_moe.planner.match import match_dense
from megatron_moe.text import parse_count

# The study's 7B MoE backbone (1 dense + 23 MoE layers, D_m 2048, S 2048).
MOE_7B = ModelConfig(
    vocab_size=65536, seq_length=2048, num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5672,
    moe=MoEConfig(num_experts=26, top_k=2, expert_ffn_hidden_size=1536, shared_expert_ffn_hidden_size=3072,
                  first_k_dense=1),
)
# The CPU example's backbone (4 layers, width 128, GQA).
MOE_TINY = ModelConfig(
    vocab_size=2048, seq_length=128, num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=352, moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_hidden_size=128,
                                       shared_expert_ffn_hidden_size=256, first_k_dense=1),
)


def _check_equal_n(fam, tolerance_pct: float = 0.5) -> None:
    for m in fam.members:
        n = m.ledger.nonembedding_params
        assert abs(n - fam.total_params) <= tolerance_pct / 100 * fam.total_params, (m.name, n)
        assert m.params_residual_pct == pytest.approx(100 * (n - fam.total_params) / fam.total_params)


# ---------------------------------------------------------------- granularity


def test_free_granularity_varies_k_and_expert_size():
    """The reference for the held variants: left free, the planner changes K and D_e across the grid."""
    fam = equal_resources_family(MOE_7B, (0.1, 0.2, 0.3), multiple_of=16)
    assert fam.granularity == "free"
    assert len({m.config.moe.top_k for m in fam.members}) > 1 or len({m.config.expert_ffn for m in fam.members}) > 1


def test_hold_top_k_keeps_k_across_r_a_at_equal_n():
    grid = (0.1, 0.15, 0.2, 0.3)
    fam = equal_resources_family(MOE_7B, grid, granularity="hold_top_k", top_k_choices=(2,), multiple_of=16)
    assert fam.granularity == "hold_top_k"
    assert [m.config.moe.top_k for m in fam.members] == [2, 2, 2, 2]
    _check_equal_n(fam)
    for m, target in zip(fam.members, grid):
        assert abs(m.r_a - target) <= 0.1 * target
        assert m.config.moe.shared_expert_ffn_hidden_size == 2 * m.config.expert_ffn  # one shared expert of K x D_e
    # with K held, lower r_a takes more, smaller experts
    experts = [m.config.moe.num_experts for m in fam.members]
    assert experts == sorted(experts, reverse=True) and experts[0] > experts[-1]
    with pytest.raises(ConfigError, match=r"top_k = \[2, 4\] is not allowed: granularity = 'hold_top_k' keeps K "
                                          r"fixed") as exc:
        equal_resources_family(MOE_7B, grid, granularity="hold_top_k", top_k_choices=(2, 4))
    assert "\n" not in str(exc.value)


def test_hold_expert_size_keeps_d_e_across_r_a_at_equal_n():
    grid = (0.1, 0.15, 0.2)
    fam = equal_resources_family(MOE_7B, grid, granularity="hold_expert_size", expert_ffn_hidden_size=256,
                                 top_k_choices=tuple(range(2, 24)), multiple_of=16)
    assert {m.config.expert_ffn for m in fam.members} == {256}
    _check_equal_n(fam)
    for m, target in zip(fam.members, grid):
        assert abs(m.r_a - target) <= 0.1 * target
        assert m.config.moe.shared_expert_ffn_hidden_size == m.config.moe.top_k * 256
    # with D_e held, r_a moves with K
    ks = [m.config.moe.top_k for m in fam.members]
    assert ks == sorted(ks) and ks[0] < ks[-1]
    # without a value, D_e is the source's expert size
    held = equal_resources_family(MOE_7B, (0.2,), granularity="hold_expert_size", multiple_of=16)
    assert held.members[0].config.expert_ffn == MOE_7B.expert_ffn == 1536
    _check_equal_n(held)


def test_hold_expert_size_that_cannot_hit_n_fails_in_one_line():
    """A large held D_e moves N in steps far above the tolerance: an error naming the step, not an arm off N."""
    with pytest.raises(ConfigError, match=r"no MoE layout has N within tolerance_pct = 0.5% .* expert size held at "
                                          r"512 .* with D_e held, N moves in steps of [\d.]+k \(1[0-9].\d\d% of N\) "
                                          r"per expert") as exc:
        equal_resources_family(MOE_TINY, (0.3,), total_params=4_000_000, granularity="hold_expert_size",
                               expert_ffn_hidden_size=512)
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------- the dense baseline


def test_explicit_dense_shape_is_matched_on_n_by_its_ffn():
    """dense_layers/dense_hidden given, FFN 0: the FFN is resized to N at that depth and width."""
    dense_cfg, resize = explicit_dense(MOE_7B, layers=30, hidden=3072)
    assert resize == "ffn" and (dense_cfg.num_layers, dense_cfg.hidden_size) == (30, 3072)
    assert dense_cfg.hidden_size // dense_cfg.num_attention_heads == 128  # the backbone's head dimension
    fam = equal_resources_family(MOE_7B, (0.2, 0.3), total_params=6_500_000_000, dense_cfg=dense_cfg,
                                 dense_resize=resize, multiple_of=16)
    d = fam.dense.config
    assert (d.num_layers, d.hidden_size, d.is_moe) == (30, 3072, False) and d.ffn_hidden_size % 16 == 0
    assert abs(fam.total_params - 6.5e9) <= 0.005 * 6.5e9  # the dense baseline is within tolerance of N ...
    _check_equal_n(fam)  # ... and defines N for the MoE arms
    assert fam.members[0].config.num_layers == 24  # the MoE arms keep the backbone


def test_explicit_full_dense_shape_defines_n_or_is_refused():
    """The study's own 7B dense (L 32, D_m 4096, D_ffn 11008) given exactly: it defines N when total_params is
    not given; a total_params it misses by more than the tolerance is refused, naming the FFN that would match."""
    dense_cfg, resize = explicit_dense(MOE_7B, 32, 4096, 11008)
    assert resize is None and dense_cfg.num_attention_heads == 32
    fam = equal_resources_family(MOE_7B, (0.2,), dense_cfg=dense_cfg, dense_resize=resize, multiple_of=16)
    assert fam.dense.config.ffn_hidden_size == 11008
    assert fam.total_params == ledger(dense_cfg).nonembedding_params
    _check_equal_n(fam)
    with pytest.raises(ConfigError, match=r"dense baseline \(32 layers, hidden 4096, ffn 11008\) has N = 6.476G, "
                                          r"-7.48% from total_params = 7G, .* set dense_ffn = (\d+)") as exc:
        equal_resources_family(MOE_7B, (0.2,), total_params=7_000_000_000, dense_cfg=dense_cfg, dense_resize=resize,
                               multiple_of=16)
    assert "\n" not in str(exc.value)
    suggested = int(re.search(r"dense_ffn = (\d+)", str(exc.value)).group(1))
    fixed, _ = explicit_dense(MOE_7B, 32, 4096, suggested)
    assert abs(ledger(fixed).nonembedding_params - 7e9) <= 0.005 * 7e9  # the suggestion does match
    with pytest.raises(ConfigError, match=r"dense_hidden = 4000 is not allowed: keeping the backbone's head "
                                          r"dimension 128"):
        explicit_dense(MOE_7B, hidden=4000)
    assert explicit_dense(MOE_7B) is None


# ---------------------------------------------------------------- data reuse


def test_strict_and_fresh_reuse_tokens():
    kw = dict(total_params=4_000_000, unique_tokens=160_000, top_k_choices=(2, 3, 4, 6, 8), max_experts=64)
    grid = (0.15, 0.3, 0.52)
    strict = equal_resources_family(MOE_TINY, grid, reuse="strict", **kw)
    fresh = equal_resources_family(MOE_TINY, grid, reuse="fresh", **kw)
    assert (strict.reuse, fresh.reuse) == ("strict", "fresh")
    # the same arms and compute: consumed tokens = floor(C / FLOPs per token) either way
    assert fresh.compute == strict.compute == strict.dense.flops_per_token * 160_000
    for s, lo in zip((strict.dense, *strict.members), (fresh.dense, *fresh.members)):
        assert s.config == lo.config and s.consumed_tokens == lo.consumed_tokens
        assert s.consumed_tokens == strict.compute // s.flops_per_token
        assert s.unique_tokens == 160_000 and s.repeats == s.consumed_tokens / 160_000  # strict: D, repeated
        assert lo.unique_tokens == lo.consumed_tokens and lo.repeats == 1.0  # fresh: fresh tokens, one epoch
    assert strict.dense.repeats == 1.0 and all(m.repeats > 1.5 for m in strict.members)
    with pytest.raises(ConfigError, match=r"reuse = 'twice' is not allowed"):
        equal_resources_family(MOE_TINY, grid, reuse="twice", **kw)


# ---------------------------------------------------------------- counts and tables


@pytest.mark.parametrize("text, value", [
    ("6.5e9", 6_500_000_000), ("6.5B", 6_500_000_000), ("6.5b", 6_500_000_000), ("6.5G", 6_500_000_000),
    ("130B", 130_000_000_000), ("20M", 20_000_000), ("1_000_000", 1_000_000), ("4k", 4000), ("1.5T", 1.5e12),
    (" 7e9 ", 7_000_000_000), ("1.4E11", 140_000_000_000), ("-5", -5), ("0", 0), (2_000_000, 2_000_000),
])
def test_parse_count(text, value):
    assert parse_count(text) == value and isinstance(parse_count(text), int)


@pytest.mark.parametrize("text, message", [
    ("6.5X", "is not a count"), ("abc", "is not a count"), ("", "is not a count"), ("nan", "is not a count"),
    ("inf", "is not a count"), ("B", "is not a count"), ("1e", "is not a count"), ("1.2.3", "is not a count"),
    ("1.5", "is 1.5, not a whole number"), ("1.0005k", "not a whole number"),
])
def test_parse_count_refuses_garbage_in_one_line(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        parse_count(text, "--total-params")
    assert str(exc.value).startswith(f"--total-params = {text!r}") and "\n" not in str(exc.value)


def _assert_aligned(lines: list[str], header: list[str], left: int = 1) -> None:
    """Every cell ends (right-aligned columns) or starts (left-aligned ones) where its header does, and cells are
    separated by at least two spaces, so no two numbers run into each other."""
    starts, pos = [], 0
    for h in header:
        pos = lines[0].index(h, pos)
        starts.append(pos)
        pos += len(h)
    ends = [s + len(h) for s, h in zip(starts, header)]
    for line in lines[1:]:
        for i in range(len(header)):
            if i < left:
                cell_start = starts[i]
                assert line[cell_start] != " " and (cell_start == 0 or line[cell_start - 2:cell_start] == "  "), line
            else:
                assert line[ends[i] - 1] != " ", (header[i], line)
                assert ends[i] == len(line) or line[ends[i]:ends[i] + 2] == "  ", (header[i], line)
        # the cells between the column edges are the header's count
        assert len(re.split(r"\s{2,}", line.strip())) == len(header), line


def test_tables_stay_aligned_at_7b_scale():
    fam = equal_resources_family(MOE_7B, (0.1, 0.2, 0.5), total_params=7_000_000_000,
                                 unique_tokens=140_000_000_000, multiple_of=16)
    assert max(m.consumed_tokens for m in fam.members) > 10**12  # 13-digit counts: what ran together before
    lines = format_family(fam).splitlines()[1:]
    header = ["arm", "layers", "hidden", "ffn", "E", "K", "D_e", "D_se", "N", "N resid %", "r_a", "FLOPs/tok",
              "tokens", "unique", "epochs"]
    _assert_aligned(lines, header)
    assert "7,0" in lines[1] and "140,000,000,000" in lines[1]
    # and the column of N sits at one place in every row
    n_col = lines[0].index("N resid %") - 3  # the last digit of N
    assert {line[n_col] for line in lines[1:]} <= set("0123456789")
    led_lines = format_ledger(ledger(fam.members[0].config)).splitlines()
    _assert_aligned(led_lines[:10], ["component", "total", "active"])
    big = MOE_7B.__class__(**{**MOE_7B.__dict__, "num_layers": 240})  # ~65B parameters: 14-digit counts
    matches = [match_dense(big, c) for c in ("active", "total")]
    _assert_aligned(format_matches(matches).splitlines(),
                    ["contract", "matched quantity", "target", "achieved", "resid %", "hidden", "ffn", "params",
                     "train FLOPs/tok"], left=2)


def test_plan_command_reads_counts_as_written(tmp_path, capsys):
    from megatron_moe.cli import main
    from tests.planner.test_planner import _write_run_config

    path = _write_run_config(tmp_path / directories.RUN_TOML)
    er = ["--match", "equal-resources", "--r-a", "0.3,0.5", "--json"]
    plans = []
    for n, d in (("2M", "40M"), ("2e6", "4e7"), ("2_000_000", "40_000_000"), ("2000000", "40000000")):
        assert main(["plan", str(path), *er, "--total-params", n, "--unique-tokens", d]) == 0
        plans.append(json.loads(capsys.readouterr().out)["equal_resources"])
    assert all(p == plans[0] for p in plans)
    assert abs(plans[0]["total_params"] - 2_000_000) <= 0.005 * 2_000_000 and plans[0]["unique_tokens"] == 40_000_000
    for flag, bad in (("--total-params", "2Q"), ("--unique-tokens", "lots"), ("--total-params", "2.5")):
        assert main(["plan", str(path), *er, flag, bad]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith(f"megatron-moe: error: {flag} = '{bad}'")
