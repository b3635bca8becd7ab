"""The CPU platform layer: each patch does what megatron-core needs, and only on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is only applied without CUDA")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    from megatron_moe.platform import setup_platform

    assert setup_platform() == torch.device("cpu")


def test_cuda_devices_and_calls_land_on_cpu():
    assert torch.zeros(3, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    x = torch.ones(2)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")
    assert x.type() == "torch.cuda.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64  # a conversion, untouched


def test_streams_are_inert():
    """What the all-to-all dispatcher and shared-expert overlap do with streams runs, and work done "on" a side
    stream is done at once."""
    stream = torch.cuda.Stream()
    x = torch.ones(2)
    with torch.cuda.stream(stream):
        y = x * 2
    stream.wait_stream(torch.cuda.current_stream())
    event = stream.record_event()
    event.synchronize()
    torch.cuda.synchronize()
    assert event.query() and torch.equal(y, torch.full((2,), 2.0))
    assert torch.cuda.current_stream() == torch.cuda.current_stream() == stream  # one stream, hashable as a key
    assert {stream: 1}[torch.cuda.current_stream()] == 1


def test_rng_tracker_forks_cpu_generator():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_moe.platform import seed_everything

    seed_everything(5, tp_rank=1, ep_rank=0)
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(0)
    outer = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer)  # outer stream untouched
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b)  # the named state advanced
    seed_everything(5, tp_rank=0, ep_rank=0)
    with get_cuda_rng_tracker().fork():
        c = torch.rand(4)
    assert not torch.equal(a, c)  # tensor-parallel ranks draw differently
    states = get_cuda_rng_tracker().get_states()
    assert {"model-parallel-rng", "data-parallel-rng", "expert-parallel-rng"} <= set(states)


def test_router_gemm_name_defined():
    from megatron.core.transformer.moe import moe_utils

    assert moe_utils.te_general_gemm is None


def test_missing_transformer_engine_is_answered_on_gpu_too():
    """A CUDA machine without Transformer Engine gets the router's missing name but none of the CPU layer.

    Run in a fresh process that claims to have CUDA: the CPU layer's patches are process-wide once applied.
    """
    import subprocess
    import sys

    code = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
from megatron_moe import platform
device = platform.setup_platform()
from megatron.core.transformer.moe import moe_utils
assert device == torch.device("cuda", 0), device
assert moe_utils.te_general_gemm is None
assert not platform._ENABLED, "the CPU layer must not be applied when CUDA is there"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_gpu_backend_carries_the_loops_cpu_collectives():
    """On GPU the loop still all-reduces CPU tensors (loss totals, expert load, stop agreement): the backend must
    map CPU tensors to gloo, and CUDA tensors to NCCL."""
    from megatron_moe.parallel import backend_for

    spec = dict(part.split(":") for part in backend_for(torch.device("cuda", 0)).split(","))
    assert spec == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_for(torch.device("cpu")) == "gloo"
