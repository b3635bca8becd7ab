"""Checkpoints: megatron-core distributed checkpointing, saved atomically, resumed exactly.

Layout under `<output_dir>/checkpoints/`: one directory per saved step (`step_0000100/`) holding the
megatron-core sharded checkpoint (model, optimizer, LR scheduler), each rank's RNG states
(`rng_rank<r>.pt`) and the loop's `TrainState` (`train_state.json`: step, best validation loss, elapsed
time), and a `latest` file naming the newest complete one. A save goes to a hidden temporary
directory that is renamed only after every rank has finished, then `latest` is replaced atomically: a run
killed mid-save leaves the previous checkpoint as `latest`. The data position needs no state of its own:
the sample stream is a pure function of the optimizer step.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_moe.files import atomic_write_json, atomic_write_text
from megatron_moe.train.stop import TrainingError

KEEP = 2  # complete checkpoints kept; older ones are deleted after a successful save
TRAIN_STATE = "train_state.json"


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
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.best_val_step = val_loss, self.step


def read_train_state(path: Path) -> TrainState:
    """The `TrainState` saved in checkpoint directory `path`."""
    file = path / TRAIN_STATE
    if not file.is_file():
        raise TrainingError(f"checkpoint {path} has no {TRAIN_STATE}, so it cannot be resumed; "
                            f"remove {path.parent} to start the run over")
    return TrainState(**json.loads(file.read_text()))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint directory under `root`, or None."""
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if path.is_dir() else None


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


def _gpt_model(trainer):
    """The GPTModel inside megatron-core's DDP (and Float16Module) wrappers."""
    model = trainer.model.module
    return getattr(model, "module", model)


def _state_dict(trainer, is_loading: bool) -> dict[str, Any]:
    model_sd = _gpt_model(trainer).sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"} if trainer.cfg.train.distributed_optimizer else None
    return {
        "model": model_sd,
        "optimizer": trainer.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata),
        "scheduler": trainer.scheduler.state_dict(),
    }


def save_checkpoint(trainer, root: Path) -> Path:
    """Save the trainer's full state (`trainer.state` included) for its current step; every rank must call this."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    name = f"step_{trainer.state.step:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(_state_dict(trainer, is_loading=False), str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        atomic_write_json(tmp / TRAIN_STATE, dataclasses.asdict(trainer.state))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(root / "latest", name + "\n")
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(trainer, path: Path) -> TrainState:
    """Restore model, optimizer, scheduler and this rank's RNG from checkpoint `path`; returns its train state."""
    from megatron.core import dist_checkpointing

    train_state = read_train_state(path)
    state = dist_checkpointing.load(_state_dict(trainer, is_loading=True), str(path))
    _gpt_model(trainer).load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng_rank{dist.get_rank()}.pt"
    if rng.is_file():  # absent when resuming on a different number of ranks
        _set_rng_state(torch.load(rng, weights_only=False))
    return train_state
