"""The checkpoint contract with small fakes in this process: what `save_checkpoint` writes for a `Checkpointable` and
`load_checkpoint` restores, pruning, and the one-line failures. The end-to-end cases (a real trainer killed and
resumed bitwise) are in test_checkpoint.py and test_faults.py."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from megatron_moe import directories
from megatron_moe.config import RunConfig
from megatron_moe.train.checkpoint import (
    Checkpointable, TrainState, find_checkpoint, load_checkpoint, save_checkpoint, verify_checkpoint
)
from megatron_moe.train.stop import TrainingError


class FakeSharded:
    """One tensor, saved through megatron-core's distributed checkpointing like the model is."""

    def __init__(self, values: list[float]):
        self.weight = torch.tensor(values)

    def sharded_state_dict(self, is_loading: bool) -> dict:
        from megatron.core.dist_checkpointing import ShardedTensor

        return {"weight": ShardedTensor.from_rank_offsets("fake.weight", self.weight, replica_id=0)}

    def load(self, state: dict) -> None:
        self.weight.copy_(state["weight"])


class Counter:
    def __init__(self, n: int):
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state) -> None:
        self.n = state["n"] if isinstance(state, dict) else 0


def _run(step: int, values=(1.0, 2.0, 3.0), n: int = 7) -> Checkpointable:
    return Checkpointable(sharded=FakeSharded(list(values)), train=TrainState(step=step, best_val_loss=2.5,
                                                                              best_val_step=step),
                          config=RunConfig(), parts={"counter": Counter(n)})


def test_save_then_load_restores_every_part(single_process, tmp_path):
    root = tmp_path / directories.CHECKPOINTS
    path = save_checkpoint(_run(4), root)
    assert path == root / "step_0000004" and verify_checkpoint(path) is None
    assert (root / directories.CHECKPOINT_LATEST).read_text() == "step_0000004\n"
    saved = json.loads((path / directories.CHECKPOINT_STATE).read_text())
    assert saved["step"] == 4 and saved["counter"] == {"n": 7}  # each part under its name
    assert set(json.loads((path / directories.CHECKPOINT_MANIFEST).read_text())["files"]) >= {
        directories.CHECKPOINT_STATE, directories.CHECKPOINT_CONFIG, "rng_rank0.pt", ".metadata"}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)  # the RNG state at save time
    save_checkpoint(_run(5), root)
    torch.rand(3)  # move on
    into = _run(0, values=(0.0, 0.0, 0.0), n=0)
    state = load_checkpoint(into, root / "step_0000005")
    assert state == TrainState(step=5, best_val_loss=2.5, best_val_step=5)
    assert torch.equal(into.sharded.weight, torch.tensor([1.0, 2.0, 3.0])) and into.parts["counter"].n == 7
    assert torch.equal(torch.rand(3), expected_next)  # this rank's RNG came back


def test_two_newest_checkpoints_are_kept(single_process, tmp_path):
    root = tmp_path / directories.CHECKPOINTS
    for step in (1, 2, 3):
        save_checkpoint(_run(step), root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000003"]
    assert find_checkpoint(root) == (root / "step_0000003", [])


def test_a_checkpoint_of_another_shape_does_not_load_in_one_line(single_process, tmp_path):
    path = save_checkpoint(_run(2), tmp_path / directories.CHECKPOINTS)
    with pytest.raises(TrainingError) as exc:
        load_checkpoint(_run(0, values=(0.0, 0.0)), path)
    assert str(exc.value).startswith(f"checkpoint {path} does not load into this run (") and "\n" not in str(exc.value)


def test_a_failed_save_removes_its_partial_directory_and_keeps_the_last(single_process, tmp_path, monkeypatch):
    from megatron.core import dist_checkpointing

    root = tmp_path / directories.CHECKPOINTS
    save_checkpoint(_run(2), root)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / ".step_0000003.tmp" / "__0_0.distcp"))

    monkeypatch.setattr(dist_checkpointing, "save", full)
    with pytest.raises(TrainingError) as exc:
        save_checkpoint(_run(3), root)
    assert str(exc.value).startswith("cannot save checkpoint step_0000003: no space left on device writing ")
    assert "the last checkpoint step_0000002 is intact" in str(exc.value)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]


def test_a_nan_evaluation_is_never_the_best():
    state = TrainState(step=1)
    state.record_eval(float("nan"))
    assert state.best_val_loss is None
    state.step = 2
    state.record_eval(3.0)
    state.step = 3
    state.record_eval(float("nan"))
    assert (state.best_val_loss, state.best_val_step) == (3.0, 2)
