"""RNG state in checkpoints: saved as tensors only, and restoring it replays the same random numbers."""

from __future__ import annotations

import io

import torch


def test_rng_states_round_trip_through_a_weights_only_file(single_process):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_moe.train.checkpoint import _rng_state, _set_rng_state

    def draws() -> list[torch.Tensor]:
        out = [torch.rand(4)]
        with get_cuda_rng_tracker().fork():  # the model-parallel stream dropout uses
            out.append(torch.rand(4))
        return out

    buffer = io.BytesIO()
    torch.save(_rng_state(), buffer)
    expected = draws()
    torch.manual_seed(1234)  # perturb both streams
    with get_cuda_rng_tracker().fork():
        torch.rand(7)
    assert not torch.equal(draws()[0], expected[0])
    buffer.seek(0)
    _set_rng_state(torch.load(buffer, weights_only=True))
    for got, want in zip(draws(), expected):
        assert torch.equal(got, want)
