"""Budget planner: the ledger equals the built megatron-core model (parameters, also with tensor- and
expert-parallel shards summed, and FLOPs counted by torch's FLOP counter); matching; the `plan` command.

Run as a script under torchrun (`--shard-worker OUT`), this file is also the worker of the two-process
shard test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moe.config import ConfigError, MoEConfig, ModelConfig, ParallelConfig, load_run_config
from megatron_moe.schema import changed_fields
from megatron_moe.planner.family import equal_resources_family
from megatron_moe.planner.ledger import COMPONENTS, Ledger, ledger, padded_vocab_size
from megatron_moe.planner.match import CONTRACTS, match_dense
from tests.conftest import REPO



def cfg(**kw) -> ModelConfig:
    """A small model; `moe` takes a dict of MoEConfig fields."""
    moe = MoEConfig(**kw.pop("moe", {}))
    base = dict(vocab_size=1000, seq_length=16, num_layers=3, hidden_size=64, num_attention_heads=4,
                ffn_hidden_size=96, moe=moe)
    return ModelConfig(**{**base, **kw})


MOE = dict(num_experts=4, top_k=2, expert_ffn_hidden_size=48)

# The grid of the "ledger equals the built model" test: GQA, tied/untied, shared experts, first-k-dense,
# every-n-th MoE, LayerNorm + GELU + learned positions, both token dispatchers.
GRID = {
    "dense_mha": cfg(),
    "dense_gqa_tied": cfg(num_query_groups=2, tie_embeddings=True),
    "dense_layernorm_gelu_learned": cfg(
        normalization="LayerNorm", activation="gelu", position_embedding="learned_absolute"
    ),
    "moe_all_layers": cfg(moe=MOE),
    "moe_shared_first_dense_gqa": cfg(
        num_query_groups=2, moe={**MOE, "shared_expert_ffn_hidden_size": 64, "first_k_dense": 1}
    ),
    "moe_every_2nd_tied": cfg(
        num_layers=4, tie_embeddings=True, moe={**MOE, "every_n": 2, "token_dispatcher": "allgather"}
    ),
    "moe_layernorm_gelu_learned_top1": cfg(
        normalization="LayerNorm", activation="gelu", position_embedding="learned_absolute",
        moe={**MOE, "top_k": 1, "topk_renormalize": False, "shared_expert_ffn_hidden_size": 32},
    ),
}


# ---------------------------------------------------------------- closed-form ledger


def test_padded_vocab_size():
    assert padded_vocab_size(cfg(vocab_size=1000)) == 1024
    assert padded_vocab_size(cfg(vocab_size=1024)) == 1024
    assert padded_vocab_size(cfg(vocab_size=1100), tensor=2) == 1280
    assert padded_vocab_size(cfg(vocab_size=1100), tensor=1) == 1152


def test_ledger_by_hand():
    m = cfg(num_query_groups=2, moe={**MOE, "shared_expert_ffn_hidden_size": 64, "first_k_dense": 1})
    led = ledger(m)
    d, v, s = 64, 1024, 16
    assert led.total == {
        "embedding": v * d,
        "attention": 3 * (d * (64 + 2 * 2 * 16) + d * d),
        "dense_mlp": 3 * d * 96,
        "routed_experts": 2 * 4 * 3 * d * 48,
        "shared_experts": 2 * 3 * d * 64,
        "router": 2 * 4 * d,
        "norms": 7 * d,
        "output_layer": v * d,
    }
    assert led.active["routed_experts"] == 2 * 2 * 3 * d * 48
    assert {k: led.active[k] for k in led.active if k != "routed_experts"} == {
        k: led.total[k] for k in led.total if k != "routed_experts"
    }
    assert led.r_a == led.nonembedding_active_params / led.nonembedding_params
    matmul = led.active_params - led.active["embedding"] - led.active["norms"] - led.active["output_layer"] + v * d
    assert led.attention_flops_fwd_per_token == 3 * 4 * s * d
    assert led.flops_fwd_per_token == 2 * matmul + 3 * 4 * s * d
    assert led.flops_train_per_token == 3 * led.flops_fwd_per_token
    assert led.flops_er_per_token == 6 * led.nonembedding_active_params + 12 * d * s * 3
    causal = ledger(m, causal_attention=True)
    assert causal.attention_flops_fwd_per_token == 3 * 2 * (s + 1) * d
    assert ledger(cfg()).r_a == 1.0


def test_equal_resources_worked_check():
    """The study's 7B family (1 dense + 23 MoE layers, D_m 2048, S 2048, mu 21, beta 3) and its 7B dense."""
    moe = ModelConfig(
        vocab_size=65536, seq_length=2048, num_layers=24, hidden_size=2048, num_attention_heads=16,
        ffn_hidden_size=5672,
        moe=MoEConfig(num_experts=26, top_k=2, expert_ffn_hidden_size=1536, shared_expert_ffn_hidden_size=3072,
                      first_k_dense=1),
    )
    led = ledger(moe)
    assert led.nonembedding_params == pytest.approx(6.5e9, rel=0.01)
    assert led.nonembedding_active_params == pytest.approx(1.3e9, rel=0.01)
    assert led.r_a == pytest.approx(0.20, abs=0.005)
    assert led.flops_er_per_token == pytest.approx(9.07e9, rel=0.01)
    dense = ModelConfig(vocab_size=65536, seq_length=2048, num_layers=32, hidden_size=4096, num_attention_heads=32,
                        ffn_hidden_size=11008)
    assert ledger(dense).flops_er_per_token == pytest.approx(4.21e10, rel=0.005)


# ---------------------------------------------------------------- matching


def _diff(a: ModelConfig, b: ModelConfig) -> set[str]:
    return set(changed_fields(a, b, "model"))


@pytest.mark.parametrize("contract", CONTRACTS)
@pytest.mark.parametrize("resize", ["ffn", "ffn+hidden"])
def test_match_dense_residual_and_diff(contract, resize):
    src = ModelConfig(vocab_size=8000, seq_length=256, num_layers=6, hidden_size=256, num_attention_heads=8,
                      num_query_groups=4, ffn_hidden_size=688, moe=MoEConfig(num_experts=8, top_k=2,
                      shared_expert_ffn_hidden_size=256, first_k_dense=1))
    m = match_dense(src, contract, tensor=2, resize=resize)
    # Target, achieved and residual recomputed from the two ledgers, not taken from the match.
    src_led, dense_led = ledger(src, 2), ledger(m.config, 2)
    target, achieved = {
        "active": (src_led.nonembedding_active_params, dense_led.nonembedding_params),
        "total": (src_led.nonembedding_params, dense_led.nonembedding_params),
        "flops": (src_led.flops_train_per_token, dense_led.flops_train_per_token),
    }[contract]
    assert (m.target, m.achieved) == (target, achieved)
    assert m.residual_pct == pytest.approx(100 * (achieved - target) / target, rel=1e-12)
    assert abs(m.residual_pct) < 0.5
    assert not m.config.is_moe
    assert m.config.ffn_hidden_size % 8 == 0 and m.config.hidden_size % 8 == 0
    assert set(m.changed_fields) <= {"model.moe.num_experts", "model.ffn_hidden_size", "model.hidden_size"}
    assert "model.moe.num_experts" in m.changed_fields
    if resize == "ffn":
        assert "model.hidden_size" not in m.changed_fields
    else:  # the FFN/hidden aspect ratio stays near the source's
        assert 0.8 < (m.config.ffn_hidden_size / m.config.hidden_size) / (688 / 256) < 1.25
    # Nothing else differs: restoring the changed fields gives back the source.
    restored = dataclasses.replace(m.config, hidden_size=src.hidden_size, ffn_hidden_size=src.ffn_hidden_size,
                                   moe=dataclasses.replace(m.config.moe, num_experts=src.moe.num_experts))
    assert restored == src
    led = m.ledger
    achieved = {"active": led.nonembedding_params, "total": led.nonembedding_params,
                "flops": led.flops_train_per_token}[contract]
    assert achieved == m.achieved == ledger(m.config, tensor=2).to_dict()[
        "flops_train_per_token" if contract == "flops" else "nonembedding_params"]
    src_led = ledger(src, tensor=2)
    assert m.target == {"active": src_led.nonembedding_active_params, "total": src_led.nonembedding_params,
                        "flops": src_led.flops_train_per_token}[contract]


def _value(led: Ledger, contract: str) -> int:
    return led.flops_train_per_token if contract == "flops" else led.nonembedding_params


def test_match_residual_under_half_percent_across_configs():
    """Whenever one width step moves the matched quantity by under 1%, the residual is under 0.5%."""
    checked = 0
    for layers in (2, 4, 8):
        for hidden, heads in ((128, 4), (256, 8), (512, 8)):
            for e, k, fkd in ((4, 2, 0), (8, 1, 1), (16, 4, 0)):
                src = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                  ffn_hidden_size=hidden * 8 // 3 // 8 * 8,
                                  moe=MoEConfig(num_experts=e, top_k=k, first_k_dense=min(fkd, layers - 1),
                                                topk_renormalize=k > 1))
                for contract in CONTRACTS:
                    m = match_dense(src, contract, multiple_of=8)
                    narrower = dataclasses.replace(m.config, ffn_hidden_size=m.config.ffn_hidden_size - 8)
                    step = _value(m.ledger, contract) - _value(ledger(narrower), contract)
                    if step < 0.01 * m.target:
                        assert abs(m.residual_pct) < 0.5, (src, contract, m.residual_pct)
                        checked += 1
                    else:  # the nearest legal width: no neighbour is closer
                        assert abs(m.achieved - m.target) <= step / 2
    assert checked > 40


def test_dense_source_matches_itself():
    src = cfg(num_query_groups=2)
    for contract in CONTRACTS:
        m = match_dense(src, contract, multiple_of=8)
        assert m.config == src and m.residual_pct == 0 and m.changed_fields == ()


def test_target_below_smallest_width_fails_with_one_line():
    with pytest.raises(ConfigError, match=r"below the smallest legal dense width .* reachable: >= ") as exc:
        match_dense(cfg(moe=MOE), "active", multiple_of=1024)
    assert "\n" not in str(exc.value)


def test_equal_resources_family():
    src = ModelConfig(vocab_size=32000, seq_length=1024, num_layers=12, hidden_size=768, num_attention_heads=12,
                      ffn_hidden_size=2048, moe=MoEConfig(num_experts=32, top_k=4, expert_ffn_hidden_size=512,
                                                          shared_expert_ffn_hidden_size=2048, first_k_dense=1))
    fam = equal_resources_family(src, (0.15, 0.2, 0.3), tokens_per_param=20.0, expert=2)
    n = fam.total_params
    assert fam.dense.ledger.nonembedding_params == n and not fam.dense.config.is_moe
    assert fam.unique_tokens == round(20.0 * n)
    assert fam.compute == fam.dense.ledger.flops_er_per_token * fam.unique_tokens
    assert fam.dense.consumed_tokens == fam.unique_tokens and fam.dense.repeats == 1
    for arm, target in zip(fam.members, (0.15, 0.2, 0.3)):
        e = arm.config.moe
        achieved = ledger(arm.config, 1).nonembedding_params
        assert arm.params_residual_pct == pytest.approx(100 * (achieved - n) / n, rel=1e-12)
        assert abs(arm.params_residual_pct) <= 0.5
        assert abs(arm.r_a - target) <= 0.1 * target
        assert e.shared_expert_ffn_hidden_size == e.top_k * e.expert_ffn_hidden_size
        assert e.num_experts % 2 == 0 and e.expert_ffn_hidden_size % 8 == 0
        assert (arm.config.num_layers, arm.config.hidden_size, arm.config.ffn_hidden_size, e.first_k_dense) == (
            12, 768, 2048, 1)
        assert arm.flops_per_token == arm.ledger.flops_er_per_token
        assert 0 <= fam.compute - arm.consumed_tokens * arm.flops_per_token < arm.flops_per_token
        assert arm.repeats == arm.consumed_tokens / fam.unique_tokens > 1
    # lower r_a: cheaper tokens, more of them
    assert fam.members[0].consumed_tokens > fam.members[1].consumed_tokens > fam.members[2].consumed_tokens
    with pytest.raises(ConfigError, match=r"r_a = 0.01 is not reachable .* reachable r_a: ") as exc:
        equal_resources_family(src, (0.01,))
    assert "\n" not in str(exc.value)


def test_planner_does_not_import_torch():
    code = ("import sys, megatron_moe.planner.plan, megatron_moe.planner.format, megatron_moe.study.design, "
            "megatron_moe.cli; megatron_moe.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_planning_is_fast():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from bench_planner import bench
    finally:
        sys.path.pop(0)
    seconds = bench(1000)
    assert seconds < 2.0  # the benchmark itself shows well under a second; slack for busy CI machines


# ---------------------------------------------------------------- the plan command


def _write_run_config(path: Path) -> Path:
    path.write_text(
        "[model]\nvocab_size = 4096\nseq_length = 128\nnum_layers = 4\nhidden_size = 128\nnum_attention_heads = 4\n"
        "ffn_hidden_size = 344\n\n[model.moe]\nnum_experts = 4\ntop_k = 2\nshared_expert_ffn_hidden_size = 64\n\n"
        "[parallel]\nexpert = 2\n\n[train]\ntrain_steps = 100\n"
    )
    return path


def test_plan_command_json_and_write_dir(tmp_path, capsys):
    from megatron_moe.cli import main

    path = _write_run_config(tmp_path / "run.toml")
    assert main(["plan", str(path), "--json", "--write-dir", str(tmp_path / "plan")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [m["contract"] for m in plan["matches"]] == ["active", "total", "flops"]
    assert plan["ledger"]["total_params"] == ledger(load_run_config(path).model).total_params
    source = load_run_config(tmp_path / "plan" / "source.toml")
    assert source == load_run_config(path)
    for m in plan["matches"]:
        arm = load_run_config(tmp_path / "plan" / f"dense_{m['contract']}.toml")
        assert arm.data == source.data and arm.train == source.train
        assert arm.parallel == dataclasses.replace(source.parallel, expert=1)
        assert set(changed_fields(source.model, arm.model, "model")) == set(m["changed_fields"])
        assert abs(m["residual_pct"]) < 0.5


def test_plan_command_table_and_errors(tmp_path, capsys):
    from megatron_moe.cli import main

    path = _write_run_config(tmp_path / "run.toml")
    assert main(["plan", str(path), "--match", "active"]) == 0
    out = capsys.readouterr().out
    for word in ("routed_experts", "r_a = N_a / N", "FLOPs/token", "active non-embedding parameters"):
        assert word in out
    assert main(["plan", str(path), "--multiple-of", "4096"]) == 2
    err = capsys.readouterr().err.strip()
    assert "reachable" in err and "\n" not in err
    assert main(["plan", str(path), "--match", "equal-resources", "--r-a", "0.02"]) == 2
    assert "reachable r_a" in capsys.readouterr().err
    er = ["--match", "equal-resources", "--r-a", "0.3", "--write-dir", str(tmp_path / "er")]
    assert main(["plan", str(path), *er]) == 0
    assert "epochs" in capsys.readouterr().out
    assert load_run_config(tmp_path / "er" / "er_moe_ra0.30.toml").model.moe.num_experts % 2 == 0


@pytest.mark.parametrize("source", ["moe", "dense"])
@pytest.mark.parametrize("flags, named", [
    (["--total-params", "-5"], "total_params = -5"),
    (["--total-params", "0"], "total_params = 0"),
    (["--unique-tokens", "-1"], "unique_tokens = -1"),
    (["--multiple-of", "0"], "multiple_of = 0"),
    (["--multiple-of", "-8"], "multiple_of = -8"),
    (["--top-k", "-1"], "top_k = -1"),
    (["--top-k", "2,0"], "top_k = 0"),
    (["--max-experts", "-3"], "max_experts = -3"),
    (["--tokens-per-param", "nan"], "tokens_per_param = nan"),
    (["--tokens-per-param", "inf"], "tokens_per_param = inf"),
    (["--tokens-per-param", "-1"], "tokens_per_param = -1"),
    (["--r-a", "0.2,nan"], "r_a = nan"),
    (["--r-a", "1.5"], "r_a = 1.5"),
    (["--r-a="], "r_a = []"),
])
def test_plan_equal_resources_bad_input_exits_2(tmp_path, capsys, source, flags, named):
    """Out-of-range equal-resources options: exit 2, one line naming the value, the flag and the study field."""
    from megatron_moe.cli import main

    path = _write_run_config(tmp_path / "run.toml")
    overrides = ["model.moe.num_experts=0", "parallel.expert=1"] if source == "dense" else []
    assert main(["plan", str(path), *overrides, "--match", "equal-resources", *flags]) == 2
    out, err = capsys.readouterr()
    field = named.split(" = ")[0]
    assert out == "" and err.startswith("megatron-moe: error: ") and err.count("\n") == 1
    assert f"equal-resources {named} is not allowed" in err
    assert f"--{field.replace('_', '-')}" in err and f"study.equal_resources.{field}" in err


@pytest.mark.parametrize("value", ["0", "-8"])
def test_plan_match_bad_multiple_of_exits_2(tmp_path, capsys, value):
    from megatron_moe.cli import main

    path = _write_run_config(tmp_path / "run.toml")
    assert main(["plan", str(path), "--match", "active", "--multiple-of", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"multiple_of = {value} must be >= 1" in err and "--multiple-of" in err


def test_plan_equal_resources_unreachable_n_is_an_error(tmp_path, capsys):
    """No MoE layout at this backbone reaches a small N: an error naming r_a, the nearest residual and the
    smallest N a layout has, never arms silently off equal N."""
    from megatron_moe.cli import main

    path = _write_run_config(tmp_path / "run.toml")
    assert main(["plan", str(path), "--match", "equal-resources", "--total-params", "300000", "--r-a", "0.6,0.7"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    found = re.search(r"arm r_a = 0.6: no MoE layout has N within tolerance_pct = 0.5% of the dense baseline's "
                      r"N = ([\d.]+)k .* \(nearest: \+([\d.]+)% at r_a [\d.]+\); the smallest MoE layout has "
                      r"N = ([\d.]+)k: raise total_params \(plan --total-params", err)
    assert found, err
    n, resid, smallest = map(float, found.groups())
    assert resid > 0.5 and smallest > n
    # a family whose N a layout can reach still derives, every arm within the tolerance
    fam = equal_resources_family(load_run_config(path).model, (0.6, 0.7), total_params=round(2 * smallest * 1e3))
    assert all(abs(m.params_residual_pct) <= 0.5 for m in fam.members)


# ---------------------------------------------------------------- against the built model (torch)


def _unique_params(model):
    seen: dict[int, tuple[str, object]] = {}
    for name, p in model.named_parameters():
        seen.setdefault(id(p), (name, p))
    return list(seen.values())


@pytest.mark.parametrize("name", list(GRID))
def test_ledger_equals_built_model(single_process, name):
    from megatron_moe.model import build_model, component_of

    m = GRID[name]
    model = build_model(m, ParallelConfig())
    led = ledger(m)
    counts = dict.fromkeys(COMPONENTS, 0)
    for pname, p in _unique_params(model):
        counts[component_of(pname)] += p.numel()
    assert counts == led.total
    assert sum(p.numel() for _, p in _unique_params(model)) == led.total_params


@pytest.mark.parametrize("name", ["dense_gqa_tied", "dense_layernorm_gelu_learned", "moe_shared_first_dense_gqa",
                                  "moe_every_2nd_tied", "moe_layernorm_gelu_learned_top1"])
def test_flops_equal_torch_flop_counter(single_process, name):
    import torch
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_moe.model import build_model

    m = GRID[name]
    model = build_model(m, ParallelConfig())
    # megatron-core's global aux-loss tracker is sized by the first MoE model that ran in this process.
    get_moe_layer_wise_logging_tracker().clear()
    batch = 3
    tokens = torch.randint(0, m.vocab_size, (batch, m.seq_length))
    positions = torch.arange(m.seq_length).unsqueeze(0).expand(batch, -1)
    # The counter has no formula for the fused CPU attention kernel: count attention through SDPA's math
    # backend, which computes the same products as matmuls.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forward = FlopCounterMode(display=False)
    with forward, sdpa_kernel(SDPBackend.MATH):
        loss = model(tokens, positions, None, labels=tokens)
    training = FlopCounterMode(display=False)
    with training, sdpa_kernel(SDPBackend.MATH):
        model(tokens, positions, None, labels=tokens).mean().backward()
    led = ledger(m)
    assert forward.get_total_flops() == led.flops_fwd_per_token * batch * m.seq_length
    assert training.get_total_flops() == led.flops_train_per_token * batch * m.seq_length
    assert torch.isfinite(loss).all()


# ---------------------------------------------------------------- shards summed over two processes

SHARD_MODEL = cfg(vocab_size=1100, num_query_groups=2,
                  moe={**MOE, "shared_expert_ffn_hidden_size": 64, "first_k_dense": 1, "token_dispatcher": "allgather"})
SHARD_LAYOUTS = ((2, 1), (1, 2))  # (tensor, expert) on two ranks
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def _shard_worker(out: str) -> None:
    """torchrun worker: this rank's parameters (global name, shard index, numel) under each layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_moe.model import build_model, component_of
    from megatron_moe.parallel import destroy_parallel, initialize_parallel
    from megatron_moe.platform import seed_everything, setup_platform

    device = setup_platform()
    result = {}
    for tensor, expert in SHARD_LAYOUTS:
        par = ParallelConfig(tensor=tensor, expert=expert)
        info = initialize_parallel(par, device)
        seed_everything(0, info.tp_rank, info.ep_rank)
        model = build_model(SHARD_MODEL, par)
        local_experts = SHARD_MODEL.moe.num_experts // expert
        rows = []
        for name, p in _unique_params(model):
            routed = ".experts." in name and ".shared_experts." not in name
            gname = _LOCAL_EXPERT.sub(lambda x: f".experts.{int(x.group(1)) + info.ep_rank * local_experts}.", name)
            if getattr(p, "tensor_model_parallel", False):
                shard = ps.get_expert_tensor_parallel_rank() if routed else info.tp_rank
            else:
                shard = 0  # replicated: every rank holds the same tensor
            rows.append((gname, shard, p.numel(), component_of(name)))
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        result[f"{tensor}x{expert}"] = gathered
        del model
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    destroy_parallel()


@pytest.mark.slow
def test_sharded_counts_sum_to_ledger(tmp_path):
    """Tensor parallel 2 and expert parallel 2: unique shards summed over ranks equal the ledger."""
    out = tmp_path / "shards.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           "--shard-worker", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for tensor, expert in SHARD_LAYOUTS:
        ranks = result[f"{tensor}x{expert}"]
        unique: dict[tuple[str, int], tuple[int, str]] = {}
        for rows in ranks:
            for gname, shard, numel, component in rows:
                assert unique.setdefault((gname, shard), (numel, component)) == (numel, component)
        counts = dict.fromkeys(COMPONENTS, 0)
        for numel, component in unique.values():
            counts[component] += numel
        led = ledger(SHARD_MODEL, tensor=tensor)
        assert counts == led.total, (tensor, expert)
        # Each rank really holds a part: no rank has everything under either layout.
        per_rank = [sum(r[2] for r in rows) for rows in ranks]
        assert all(n < led.total_params for n in per_rank)
    assert ledger(SHARD_MODEL, tensor=2).padded_vocab_size == 1280


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--shard-worker":
        _shard_worker(sys.argv[2])
