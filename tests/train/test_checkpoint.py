"""Checkpoint/resume: a run killed with SIGKILL mid-training resumes onto the uninterrupted loss curve.

Bitwise on CPU: the sample stream is a function of the step, the model, optimizer (Adam moments and step),
LR scheduler and RNG states are restored exactly, and fp32 CPU kernels are deterministic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal

import pytest

from megatron_moe import directories
from megatron_moe.train.stop import PREEMPTED_MARKER, was_preempted
from tests.conftest import HANG_S, REFERENCE, TINY, cli, end, start_cli, untimed_rows, wait_until

pytestmark = pytest.mark.slow
ARGS = REFERENCE


@pytest.fixture
def straight(reference_run):
    """The uninterrupted run."""
    return reference_run(*ARGS)


def start(run_dir, *extra: str, env: dict[str, str] | None = None):
    return start_cli("train", *ARGS, *extra, f"train.output_dir={run_dir}", env=env)


def wait_for(predicate, proc, what: str):
    wait_until(predicate, what, alive=proc)
    assert proc.poll() is None, f"{what}: the run finished before it could be interrupted"


def assert_same_run(run_dir, straight):
    assert untimed_rows(run_dir) == untimed_rows(straight)
    result, reference = (json.loads((d / directories.RESULT).read_text()) for d in (run_dir, straight))
    assert result["best_val_loss"] == reference["best_val_loss"]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, straight):
    run_dir = tmp_path / "killed"
    proc = start(run_dir)
    marker = run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST
    wait_for(lambda: marker.exists() and marker.read_text().strip() >= "step_0000015", proc, "checkpoint 15")
    end(proc)
    assert not (run_dir / directories.RESULT).exists()

    saved = (run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).read_text().strip()
    step = int(saved.split("_")[1])
    resumed = cli("train", *ARGS, f"train.output_dir={run_dir}")
    assert f"resumed from {run_dir / 'checkpoints' / saved} at step {step}" in resumed.stdout
    logged = [int(line.split("/")[0].split()[-1]) for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert logged and min(logged) > step  # nothing before the checkpoint is trained again
    assert_same_run(run_dir, straight)
    kept = sorted(p.name for p in (run_dir / directories.CHECKPOINTS).iterdir())
    assert kept == ["latest", "step_0000035", "step_0000040"]  # the last two complete checkpoints


def test_stop_signal_saves_exits_75_and_resumes(tmp_path, straight):
    run_dir = tmp_path / "preempted"
    proc = start(run_dir)
    metrics = run_dir / directories.METRICS
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 12, proc, "12 metrics rows")
    os.kill(proc.pid, signal.SIGUSR1)  # what SLURM sends ahead of a time limit (--signal=USR1@...)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 75, stderr[-2000:]
    step = int((run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).read_text().strip().split("_")[1])
    assert f"stopped by signal at step {step}; checkpoint saved" in stderr
    assert was_preempted(run_dir)
    assert json.loads((run_dir / PREEMPTED_MARKER).read_text()) == {"step": step, "signal": "SIGUSR1"}
    cli("train", *ARGS, f"train.output_dir={run_dir}")
    assert not was_preempted(run_dir)  # cleared at start-up
    assert_same_run(run_dir, straight)


def test_resume_restores_best_and_elapsed_from_the_train_state(tmp_path, straight):
    """Nothing is rebuilt from metrics.jsonl: resumed without it, a run reports the uninterrupted run's result."""
    run_dir = tmp_path / "copy"
    shutil.copytree(straight, run_dir)
    reference = json.loads((straight / directories.RESULT).read_text())
    checkpoints = run_dir / directories.CHECKPOINTS
    shutil.rmtree(checkpoints / "step_0000040")  # resuming takes the newest checkpoint: now step 35
    state = json.loads((checkpoints / "step_0000035" / directories.CHECKPOINT_STATE).read_text())
    assert state["step"] == 35 and state["elapsed_s"] > 0
    assert state["best_val_loss"] == min(r["val_loss"] for r in untimed_rows(straight) if r["kind"] == "eval" and r["step"] <= 35)

    def resume():
        (run_dir / directories.METRICS).unlink()
        (run_dir / directories.RESULT).unlink()
        cli("train", *ARGS, f"train.output_dir={run_dir}")
        return json.loads((run_dir / directories.RESULT).read_text())

    result = resume()  # steps 36 to 40
    assert untimed_rows(run_dir) == [r for r in untimed_rows(straight) if r["step"] > 35]
    first = json.loads((run_dir / directories.METRICS).read_text().splitlines()[0])
    assert first["elapsed_s"] > state["elapsed_s"]  # counts the time before the checkpoint
    for key in ("steps", "final_train_loss", "best_val_loss", "best_val_step"):
        assert result[key] == reference[key], key

    state = json.loads((checkpoints / "step_0000040" / directories.CHECKPOINT_STATE).read_text())
    result = resume()  # at the last step already: result.json comes from the train state alone
    assert not (run_dir / directories.METRICS).exists()
    for key in ("steps", "final_train_loss", "best_val_loss", "best_val_step"):
        assert result[key] == reference[key], key
    assert result["train_time_s"] >= state["elapsed_s"] > 0


def test_checkpoints_without_train_state_are_refused_in_one_line(tmp_path, straight):
    """(A newer checkpoint without it is skipped for an older one: see test_faults.py.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(straight / directories.CHECKPOINTS, run_dir / directories.CHECKPOINTS)
    for step in ("step_0000035", "step_0000040"):
        (run_dir / directories.CHECKPOINTS / step / directories.CHECKPOINT_STATE).unlink()
    proc = cli("train", *ARGS, f"train.output_dir={run_dir}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-moe: error: no usable checkpoint in") and "(no train_state.json)" in last


def test_stop_signal_during_start_up_checkpoints_after_the_first_step(tmp_path):
    """...and after that step's evaluation (eval every step here): a resumed run would never evaluate it."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = start(run_dir, "data.synthetic_documents=20000", "train.eval_interval=1",
                 env={"MEGATRON_MOE_CACHE": str(cache)})
    # The trainer is building the synthetic corpus into the empty cache: start-up, before any step.
    wait_for(lambda: cache.is_dir() and any(p.name.startswith(".synthetic") for p in cache.iterdir()), proc,
             "the synthetic corpus being built")
    os.kill(proc.pid, signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 75, stderr[-2000:]
    assert "stopped by signal at step 1; checkpoint saved" in stderr
    assert json.loads((run_dir / PREEMPTED_MARKER).read_text()) == {"step": 1, "signal": "SIGUSR1"}
    assert (run_dir / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).read_text().strip() == "step_0000001"
    assert [(r["kind"], r["step"]) for r in untimed_rows(run_dir)] == [("train", 1), ("eval", 1)]


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def test_stop_signal_while_torch_imports_is_a_clean_stop(tmp_path):
    """The trainer catches the stop signals from before its heavy imports: a SIGTERM as soon as it can be caught
    (while torch and megatron-core are still importing) ends in exit 75 with the marker, not a death by signal,
    and the run directory resumes."""
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(lambda: _catches(proc.pid, signal.SIGTERM), proc, "a SIGTERM handler")
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 75 and "Traceback" not in stderr, stderr[-2000:]
    assert json.loads((run_dir / PREEMPTED_MARKER).read_text())["signal"] == "SIGTERM"
    cli("train", *ARGS, f"train.output_dir={run_dir}")
    assert json.loads((run_dir / directories.RESULT).read_text())["steps"] == 40


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    proc = cli(
        "train", *TINY, "train.train_steps=8", "train.lr=1e6", "train.min_lr=0", "train.clip_grad=0",
        "train.save_interval=2", f"train.output_dir={tmp_path}", check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-moe: error: loss is nan at step") and "is intact" in last
    step = (tmp_path / directories.CHECKPOINTS / directories.CHECKPOINT_LATEST).read_text().strip()
    assert (tmp_path / directories.CHECKPOINTS / step / "metadata.json").is_file()
    assert "Traceback" not in proc.stderr
