"""Bytes a run holds per parameter: the one table every memory and checkpoint-size estimate reads."""

from __future__ import annotations

PARAM_BYTES = {
    "fp32": {"weights": 4, "main_weights": 0, "grads": 4, "adam": 8},
    "bf16": {"weights": 2, "main_weights": 4, "grads": 4, "adam": 8},
}
"""Per parameter, by training precision (fp8 trains bf16 weights): the model's weights; the fp32 main weights the
optimizer updates when those are bf16; the gradient buffer (megatron-core reduces gradients in fp32); Adam's two
fp32 moments."""

TRAINING_STATE = ("weights", "main_weights", "grads", "adam")
"""What training holds per parameter, before activations and sharding."""
CHECKPOINT_STATE = ("weights", "main_weights", "adam")
"""What a checkpoint holds per parameter (gradients are not saved)."""


def state_bytes(params: int, precision: str, parts: tuple[str, ...] = TRAINING_STATE) -> int:
    """Bytes of `parts` of the state for `params` parameters trained in `precision` (fp32, bf16 or fp8)."""
    table = PARAM_BYTES["fp32" if precision == "fp32" else "bf16"]
    return params * sum(table[p] for p in parts)
