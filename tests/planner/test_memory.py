"""Bytes per parameter: one table, read by the out-of-memory message and the checkpoint size estimate."""

from __future__ import annotations

from megatron_moe.planner.memory import CHECKPOINT_STATE, state_bytes


def test_bytes_per_parameter_by_precision():
    # fp32: weights 4 + gradients 4 + Adam moments 8; bf16 adds fp32 main weights (4) to 2-byte weights, fp8 too
    assert state_bytes(1000, "fp32") == 16_000 and state_bytes(1000, "bf16") == 18_000 == state_bytes(1000, "fp8")
    # a checkpoint holds no gradients
    assert state_bytes(1000, "fp32", CHECKPOINT_STATE) == 12_000 and state_bytes(1000, "bf16", CHECKPOINT_STATE) == 14_000
