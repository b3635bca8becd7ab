"""Fault injection on the tiny MoE: damaged checkpoints, changed configs, crafted files, a full disk, two owners
of one run directory, a runner killed outright, a model too big for memory.

Each case checks the exit code, the one-line message, what is left on disk, and that a correct run afterwards
ends where the uninterrupted reference run did (bitwise on CPU). One reference run is shared by the module; most
cases work on a copy of it whose newest checkpoint is gone, so the correct run only trains steps 9 and 10.
SIGKILL mid-run, the stop signal and a non-finite loss are covered in test_checkpoint.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_moe import directories
from megatron_moe.config import load_run_config
from megatron_moe.files import lock_holder
from megatron_moe.schema import save_toml
from megatron_moe.train.result import read_result
from megatron_moe.train.stop import PREEMPTED_MARKER, RUN_LOCK
from tests.conftest import HANG_S, TINY_MOE, cli, end, last_line, start_cli, untimed_rows, wait_until, write_study

ARGS = [*TINY_MOE, "train.train_steps=10", "train.save_interval=4", "train.eval_interval=5", "train.log_interval=3"]
"""Checkpoints at steps 4, 8 and 10 (the last two kept). Logging every 3 steps while saving every 4 puts a
checkpoint inside a logging window: the expert-load counters of steps 7-8 must come back from the checkpoint for
the step-9 row to match."""
FOREIGN_ROW = '{"kind": "train", "step": 1, "loss": 9.0}\n'


def train(run_dir: Path, *extra: str, check: bool = False) -> subprocess.CompletedProcess:
    return cli("train", *ARGS, f"train.output_dir={run_dir}", *extra, check=check)


def assert_same_as(run_dir: Path, reference: SimpleNamespace) -> None:
    assert untimed_rows(run_dir) == untimed_rows(reference.dir)
    result, expected = (json.loads((d / directories.RESULT).read_text()) for d in (run_dir, reference.dir))
    for key in ("steps", "final_train_loss", "best_val_loss", "best_val_step"):
        assert result[key] == expected[key], key


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / directories.CHECKPOINTS).iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> SimpleNamespace:
    """The uninterrupted run. Its directory first holds another run's metrics.jsonl and config.toml, which
    `train` refuses to replace until told to (train.overwrite_output_dir); told to, it starts over cleanly."""
    out = tmp_path_factory.mktemp("reference")
    (out / directories.METRICS).write_text(FOREIGN_ROW)
    foreign = load_run_config(None, [*ARGS, "model.hidden_size=32", f"train.output_dir={out}"])
    save_toml(foreign, out / directories.CONFIG)
    refused = train(out)
    foreign_left = (out / directories.METRICS).read_text()
    train(out, "train.overwrite_output_dir=true", check=True)
    return SimpleNamespace(dir=out, refused=refused, foreign_left=foreign_left)


@pytest.fixture
def at_step_8(reference, tmp_path) -> Path:
    """A copy of the reference run as a run killed after its step-8 checkpoint (the step-10 one never saved)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference.dir, run_dir)
    shutil.rmtree(run_dir / directories.CHECKPOINTS / "step_0000010")
    (run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).write_text("step_0000008\n")
    (run_dir / directories.RESULT).unlink()
    return run_dir


# ---------------------------------------------------------------- damaged checkpoints, found before any load


class _RunsCode:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _craft(path: Path, marker: Path) -> None:
    """Replace `path` by a file that runs code when unpickled, and make the manifest agree with it (an attacker
    who can write the file can write the manifest too)."""
    if path.name == ".metadata":
        path.write_bytes(pickle.dumps(_RunsCode(marker)))
    else:
        import torch

        buffer = io.BytesIO()
        torch.save({"torch": _RunsCode(marker)}, buffer)
        path.write_bytes(buffer.getvalue())
    manifest_path = path.parent / directories.CHECKPOINT_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    data = path.read_bytes()
    manifest["files"][path.name] = {"size": len(data), "crc32": zlib.crc32(data)}
    manifest_path.write_text(json.dumps(manifest))


DAMAGE = {
    "truncated shard": (lambda c, m: (c / "__0_0.distcp").write_bytes((c / "__0_0.distcp").read_bytes()[:1000]),
                        "step_0000008", r"skipped checkpoint step_0000010 \(__0_0\.distcp has 1000 bytes, \d+ were saved\)"),
    "missing .metadata": (lambda c, m: (c / ".metadata").unlink(),
                          "step_0000008", r"skipped checkpoint step_0000010 \(\.metadata is missing\)"),
    "corrupt rng": (lambda c, m: _flip_middle_byte(c / "rng_rank0.pt"),
                    "step_0000008", r"skipped checkpoint step_0000010 \(rng_rank0\.pt fails its checksum\)"),
    "corrupt common": (lambda c, m: _flip_middle_byte(c / "common.pt"),
                       "step_0000008", r"skipped checkpoint step_0000010 \(common\.pt fails its checksum\)"),
    "wrong step": (lambda c, m: (c / directories.CHECKPOINT_STATE).write_text('{"step": 9}'),
                   "step_0000008", r"skipped checkpoint step_0000010 \(train_state\.json says step 9\)"),
    "unreadable train state": (lambda c, m: (c / directories.CHECKPOINT_STATE).write_text('{"step": 1'),
                               "step_0000008", r"skipped checkpoint step_0000010 \(train_state\.json is unreadable"),
    "empty latest": (lambda c, m: (c.parent / directories.CHECKPOINT_LATEST).write_text(""),
                     "step_0000010", r"latest holds '', not a step_\* name: ignored"),
    "latest outside": (lambda c, m: (c.parent / directories.CHECKPOINT_LATEST).write_text("../../../../etc\n"),
                       "step_0000010", r"latest holds '\.\./\.\./\.\./\.\./etc', not a step_\* name: ignored"),
    "newest missing": (lambda c, m: shutil.rmtree(c),
                       "step_0000008", r"latest names step_0000010, which is missing"),
    "crafted .metadata": (lambda c, m: _craft(c / ".metadata", m), "step_0000008",
                          r"skipped checkpoint step_0000010 \(\.metadata is not checkpoint metadata \(it refers to "
                          r"posix\.system\)\)"),
    "crafted rng": (lambda c, m: _craft(c / "rng_rank0.pt", m), "step_0000008",
                    r"skipped checkpoint step_0000010 \(rng_rank0\.pt holds objects other than tensors"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(reference, tmp_path, damage):
    from megatron_moe.train.checkpoint import find_checkpoint

    root = tmp_path / directories.CHECKPOINTS
    shutil.copytree(reference.dir / directories.CHECKPOINTS, root)
    harm, chosen, note = DAMAGE[damage]
    marker = tmp_path / "code-ran"
    harm(root / "step_0000010", marker)
    path, notes = find_checkpoint(root)
    assert path == root / chosen
    assert len(notes) == 1 and re.search(note, notes[0]), notes
    assert not marker.exists()  # nothing from the checkpoint was unpickled beyond tensors


# ---------------------------------------------------------------- the same, end to end


@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint_and_a_garbage_latest(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.dir, run_dir)
    (run_dir / directories.RESULT).unlink()
    shard = run_dir / directories.CHECKPOINTS / "step_0000010" / "__0_1.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).write_text("not a checkpoint\n")
    proc = train(run_dir, check=True)
    assert "latest holds 'not a checkpoint', not a step_* name: ignored" in proc.stdout
    assert "skipped checkpoint step_0000010 (__0_1.distcp has" in proc.stdout
    assert "resumed from" in proc.stdout and "step_0000008 at step 8" in proc.stdout
    assert_same_as(run_dir, reference)
    # the damaged checkpoint was saved again over; the good one before it was not pruned
    assert checkpoints(run_dir) == ["latest", "step_0000008", "step_0000010"]
    from megatron_moe.train.checkpoint import verify_checkpoint

    saved = run_dir / directories.CHECKPOINTS
    assert all(verify_checkpoint(saved / s) is None for s in ("step_0000008", "step_0000010"))
    assert (run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).read_text() == "step_0000010\n"


@pytest.mark.slow
def test_a_checkpoint_that_verifies_but_does_not_load_falls_back_to_the_one_before(reference, tmp_path):
    """Without its manifest a checkpoint is checked for its files' presence only, so a truncated shard shows at
    load: the run skips it like a damaged one and resumes from the checkpoint before."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference.dir, run_dir)
    (run_dir / directories.RESULT).unlink()
    newest = run_dir / directories.CHECKPOINTS / "step_0000010"
    (newest / directories.CHECKPOINT_MANIFEST).unlink()
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = train(run_dir, check=True)
    assert f"checkpoint {newest} does not load into this run" in proc.stdout
    assert "trying step_0000008" in proc.stdout and "step_0000008 at step 8" in proc.stdout
    assert_same_as(run_dir, reference)


@pytest.mark.slow
def test_a_finished_run_without_checkpoints_is_refused_not_restarted(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.dir, run_dir)
    shutil.rmtree(run_dir / directories.CHECKPOINTS)
    kept = {name: (run_dir / name).read_text() for name in ("metrics.jsonl", "result.json")}
    proc = train(run_dir)
    assert proc.returncode == 2
    assert last_line(proc) == (
        f"megatron-moe: error: train.output_dir = {str(run_dir)!r} holds a finished run (result.json) and no "
        "checkpoint to resume from; use a new train.output_dir, or set train.overwrite_output_dir = true to train "
        "it again from step 0")
    assert {name: (run_dir / name).read_text() for name in kept} == kept
    train(run_dir, "train.overwrite_output_dir=true", check=True)
    assert_same_as(run_dir, reference)


@pytest.mark.slow
def test_a_crafted_rng_file_runs_no_code(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.dir, run_dir)
    (run_dir / directories.RESULT).unlink()
    marker = tmp_path / "code-ran"
    _craft(run_dir / directories.CHECKPOINTS / "step_0000010" / "rng_rank0.pt", marker)
    proc = train(run_dir, check=True)
    assert "skipped checkpoint step_0000010 (rng_rank0.pt holds objects other than tensors" in proc.stdout
    assert not marker.exists()
    assert_same_as(run_dir, reference)


@pytest.mark.slow
def test_no_usable_checkpoint_is_one_line_and_deletes_nothing(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference.dir, run_dir)
    (run_dir / directories.RESULT).unlink()
    for step in ("step_0000008", "step_0000010"):
        (run_dir / directories.CHECKPOINTS / step / directories.CHECKPOINT_STATE).unlink()
    metrics = (run_dir / directories.METRICS).read_text()
    proc = train(run_dir)
    assert proc.returncode == 1
    line = last_line(proc)
    assert line.startswith(f"megatron-moe: error: no usable checkpoint in {run_dir / 'checkpoints'}: skipped "
                           "checkpoint step_0000010 (no train_state.json); skipped checkpoint step_0000008 "
                           "(no train_state.json); move"), line
    assert (run_dir / directories.METRICS).read_text() == metrics  # not restarted from step 0
    assert checkpoints(run_dir) == ["latest", "step_0000008", "step_0000010"]
    # put one back: the run resumes from it and ends as the reference did
    shutil.copy(reference.dir / directories.CHECKPOINTS / "step_0000008" / directories.CHECKPOINT_STATE,
                run_dir / directories.CHECKPOINTS / "step_0000008")
    train(run_dir, check=True)
    assert_same_as(run_dir, reference)


# ---------------------------------------------------------------- changed configs, other runs' files


@pytest.mark.slow
def test_a_changed_config_is_refused_unless_allowed_and_then_recorded(reference, at_step_8):
    run_dir = at_step_8
    config = (run_dir / directories.CONFIG).read_text()
    proc = train(run_dir, "train.lr=0.001", "model.hidden_size=128")
    assert proc.returncode == 2
    line = last_line(proc)
    assert line.startswith(f"megatron-moe: error: train.output_dir = '{run_dir}' was started with another config ("), line
    assert "model.hidden_size 64 -> 128" in line and "train.lr 0.003 -> 0.001" in line
    assert "set train.allow_config_change = true to resume from step_0000008" in line
    assert (run_dir / directories.CONFIG).read_text() == config and not (run_dir / directories.CONFIG_CHANGES).exists()
    # bookkeeping may change; with the config it was started with, the run ends as the reference did
    train(run_dir, "train.save_interval=2", check=True)
    assert_same_as(run_dir, reference)
    # allowed: the new value applies from the resumed step, and the change is recorded
    proc = train(run_dir, "train.lr=0.001", "train.allow_config_change=true", check=True)
    assert "continuing from step 10 with a changed config" in proc.stdout and "train.lr 0.003 -> 0.001" in proc.stdout
    (change,) = [json.loads(x) for x in (run_dir / directories.CONFIG_CHANGES).read_text().splitlines()]
    assert change["step"] == 10 and change["changes"] == {"train.lr": [0.003, 0.001]}
    recorded = load_run_config(run_dir / directories.CONFIG)
    assert recorded.train.lr == 0.001 and recorded.train.allow_config_change


@pytest.mark.slow
def test_another_runs_metrics_are_kept_unless_overwriting_is_asked_for(reference):
    proc = reference.refused
    assert proc.returncode == 2
    line = last_line(proc)
    assert line == (f"megatron-moe: error: train.output_dir = '{reference.dir}' holds another run's metrics.jsonl "
                    "(config model.hidden_size 32 -> 64) and no checkpoint; use a new train.output_dir, or set "
                    "train.overwrite_output_dir = true to replace it")
    assert reference.foreign_left == FOREIGN_ROW
    # overwriting, the fixture's run started over: its first row is its own
    assert untimed_rows(reference.dir)[0]["step"] == 3 and "loss" in untimed_rows(reference.dir)[0]


# ---------------------------------------------------------------- saving onto a full disk

# Runs the CLI with every fsync of a file in the step-10 checkpoint's temporary directory failing as on a full
# disk (the checkpoint writers fork, so they inherit it).
DISK_FULL = """
import errno, os, sys
real = os.fsync
def fsync(fd):
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        target = ""
    if ".step_0000010.tmp" in target:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)
os.fsync = fsync
if __name__ == "__main__":
    from megatron_moe.cli import main
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_disk_full_on_save_is_one_line_and_leaves_no_partial_checkpoint(reference, at_step_8):
    run_dir = at_step_8
    proc = cli("train", *ARGS, f"train.output_dir={run_dir}", prefix=[sys.executable, "-c", DISK_FULL], check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("megatron-moe: error: cannot save checkpoint step_0000010: no space left on device "
                           f"writing {run_dir / 'checkpoints' / '.step_0000010.tmp'} (a checkpoint needs about "), line
    assert "MiB" in line and "removed the partial .step_0000010.tmp, the last checkpoint step_0000008 is intact" in line
    assert checkpoints(run_dir) == ["latest", "step_0000008"]  # no temporary directory left to fill the disk
    assert (run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).read_text() == "step_0000008\n"
    assert not (run_dir / directories.RESULT).exists()
    train(run_dir, check=True)
    assert_same_as(run_dir, reference)


def test_storage_errors_on_save_are_one_line_naming_the_path(tmp_path, monkeypatch):
    """Permission errors read like a full disk; the OSError is found however the checkpoint writers wrapped it."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_moe.train import checkpoint as ck

    root = tmp_path / directories.CHECKPOINTS
    root.mkdir()
    tmp = root / ".step_0000004.tmp"
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp))
    assert ck._save_failure(denied, None, root, "step_0000004", tmp) == (
        f"cannot save checkpoint step_0000004: Permission denied writing {tmp}; make {root} writable; removed the "
        "partial .step_0000004.tmp, no earlier checkpoint exists; fix that and run again to resume")
    worker = RuntimeError("Worker failure")
    worker.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert ck._os_error(CheckpointException("save failed", {1: (worker, None)})).errno == errno.ENOSPC
    assert ck._save_failure(ValueError("a bug"), None, root, "step_0000004", tmp) is None  # not a storage error
    # torch's own writer reports a failed write (a full disk, say) as a RuntimeError that names no OS error
    torch_writer = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0 "
                                "PytorchStreamWriter failed writing file data/0: file write failed")
    assert ck._os_error(torch_writer).errno == errno.EIO
    (root / "step_0000002").mkdir()
    (root / "step_0000002" / "shard").write_bytes(b"x" * 100)  # a checkpoint takes 100 bytes
    message = ck._save_failure(torch_writer, None, root, "step_0000004", tmp)
    assert message.startswith(f"cannot save checkpoint step_0000004: torch's file writer failed writing {tmp}")
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda path: SimpleNamespace(free=40))  # less than a checkpoint
    assert ck._save_failure(torch_writer, None, root, "step_0000004", tmp).startswith(
        f"cannot save checkpoint step_0000004: no space left on device writing {tmp} (a checkpoint needs about "
        "100 bytes, 40 bytes free)")


def test_a_missing_checkpoint_writer_dependency_is_one_line_before_training(tmp_path):
    """megatron-core's writer processes die on a missing psutil before reporting, and the save then waits forever:
    the trainer refuses to start instead."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "psutil.py").write_text("raise ImportError('hidden for this test')\n")
    proc = cli("train", *ARGS, "train.train_steps=4", f"train.output_dir={tmp_path / 'run'}", check=False,
               timeout=HANG_S, env={"PYTHONPATH": str(shim)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc) == ("megatron-moe: error: megatron-core's checkpoint writer needs psutil, which is not "
                               "installed: pip install psutil")
    assert not (tmp_path / "run" / directories.METRICS).exists()


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["parallel.expert=4"], "parallel.expert = 4 does not divide data x tensor = 2 x 1 = 2 (world size 2)"),
    (["data.path=/nonexistent/corpus"], "data.path = '/nonexistent/corpus' is not a directory"),
], ids=["before-the-process-group", "after-it"])
def test_errors_under_torchrun_are_one_line_on_every_rank(tmp_path, overrides, message):
    """A bad layout is refused before the process group exists, a bad data path once it does (local rank 0 reads
    the data first): either way the ranks stop with the same line and none with a traceback of ours."""
    proc = cli("train", *ARGS, *overrides, f"train.output_dir={tmp_path / 'run'}", nproc=2, check=False, timeout=HANG_S)
    assert proc.returncode != 0
    # The ranks write at once (their lines may interleave), and torchrun stops the others when one exits.
    ours = proc.stderr.split("megatron-moe: error: ")[1:]
    assert 1 <= len(ours) <= 2 and all(part.startswith(message) for part in ours), proc.stderr[-3000:]
    assert "megatron_moe/" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / directories.METRICS).exists()


# ---------------------------------------------------------------- one owner per run directory


@pytest.mark.slow
def test_a_second_trainer_on_a_run_directory_is_refused(reference, at_step_8):
    run_dir = at_step_8
    first = start_cli("train", *ARGS, f"train.output_dir={run_dir}")
    try:
        wait_until(lambda: lock_holder(run_dir / RUN_LOCK) is not None, "the first trainer taking the lock",
                   alive=first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock while the second one tries
        try:
            second = train(run_dir)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2
        assert last_line(second) == (f"megatron-moe: error: train.output_dir = '{run_dir}' is in use by another "
                                     f"training process ({first.pid}@{socket.gethostname()}, lock {run_dir / RUN_LOCK}); "
                                     "wait for it to end or stop it")
        _, stderr = first.communicate(timeout=HANG_S)
    finally:
        end(first)
    assert first.returncode == 0, stderr[-3000:]
    assert_same_as(run_dir, reference)




def _alive(pid: int) -> bool:
    """Whether any thread of `pid` still runs: an exited leader shows "Z" (unreaped, as an orphan's may stay in a
    container) while its other threads may still be exiting."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks]
    except OSError:
        return False
    return any(state not in ("Z", "X") for state in states)


@pytest.mark.slow
def test_a_killed_runner_takes_its_trainer_along(reference, tmp_path):
    """SIGKILL to `study run` alone: its trainer (a session of its own) gets SIGTERM from the kernel, checkpoints
    and exits instead of training on, orphaned; the next `study run` resumes the run."""
    # One run whose config is the reference's: train.seed 42 (the default) and the base data.seed.
    study = write_study(tmp_path / "faults.toml", name="faults", seeds=(42,), data_order="shared")
    out = tmp_path / "study"
    runner = start_cli("study", "run", str(study), *ARGS, "-o", str(out), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    trainer = None
    try:
        runs = out / directories.RUNS
        wait_until(lambda: runs.is_dir() and any((d / directories.METRICS).is_file() for d in runs.iterdir()),
                   "the trainer logging a step", alive=runner)
        (run_dir,) = runs.iterdir()
        trainer = int(lock_holder(run_dir / RUN_LOCK).split("@")[0])
        # Frozen while its runner dies, so that the kernel's SIGTERM finds it mid-run, whatever the machine's speed
        # (a stopped process keeps the signal pending until it continues); else its last steps can win the race.
        os.kill(trainer, signal.SIGSTOP)
        runner.kill()
        runner.wait()
        os.kill(trainer, signal.SIGCONT)
        wait_until(lambda: not _alive(trainer), "the trainer ending with its runner")
    finally:
        end(runner)
        if trainer is not None and _alive(trainer):
            os.kill(trainer, signal.SIGKILL)
    marker = json.loads((run_dir / PREEMPTED_MARKER).read_text())
    assert marker["signal"] == "SIGTERM"  # it stopped on the signal, with a checkpoint of its last step
    assert (run_dir / directories.CHECKPOINTS / f"step_{marker['step']:07d}").is_dir()
    # The last thread closes the descriptor table, and with it the lock, a moment after it stops running.
    wait_until(lambda: lock_holder(run_dir / RUN_LOCK) is None, "the trainer's lock let go", seconds=30)
    proc = cli("study", "run", str(study), *ARGS, "-o", str(out), "--quiet")
    assert "study complete: 1 runs" in proc.stdout
    assert_same_as(run_dir, reference)

    # The report's final train loss is result.json's, whatever metrics.jsonl still holds.
    from megatron_moe.study.report import build_results

    lines = (run_dir / directories.METRICS).read_text().splitlines()
    (run_dir / directories.METRICS).write_text("\n".join(lines[:-3]) + "\n")  # the last train rows are gone
    (arm,) = build_results(out).arms
    assert arm["final_train_loss"]["mean"] == read_result(run_dir).final_train_loss


# ---------------------------------------------------------------- a model too big for memory


def _limit_memory() -> None:
    limit = 48 << 30  # far below the model's 256 GiB embedding; far above what start-up maps
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.slow
def test_a_model_too_big_for_memory_is_one_line(tmp_path):
    proc = cli("train", *ARGS, "model.vocab_size=1073741824", f"train.output_dir={tmp_path}", check=False,
               env={"CUDA_VISIBLE_DEVICES": ""}, preexec_fn=_limit_memory)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line(proc)
    assert line.startswith("megatron-moe: error: out of host memory ("), line
    from megatron_moe.config import load_run_config
    from megatron_moe.planner.memory import estimate_memory
    from megatron_moe.text import human_bytes

    need = estimate_memory(load_run_config(None, [*ARGS, "model.vocab_size=1073741824"]), 1, precision="fp32").per_gpu
    assert f"estimates {human_bytes(need.total)} per process on world size 1" in line, line
    assert need.weights > 256 << 30  # the embedding alone: 2^30 rows of 64 fp32
    assert not (tmp_path / directories.METRICS).exists() and not (tmp_path / directories.CHECKPOINTS).exists()
