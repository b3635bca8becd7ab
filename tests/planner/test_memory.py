"""The memory estimate: bytes per parameter, and the per-GPU weights, gradients and optimizer state against the
tensors a built model and optimizer hold, across layouts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_moe.config import load_run_config
from megatron_moe.planner.memory import CHECKPOINT_STATE, estimate_memory, minimum_world_size, state_bytes
from tests.conftest import HANG_S, REPO, TINY_MOE


def test_bytes_per_parameter_by_precision():
    # fp32: weights 4 + gradients 4 + Adam moments 8; bf16 adds fp32 main weights (4) to 2-byte weights, fp8 too
    assert state_bytes(1000, "fp32") == 16_000 and state_bytes(1000, "bf16") == 18_000 == state_bytes(1000, "fp8")
    # a checkpoint holds no gradients
    assert state_bytes(1000, "fp32", CHECKPOINT_STATE) == 12_000 and state_bytes(1000, "bf16", CHECKPOINT_STATE) == 14_000


# A model big enough that megatron-core's buffer padding (a few elements per parameter) stays well under 1%.
MODEL = [*TINY_MOE, "model.hidden_size=128", "model.ffn_hidden_size=256", "model.vocab_size=2048",
         "model.moe.expert_ffn_hidden_size=128", "train.train_steps=2"]
LAYOUTS = {
    "single": (1, []),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "ep2-distopt": (2, ["parallel.expert=2", "train.distributed_optimizer=true"]),
    "pp2-tied-dense-first": (2, ["parallel.pipeline=2", "model.tie_embeddings=true", "model.moe.first_k_dense=1"]),
    # Two chunks per rank: rank 0 holds layers 1 and 3 (one dense, one MoE), rank 1 layers 2 and 4 (likewise); without
    # the chunks rank 0 would hold both dense layers.
    "pp2-vpp2-two-dense": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2", "model.num_layers=4",
                               "model.moe.first_k_dense=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_estimate_equals_what_a_built_model_and_optimizer_hold(tmp_path, layout):
    nproc, overrides = LAYOUTS[layout]
    args = [*MODEL, *overrides, f"train.output_dir={tmp_path / 'run'}"]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    out = tmp_path / "held"
    subprocess.run([*launcher, str(REPO / "tests" / "workers" / "memory.py"), str(out), *args], cwd=REPO, check=True,
                   capture_output=True, timeout=HANG_S)
    estimate = estimate_memory(load_run_config(None, args, world_size=nproc), nproc, precision="fp32")
    for rank in range(nproc):
        held = json.loads((tmp_path / f"held.{rank}").read_text())
        stage = estimate.stages[held["pp_rank"]]
        for part in ("weights", "grads", "optimizer"):
            want = getattr(stage, part)
            assert abs(held[part] - want) <= 0.01 * want, f"rank {rank} {part}: held {held[part]:,}, estimated {want:,}"
        assert held["weights"] == stage.weights  # parameters themselves carry no padding: exact


DENSE = ["model.vocab_size=1024", "model.seq_length=32", "model.num_layers=2", "model.hidden_size=64",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.ffn_hidden_size=128",
         "train.micro_batch_size=2", "train.global_batch_size=8"]


def test_activations_follow_the_documented_formula():
    # Per token and layer in fp32 (4 bytes): attention block 2 x 64 (norm in and out) x 4 = 512, softmax statistics
    # 4 heads x 4 = 16, Q, K, V and output ((4 + 2 x 2) x 16 + 64) x 4 = 768; FFN block 512 (norm) + 3 x 128 x 4 =
    # 1536 (gated up projection and activation): 3344 bytes. 2 layers x 64 tokens, plus the logits' fp32 softmax
    # 4 x 1024 x 64 = 262,144.
    est = estimate_memory(load_run_config(None, DENSE), 1, precision="fp32")
    assert est.per_gpu.activations == 3344 * 2 * 64 + 262_144
    # Full recomputation keeps each layer's input (64 x 4 bytes per token, 2 layers) and recomputes one layer at a time.
    full = estimate_memory(load_run_config(None, [*DENSE, "train.recompute_granularity=full"]), 1, precision="fp32")
    assert full.per_gpu.activations == 2 * 256 * 64 + 3344 * 64 + 262_144
    # bf16 halves every tensor but the fp32 softmax statistics and logits
    bf16 = estimate_memory(load_run_config(None, DENSE), 1, precision="bf16")
    assert bf16.per_gpu.activations == ((3344 - 16) // 2 + 16) * 2 * 64 + 262_144


def test_a_stage_holds_its_layers_chunk_by_chunk():
    from megatron_moe.planner.memory import stage_layers

    cfg = load_run_config(None, [*DENSE, "model.num_layers=8", "parallel.pipeline=2"])
    assert [stage_layers(cfg, k) for k in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Two virtual stages: chunks of 2 layers, stage 0 runs the first and the third, stage 1 the second and the fourth.
    vpp = load_run_config(None, [*DENSE, "model.num_layers=8", "parallel.pipeline=2", "parallel.virtual_pipeline=2"])
    assert [stage_layers(vpp, k) for k in (0, 1)] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_layout_splits_what_it_should():
    cfg = load_run_config(None, [*DENSE, "model.num_layers=4"])
    one = estimate_memory(cfg, 1, precision="bf16").per_gpu
    # Sequence parallelism splits every activation over the tensor ranks; without it the norms' stay whole.
    tp = load_run_config(None, [*DENSE, "model.num_layers=4", "parallel.tensor=2"])
    sp = load_run_config(None, [*DENSE, "model.num_layers=4", "parallel.tensor=2", "parallel.sequence_parallel=true"])
    assert estimate_memory(sp, 2).per_gpu.activations < estimate_memory(tp, 2).per_gpu.activations < one.activations
    # The first of 2 pipeline stages holds 2 micro-batches in flight (1F1B), the last one; with 4 micro-batches per
    # step and 1 data-parallel rank.
    pp = estimate_memory(load_run_config(None, [*DENSE, "model.num_layers=4", "parallel.pipeline=2"]), 2)
    assert pp.micro_batches_in_flight == 2
    first, last = pp.stages
    logits = 4 * 1024 * 64
    assert first.activations == 2 * (last.activations - logits)
    # Two virtual stages (chunks of 1 layer): megatron-core's interleaved warm-up leaves stage 0 with 2 (2 - 0 - 1) +
    # (2 - 1) 2 + 1 = 5 chunk micro-batches of one layer each, 2.5 micro-batches of its 2 layers (2 x (1 + 1/4),
    # Korthikanti et al.'s factor), and stage 1 with 3.
    vpp = estimate_memory(load_run_config(None, [*DENSE, "model.num_layers=4", "parallel.pipeline=2",
                                                 "parallel.virtual_pipeline=2"]), 2, precision="fp32")
    assert vpp.micro_batches_in_flight == 2.5
    assert [s.activations for s in vpp.stages] == [5 * 3344 * 64, 3 * 3344 * 64 + logits]
    # Full recomputation in chunks of 3 layers, 2 layers per unit: each chunk micro-batch keeps 2 units' inputs (64 x 4
    # bytes per token each), and the backward pass recomputes one 2-layer unit at a time.
    full = estimate_memory(load_run_config(None, [*DENSE, "model.num_layers=12", "parallel.pipeline=2",
                                                  "parallel.virtual_pipeline=2", "train.recompute_granularity=full",
                                                  "train.recompute_num_layers=2"]), 2, precision="fp32")
    assert [s.activations for s in full.stages] == [5 * 2 * 256 * 64 + 2 * 3344 * 64,
                                                    3 * 2 * 256 * 64 + 2 * 3344 * 64 + logits]
    # The distributed optimizer splits the optimizer state over the data-parallel ranks, nothing else.
    dist = estimate_memory(load_run_config(None, [*DENSE, "train.distributed_optimizer=true"]), 4,
                           precision="bf16").per_gpu
    plain = estimate_memory(load_run_config(None, DENSE), 4, precision="bf16").per_gpu
    assert dist.optimizer == -(-plain.optimizer // 4) and (dist.weights, dist.grads) == (plain.weights, plain.grads)
    assert plain.optimizer == plain.params * 12  # fp32 main weights and two Adam moments


def test_minimum_world_size_is_what_expert_parallelism_needs():
    cfg = load_run_config(None, [*TINY_MOE, "parallel.expert=4", "parallel.tensor=2", "parallel.sequence_parallel=true"])
    assert minimum_world_size(cfg) == 4  # tensor 2 x data 2: data x tensor divisible by expert 4
