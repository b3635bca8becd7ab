"""Benchmark: the plain-PyTorch baseline is the same model, and `megatron-moe bench` measures and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_moe.bench.baseline import plain_model
from megatron_moe.bench.measure import cases_for, markdown
from megatron_moe.config import MoEConfig, ModelConfig
from megatron_moe.planner.ledger import ledger
from tests.conftest import REPO, TINY_MOE, cli


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(vocab_size=1000, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128),
        ModelConfig(vocab_size=1000, num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                    normalization="LayerNorm", activation="gelu", position_embedding="learned_absolute", tie_embeddings=True),
        ModelConfig(vocab_size=1000, num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=1, ffn_hidden_size=128,
                    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=48, shared_expert_ffn_hidden_size=32, first_k_dense=1)),
    ],
    ids=["dense", "gelu-layernorm-tied-learned", "moe-shared-first-dense"],
)
def test_plain_baseline_has_the_planned_parameters_and_trains(model):
    """Same parameter count as the planner's ledger (which equals megatron-core's model), and it learns."""
    torch.manual_seed(0)
    net = plain_model(model)
    assert sum(p.numel() for p in net.parameters()) == ledger(model, 1).total_params
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    tokens = torch.randint(0, 50, (4, model.seq_length + 1))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        lm, total = net(tokens[:, :-1], tokens[:, 1:])
        total.backward()
        opt.step()
        losses.append(lm.item())
    assert losses[-1] < losses[0] - 1.0
    if model.is_moe:
        assert total.item() > lm.item()  # aux + z losses are added to the objective, not to the LM loss


def test_compiled_baseline_computes_what_eager_does():
    """On GPU `bench` times the plain model under torch.compile by default; checked here on CPU: same LM
    loss, same objective (the MoE's aux losses are a module attribute set in forward) and same gradients.
    Run in a fresh process, as bench runs the baseline: this pytest process may hold the CPU layer's
    torch-function mode, under which nothing of ours is compiled."""
    code = "from tests.bench.test_bench import compiled_equals_eager; compiled_equals_eager()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]


def compiled_equals_eager():
    model = ModelConfig(vocab_size=1000, seq_length=32, num_layers=2, hidden_size=64, num_attention_heads=4,
                        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=48))
    torch.manual_seed(0)
    net = plain_model(model)
    tokens = torch.randint(0, 1000, (2, model.seq_length + 1))
    results = []
    for fn in (net, torch.compile(net)):
        net.zero_grad()
        lm, total = fn(tokens[:, :-1], tokens[:, 1:])
        total.backward()
        results.append((lm.item(), total.item(), [p.grad.clone() for p in net.parameters()]))
    (lm_e, total_e, grads_e), (lm_c, total_c, grads_c) = results
    assert lm_c == pytest.approx(lm_e, rel=1e-5) and total_c == pytest.approx(total_e, rel=1e-5) and total_e > lm_e
    for a, b in zip(grads_e, grads_c):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_cases_of_a_run_config_and_of_a_study():
    cases, name = cases_for(None, TINY_MOE)
    assert name == "default" and [c.name for c in cases] == ["moe", "dense_active"]
    assert cases[0].reference == "dense_active" and not cases[1].config.model.is_moe
    assert ledger(cases[1].config.model).active_params == pytest.approx(ledger(cases[0].config.model).active_params, rel=0.01)
    cases, name = cases_for(str(REPO / "examples/tiny_three_arm/cpu.toml"), [])
    moe = [c for c in cases if c.config.model.is_moe]
    assert moe and all(c.reference == "dense_active" for c in moe)


@pytest.mark.slow
def test_bench_cli_measures_both_paths_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    proc = cli("bench", *TINY_MOE, "parallel.expert=2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--out", str(out))
    assert "[4/4]" in proc.stdout  # progress: 2 models x 2 paths
    assert "layout (tensor 1, pipeline 1, expert 2) is set to 1" in proc.stdout  # one device, said so
    result = json.loads((out / "bench.json").read_text())
    assert result["device_label"] == "CPU" and result["baseline"] == "eager" and result["peak_flops"] is None
    moe, dense = result["cases"]
    for case in (moe, dense):
        for path in ("megatron", "eager"):
            assert case[path]["tokens_per_s"] > 0 and case[path]["mfu"] is None
            assert case[path]["tokens_per_s"] == pytest.approx(case["tokens_per_step"] / case[path]["step_s"])
        assert case["megatron_over_baseline"] == pytest.approx(case["megatron"]["tokens_per_s"] / case["eager"]["tokens_per_s"])
    assert moe["step_over_reference_step"] == pytest.approx(moe["megatron"]["step_s"] / dense["megatron"]["step_s"])
    table = (out / "bench.md").read_text()
    assert table.strip() == markdown(result) and "on CPU:" in table and "| moe |" in table
    assert "vs dense_active" in table


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baseline", "jit"], "--baseline 'jit' is not one of auto, eager, compile, none"),
        (["--steps", "0"], "--steps 0 must be >= 1"),
        (["model.moe.capacity_factor=1.5"], "the plain-PyTorch baseline is dropless"),
        (["model.hidden_size=-4"], "model.hidden_size"),
    ],
)
def test_bench_bad_input_is_one_line(args, message, tmp_path):
    proc = cli("bench", *TINY_MOE, *args, "--out", str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()
