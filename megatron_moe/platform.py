"""Platform layer: the one place that patches megatron-core 0.16.1, so that it runs without CUDA or without
Transformer Engine.

`setup_platform()` applies, on any device, the one fix megatron-core needs when Transformer Engine is not
importable (item 5 below: every MoE forward needs it, on GPU too). Only when `torch.cuda.is_available()` is
false does it also apply `enable_cpu()`, which answers megatron-core's CUDA assumptions (see README,
"Running on CPU"). Each patch names the megatron-core code it answers:

1. `torch.cuda.current_device()` is used as a device (rotary embedding, MoE router, attention buffers):
   it returns the CPU device.
2. Literal `device="cuda"` and `.cuda()` calls (optimizer, gradient clipping, pipeline schedules, MoE aux
   loss tracker, attention masks): a `TorchFunctionMode` rewrites a CUDA device argument to CPU. The same
   mode answers `tensor.type()` with the CUDA type name, since the optimizers and gradient clipping check
   dtypes by comparing against strings like 'torch.cuda.FloatTensor'.
3. CUDA streams and events (all-to-all token dispatcher, shared-expert overlap): a single fake stream and
   event that do nothing, and `synchronize`/`empty_cache` become no-ops.
4. The RNG tracker (`tensor_parallel/random.py`) reads and writes the CUDA generator: a tracker that forks
   the CPU generator with the same data-, tensor- and expert-parallel states replaces it.
5. `moe_utils.te_general_gemm` is read by the router's gating linear on every call but defined only when
   Transformer Engine imports (a 0.16.1 bug): without Transformer Engine, on CPU or GPU, it is defined as
   None so the router's plain-torch path runs. Likewise output-discarding recomputation (`layernorm` in
   train.recompute_modules) takes every `CheckpointWithoutOutput()` for an FP8 one and reads Transformer
   Engine's FP8 state and contexts (`tensor_parallel/random.py`): without it they are defined as "FP8 off"
   and empty contexts.
6. The all-to-all dispatcher only turns split sizes into numpy when they live on CUDA: on CPU they are
   converted too, which `all_to_all` needs.
7. Activation recomputation saves and restores the CUDA generator's state around a recomputed forward
   (`tensor_parallel/random.py`, `_get_cuda_rng_state`/`_set_cuda_rng_state`): there is none, and the CPU
   generator and the tracker's states it also saves are the ones that matter, so these do nothing.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device="cuda"` arguments and `.cuda()` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core checks dtypes by type string ('torch.cuda.FloatTensor'): answer in CUDA terms.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = "cpu"
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _FakeEvent:
    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True


class _FakeStream:
    """Stands in for `torch.cuda.Stream` on CPU, where all work is synchronous anyway."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _FakeEvent:
        return event or _FakeEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _FakeStream)

    def __hash__(self) -> int:
        return 0


_STREAM = _FakeStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _FakeStream
    cuda.Event = lambda *a, **k: _FakeEvent()
    cuda.current_stream = lambda *a, **k: _STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()


class CpuRNGStatesTracker:
    """The megatron-core RNG tracker's interface over the CPU generator.

    megatron-core forks named RNG states around weight init and dropout so that tensor-parallel shards
    draw different numbers and data-parallel replicas the same ones; here each named state is a CPU
    generator state.
    """

    def __init__(self) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise RuntimeError(f"RNG state {name!r} or seed {seed} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator()
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mrandom.initialize_rng_tracker = lambda *a, **k: None
    mrandom._get_cuda_rng_state = lambda *a, **k: None
    mrandom._set_cuda_rng_state = lambda *a, **k: None

    original = token_dispatcher.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=False)

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


class _NoFP8:
    """Transformer Engine's FP8 state as it is without Transformer Engine: FP8 is off."""

    @staticmethod
    def is_fp8_enabled() -> bool:
        return False

    @staticmethod
    def get_fp8_recipe() -> None:
        return None


def fix_missing_transformer_engine() -> None:
    """Define the Transformer Engine names megatron-core reads unguarded (idempotent; nothing when TE imports)."""
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not mrandom.HAVE_TE:
        mrandom.FP8GlobalStateManager = _NoFP8
        mrandom.activation_recompute_forward = lambda **_: contextlib.nullcontext()
        mrandom.fp8_autocast = lambda **_: contextlib.nullcontext()


def enable_cpu() -> None:
    """Apply the CPU compatibility patches (idempotent). Call before building models."""
    global _ENABLED, _MODE
    if _ENABLED:
        return
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ENABLED = True


def setup_platform() -> torch.device:
    """Return the device to train on, enabling the CPU layer only when CUDA is unavailable."""
    fix_missing_transformer_engine()
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    enable_cpu()
    return torch.device("cpu")


def seed_everything(seed: int, tp_rank: int, ep_rank: int, etp_rank: int = 0) -> None:
    """Seed torch and megatron-core's named RNG states the way `model_parallel_cuda_manual_seed` does."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    if not _ENABLED:
        mrandom.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=ep_rank, etp_rank=etp_rank)
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
