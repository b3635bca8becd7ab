"""GPU path: bf16, Transformer Engine spec, FP8, all-to-all expert parallelism, grouped GEMM, bench.

Marked `gpu` and skipped without CUDA, so CI (CPU-only) skips them; `tools/gpu_check.sh` runs them on a
GPU machine. Tests that need Transformer Engine, a Hopper GPU or two GPUs skip with the reason when those
are missing.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_moe.model import have_transformer_engine
from tests.conftest import TINY_MOE, cli, train_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run tools/gpu_check.sh on a GPU machine)"),
]


needs_te = pytest.mark.skipif(not have_transformer_engine(), reason="Transformer Engine is not installed")
needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="FP8 needs compute capability 9.0+"
)
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")

GPU_MOE = [*TINY_MOE, "model.seq_length=128", "model.hidden_size=128", "train.train_steps=30", "train.lr=5e-3", "train.log_interval=5"]


def _train(tmp_path, *extra: str, nproc: int = 1) -> list[dict]:
    cli("train", *GPU_MOE, *extra, f"train.output_dir={tmp_path}", nproc=nproc)
    return train_rows(tmp_path)


LOSS_DROP = 1.0
"""Loss fall from the first logged step (5) to the last (30) that GPU_MOE must show. The same config fell 1.47 on CPU
in fp32 and 1.49 through the bf16 code path; 1.0 leaves about 0.5 nats for bf16 kernels and reduction order."""


def test_bf16_moe_trains_and_reports_throughput(tmp_path):
    from megatron_moe.train.monitors import peak_flops

    rows = _train(tmp_path)  # precision auto -> bf16 on CUDA
    assert rows[-1]["loss"] < rows[0]["loss"] - LOSS_DROP, [r["loss"] for r in rows]
    assert all(r["tflops_per_device"] > 0 and r["gpu_mem_allocated_peak_gib"] > 0 for r in rows)
    assert all(r["gpu_mem_reserved_peak_gib"] >= r["gpu_mem_allocated_peak_gib"] for r in rows)
    if peak_flops(torch.cuda.get_device_name(), fp8=False):
        assert all(0 < r["mfu"] < 1 for r in rows)


def test_layer_spec_uses_transformer_engine_when_installed(single_process):
    from megatron_moe.config import ModelConfig, MoEConfig, ParallelConfig
    from megatron_moe.model import build_model

    m = ModelConfig(vocab_size=1000, seq_length=32, num_layers=2, hidden_size=64, num_attention_heads=4,
                    moe=MoEConfig(num_experts=4, top_k=2))
    model = build_model(m, ParallelConfig(), params_dtype=torch.bfloat16)
    core = type(model.decoder.layers[0].self_attention.core_attention).__name__
    assert core == ("TEDotProductAttention" if have_transformer_engine() else "SDPAttention")
    assert next(model.parameters()).is_cuda


@needs_te
@needs_hopper
def test_fp8_trains(tmp_path):
    rows = _train(tmp_path, "train.precision=fp8", "model.moe.grouped_gemm=true")
    assert rows[-1]["loss"] < rows[0]["loss"] - LOSS_DROP, [r["loss"] for r in rows]


@needs_te
def test_grouped_gemm_matches_sequential_experts(tmp_path):
    seq = _train(tmp_path / "seq", "train.train_steps=3", "train.log_interval=1")
    grouped = _train(tmp_path / "grouped", "train.train_steps=3", "train.log_interval=1", "model.moe.grouped_gemm=true")
    # Same initial weights (init_name maps grouped to sequential expert names) and tokens; bf16 GEMM order
    # differs, so allow bf16-level differences.
    for a, b in zip(seq, grouped):
        assert abs(a["loss"] - b["loss"]) < 2e-2, (a["loss"], b["loss"])


@needs_two
def test_expert_parallel_all_to_all_matches_one_gpu(tmp_path):
    one = _train(tmp_path / "one", "train.train_steps=4", "train.log_interval=1")
    two = _train(tmp_path / "ep2", "train.train_steps=4", "train.log_interval=1", "parallel.expert=2",
                 "model.moe.token_dispatcher=alltoall", nproc=2)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 2e-2, (a["loss"], b["loss"])


def test_bench_on_gpu_reports_tflops_and_compiled_baseline(tmp_path):
    out = tmp_path / "bench"
    cli("bench", *TINY_MOE, "--steps", "3", "--warmup", "2", "--repeats", "1", "--out", str(out), timeout=900)
    result = json.loads((out / "bench.json").read_text())
    assert result["baseline"] == "compile" and result["precision"] == "bf16"
    assert result["device"] == torch.cuda.get_device_name()
    for case in result["cases"]:
        assert case["megatron"]["tflops_per_device"] > 0 and case["compile"]["tokens_per_s"] > 0
