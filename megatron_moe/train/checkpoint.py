"""Checkpoints: megatron-core distributed checkpointing, saved atomically, verified before a resume, resumed exactly.

Layout under `<output_dir>/checkpoints/`: one directory per saved step (`step_0000100/`) holding the
megatron-core sharded checkpoint (model, optimizer, LR scheduler), each rank's RNG states
(`rng_rank<r>.pt`, tensors only), the loop's `TrainState` with the expert-load counters of the current logging
window (`train_state.json`), the run config it was trained with (`config.toml`) and `manifest.json` (every
file's size, and a CRC-32 of each file up to `CHECKSUM_MAX_BYTES`), written last. A `latest` file names the
newest one for people and tools; resuming does not rely on it.

A save goes to a hidden temporary directory that is renamed only after every rank has finished: a run killed
mid-save leaves the previous checkpoints as they were. A save that fails (disk full, no permission) removes its
temporary directory and stops the run with one line naming the path and the space needed.

A resume (`find_checkpoint`) takes the newest `step_*` directory that verifies against its manifest, says which
newer ones it skipped and why, and refuses (`TrainingError`) when checkpoints exist but none verifies: starting
over would silently throw the run away. Nothing from a run directory is unpickled beyond plain tensors: `.pt`
files load with `weights_only=True` (megatron-core's own loads are forced to it too), and torch's pickled
`.metadata` is first read by an unpickler that admits only checkpoint-metadata classes.
The data position needs no state of its own: the sample stream is a pure function of the optimizer step.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import io
import json
import math
import os
import pickle
import shutil
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_moe import directories
from megatron_moe.directories import checkpoint_name, step_of
from megatron_moe.config import ConfigError, RunConfig
from megatron_moe.schema import save_toml
from megatron_moe.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from megatron_moe.text import human_bytes
from megatron_moe.train.stop import TrainingError

KEEP = 2  # complete checkpoints kept; older ones are deleted after a successful save
TRAIN_STATE, MANIFEST, CONFIG, LATEST = (directories.CHECKPOINT_STATE, directories.CHECKPOINT_MANIFEST,
                                         directories.CHECKPOINT_CONFIG, directories.CHECKPOINT_LATEST)
CHECKSUM_MAX_BYTES = 64 << 20
"""Files up to this size get a CRC-32 in the manifest; larger shards are checked by size only (reading a
multi-GB checkpoint through a checksum on every resume would cost minutes)."""
_REQUIRED = (TRAIN_STATE, "metadata.json", ".metadata", "common.pt")


@dataclass
class TrainState:
    """The training loop's own state: what `result.json` reports and a resumed run continues from."""

    step: int = 0
    """Optimizer steps taken."""
    last_train_loss: float | None = None
    best_val_loss: float | None = None
    best_val_step: int | None = None
    elapsed_s: float = 0.0
    """Wall-clock seconds of training so far, over every attempt (evaluation and saving included)."""

    def record_eval(self, val_loss: float) -> None:
        """A finite validation loss lower than the best so far becomes the best (a nan never does)."""
        if not math.isfinite(val_loss):
            return
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_val_step = val_loss, self.step


class Stateful(Protocol):
    """A part of a run that a checkpoint saves into train_state.json under its name (JSON-able state)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class ShardedStates:
    """Model, optimizer and LR scheduler, saved and loaded through megatron-core's distributed checkpointing (each
    rank writes its shards; a checkpoint loads into another parallel layout)."""

    def __init__(self, chunks: list, optimizer, scheduler, distributed_optimizer: bool):
        # The GPTModel inside each chunk's DDP (and Float16Module)
        self.models = [getattr(c.module, "module", c.module) for c in chunks]
        self.optimizer, self.scheduler = optimizer, scheduler
        self.metadata = {"distrib_optim_sharding_type": "fully_reshardable"} if distributed_optimizer else None

    @staticmethod
    def _key(chunk: int) -> str:
        # Tensors are stored under their global names whatever the chunking; these keys only group the chunks.
        return "model" if chunk == 0 else f"model{chunk}"

    def sharded_state_dict(self, is_loading: bool) -> dict[str, Any]:
        model_sd = {self._key(i): m.sharded_state_dict() for i, m in enumerate(self.models)}
        return {
            **model_sd,
            "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=self.metadata),
            "scheduler": self.scheduler.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        for i, m in enumerate(self.models):
            m.load_state_dict(state[self._key(i)])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


@dataclass
class Checkpointable:
    """Everything one checkpoint holds, by owner: what `save_checkpoint` writes and `load_checkpoint` restores. The
    checkpoint code reads nothing else of the run."""

    sharded: Any
    """The sharded states (`ShardedStates`, or anything with `sharded_state_dict(is_loading)` and `load(state)`)."""
    train: TrainState
    """The loop's own state; `load_checkpoint` returns the saved one."""
    config: RunConfig
    """The run's config, saved beside the states (the resume check compares against it)."""
    parts: dict[str, Stateful] = field(default_factory=dict)
    """More states by name, saved in train_state.json (the expert-load window)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _state_problem(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the saved train state of checkpoint `path`, None) or (None, why it cannot be read)."""
    try:
        raw = json.loads((path / TRAIN_STATE).read_text())
    except FileNotFoundError:
        return None, f"no {TRAIN_STATE}"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{TRAIN_STATE} is unreadable ({_first_line(exc)})"
    if not isinstance(raw, dict) or type(raw.get("step")) is not int:
        return None, f"{TRAIN_STATE} holds no step"
    return raw, None


def _read_state_file(path: Path) -> dict[str, Any]:
    raw, why = _state_problem(path)
    if raw is None:
        raise TrainingError(f"checkpoint {path} cannot be resumed: {why}")
    return raw


def read_train_state(path: Path) -> TrainState:
    """The `TrainState` saved in checkpoint directory `path`; TrainingError (one line) when unreadable."""
    raw = _read_state_file(path)
    names = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in raw.items() if k in names})


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint directory `root/latest` names, when it names an existing `step_*` directory, else None."""
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return root / name if step_of(name) is not None and (root / name).is_dir() else None


# ---------------------------------------------------------------- verification


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _manifest_entries(directory: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(directory.iterdir()):
        if p.name != MANIFEST and p.is_file():
            size = p.stat().st_size
            out[p.name] = {"size": size, "crc32": _crc32(p) if size <= CHECKSUM_MAX_BYTES else None}
    return out


class _MetadataUnpickler(pickle.Unpickler):
    """Reads torch's `.metadata` pickle admitting only what checkpoint metadata is made of: the dataclasses and
    enums of `torch.distributed.checkpoint`, torch sizes, dtypes, layouts and memory formats."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") and module.count(".") == 3:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        elif (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def _unsafe_metadata(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as exc:  # anything a damaged or crafted pickle raises
        return f"{path.name} is not checkpoint metadata ({_first_line(exc)})"
    return None


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside (megatron-core's and torch's checkpoint readers included, some of which ask for
    full unpickling) loads tensors and plain containers only."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def verify_checkpoint(path: Path) -> str | None:
    """Why checkpoint directory `path` cannot be resumed from (a short phrase), or None when it can.

    Every file in its manifest must be there with its saved size (and checksum), its train state must parse and
    name the step of the directory, its `.pt` files must hold tensors only and its `.metadata` checkpoint
    metadata only. A directory saved before checkpoints had a manifest is checked for its files' presence.
    """
    step = step_of(path.name)
    if step is None:
        return "not a step_* directory"
    if not path.is_dir():
        return "missing"
    saved, why = _state_problem(path)
    if saved is None:
        return why
    if saved["step"] != step:
        return f"{TRAIN_STATE} says step {saved['step']}"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        files = None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({_first_line(exc)})"
    if files is not None:
        if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
            return f"{MANIFEST} is malformed"
        for name in (*_REQUIRED, *files):
            if name not in files:
                return f"{name} is not in {MANIFEST}"
            entry, file = files[name], path / name
            if "/" in name or name in (".", ".."):
                return f"{MANIFEST} names {name!r}, outside the checkpoint"
            try:
                size = file.stat().st_size
            except OSError:
                return f"{name} is missing"
            if size != entry.get("size"):
                return f"{name} has {size} bytes, {entry.get('size')} were saved"
            if entry.get("crc32") is not None and _crc32(file) != entry["crc32"]:
                return f"{name} fails its checksum"
    else:
        for name in _REQUIRED:
            if not (path / name).is_file() or not (path / name).stat().st_size:
                return f"{name} is missing or empty"
        if not any(p.stat().st_size for p in path.glob("*.distcp")):
            return "it has no .distcp shard"
    if why := _unsafe_metadata(path / ".metadata"):
        return why
    with _weights_only_loads():
        for pt in (path / "common.pt", *sorted(path.glob("rng_rank*.pt"))):
            try:
                torch.load(pt, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return f"{pt.name} holds objects other than tensors (not loaded: unpickling them could run code)"
            except Exception as exc:  # a damaged zip
                return f"{pt.name} is unreadable ({_first_line(exc)})"
    return None


def find_checkpoint(root: Path, below: int | None = None) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint under `root` that verifies, notes about the newer ones skipped and why); with
    `below`, the newest of those before that step (the fallback when a checkpoint verified but failed to load).

    None when `root` holds no checkpoint at all (a new run). TrainingError (one line) when it holds
    checkpoints, or a `latest` naming one, but none verifies: the run must not silently start over.
    """
    notes: list[str] = []
    latest_text = None
    if (root / LATEST).is_file():
        try:
            latest_text = (root / LATEST).read_text().strip()
        except (OSError, UnicodeDecodeError):
            latest_text = "<unreadable>"
        latest_step = step_of(latest_text)
        if latest_step is None:
            shown = latest_text if len(latest_text) <= 40 else latest_text[:40] + "..."
            notes.append(f"{root / LATEST} holds {shown!r}, not a step_* name: ignored")
        elif not (root / latest_text).is_dir():
            notes.append(f"{root / LATEST} names {latest_text}, which is missing")
    candidates = sorted((p for p in root.glob("step_*") if step_of(p.name) is not None
                         and (below is None or step_of(p.name) < below)), key=lambda p: -step_of(p.name))
    for path in candidates:
        why = verify_checkpoint(path)
        if why is None:
            return path, notes
        notes.append(f"skipped checkpoint {path.name} ({why})")
    if candidates or latest_text is not None:
        raise TrainingError(f"no usable checkpoint in {root}: {'; '.join(notes)}; move {root} aside to start "
                            "the run over")
    return None, notes


# ---------------------------------------------------------------- saving


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _size_estimate(config: RunConfig, root: Path) -> int:
    """Bytes one checkpoint takes: the newest saved one's size, else the parameters' checkpoint state."""
    for path in sorted(root.glob("step_*"), key=lambda p: -(step_of(p.name) or -1)):
        if step_of(path.name) is not None:
            try:
                return _dir_bytes(path)
            except OSError:
                break
    from megatron_moe.planner.ledger import ledger
    from megatron_moe.planner.memory import CHECKPOINT_STATE, state_bytes

    params = ledger(config.model, config.parallel.tensor).total_params
    return state_bytes(params, config.train.resolved_precision(torch.cuda.is_available()), CHECKPOINT_STATE)


def _os_error(exc: BaseException | None, seen: set[int] | None = None) -> OSError | None:
    """The OSError behind `exc`: itself, its causes, or a failure of torch's CheckpointException (whose
    writers may have raised it in another process)."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return None
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc
    for failure in (getattr(exc, "failures", None) or {}).values():
        found = _os_error(failure[0] if isinstance(failure, tuple) else failure, seen)
        if found is not None:
            return found
    found = _os_error(exc.__cause__, seen) or _os_error(exc.__context__, seen)
    if found is None and "No space left on device" in str(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if found is None and any(text in str(exc) for text in _TORCH_WRITE_FAILED):
        return OSError(errno.EIO, "torch's file writer failed")
    return found


_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "file write failed")
"""What torch's C++ file writer (inline_container.cc) raises, as a RuntimeError without the OS error, when a write
fails: on a full disk, for one."""


def _save_failure(exc: BaseException, config: RunConfig | None, root: Path, name: str, tmp: Path) -> str | None:
    """The one-line reason a save failed on storage, or None when `exc` is not a storage error."""
    err = _os_error(exc)
    if err is None:
        return None
    where = err.filename or tmp
    need = free_bytes = None
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        need = _size_estimate(config, root)
        try:
            free_bytes = shutil.disk_usage(root).free
        except OSError:
            pass
    # torch's writer does not say why a write failed: too little space left for a checkpoint is the likely cause
    full = err.errno == errno.EIO and free_bytes is not None and free_bytes < need
    if err.errno in (errno.ENOSPC, errno.EDQUOT) or full:
        free = "" if free_bytes is None else f", {human_bytes(free_bytes)} free"
        what = f"no space left on device writing {where} (a checkpoint needs about {human_bytes(need)}{free})"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = f"{err.strerror or 'permission denied'} writing {where}; make {root} writable"
    else:
        what = f"{err.strerror or _first_line(err)} writing {where}"
    kept = latest_checkpoint(root)
    kept_text = f"the last checkpoint {kept.name} is intact" if kept else "no earlier checkpoint exists"
    return (f"cannot save checkpoint {name}: {what}; removed the partial {tmp.name}, {kept_text}; fix that and "
            "run again to resume")


def _all_agree(failure: tuple[str | None, BaseException] | None, tmp: Path) -> None:
    """A collective after each stage of a save: when a rank failed, remove the partial directory and raise on
    every rank (a one-line TrainingError for storage errors; the failing rank re-raises anything else)."""
    mine = None if failure is None else (failure[0] or f"rank {dist.get_rank()} failed saving: "
                                         f"{type(failure[1]).__name__}: {_first_line(failure[1])}")
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    first = next((g for g in gathered if g is not None), None)
    if first is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    if failure is not None and failure[0] is None:
        raise failure[1]
    raise TrainingError(first)


def check_checkpoint_writer() -> None:
    """ConfigError (one line) when megatron-core's checkpoint writer cannot run. Its writer processes call psutil,
    which megatron-core does not declare; without it they die before reporting and the save waits forever."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        raise ConfigError("megatron-core's checkpoint writer needs psutil, which is not installed: "
                          "pip install psutil") from None


def save_checkpoint(run: Checkpointable, root: Path) -> Path:
    """Save `run` for its current step (`run.train.step`) under `root`; every rank must call this."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    name = checkpoint_name(run.train.step)
    final, tmp = root / name, root / f".{name}.tmp"
    parts = {key: part.state_dict() for key, part in run.parts.items()}  # may be collectives: every rank

    def attempt(stage) -> tuple[str | None, BaseException] | None:
        try:
            stage()
        except (Exception, CheckpointException) as exc:
            return _save_failure(exc, run.config, root, name, tmp), exc
        return None

    def prepare() -> None:
        # Left by saves that were killed; this process owns the run directory (its lock), so none is in use.
        for stale in root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_shards() -> None:
        dist_checkpointing.save(run.sharded.sharded_state_dict(is_loading=False), str(tmp))
        buffer = io.BytesIO()
        torch.save(_rng_state(), buffer)
        atomic_write_bytes(tmp / f"rng_rank{rank}.pt", buffer.getvalue())

    def finish() -> None:
        atomic_write_json(tmp / TRAIN_STATE, {**dataclasses.asdict(run.train), **parts})
        save_toml(run.config, tmp / CONFIG)
        atomic_write_json(tmp / MANIFEST, {"step": run.train.step, "files": _manifest_entries(tmp)})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    _all_agree(attempt(prepare) if rank == 0 else None, tmp)
    _all_agree(attempt(write_shards), tmp)
    _all_agree(attempt(finish) if rank == 0 else None, tmp)
    if rank == 0:
        try:
            atomic_write_text(root / LATEST, name + "\n")
        except OSError:
            pass  # a hint only: resuming finds the newest verified checkpoint without it
        _prune(root, final, keep=run.config.train.keep_checkpoints_at)
    dist.barrier()
    return final


def _prune(root: Path, newest: Path, keep: list[int] = ()) -> None:
    """Keep `newest` and the KEEP - 1 newest older checkpoints that verify; delete the older ones, except those of
    the steps in `keep`. Checkpoints newer than `newest` (left by an attempt that was then resumed from an older one)
    are left alone."""
    step = step_of(newest.name)
    older = sorted((p for p in root.glob("step_*") if (s := step_of(p.name)) is not None and s < step
                    and s not in keep), key=lambda p: -step_of(p.name))
    kept = 1
    for path in older:
        if kept < KEEP and verify_checkpoint(path) is None:
            kept += 1
        else:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- loading


def load_model_weights(model, path: Path) -> None:
    """Checkpoint `path`'s model weights into `model` (this rank's part of it, in any layout: megatron-core reshards)."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(state["model"])


def load_checkpoint(run: Checkpointable, path: Path) -> TrainState:
    """Restore `run`'s states and this rank's RNG from checkpoint `path` (verified by `find_checkpoint`); returns
    the saved train state. TrainingError (one line) when the checkpoint does not load into this run."""
    from megatron.core import dist_checkpointing

    saved = _read_state_file(path)
    train_state = read_train_state(path)
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    try:
        with _weights_only_loads():
            run.sharded.load(dist_checkpointing.load(run.sharded.sharded_state_dict(is_loading=True), str(path)))
            if rng.is_file():  # absent when resuming on a different number of ranks
                _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    except (Exception, CheckpointException) as exc:
        raise TrainingError(f"checkpoint {path} does not load into this run ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from None
    for key, part in run.parts.items():
        part.load_state_dict(saved.get(key))
    return train_state
