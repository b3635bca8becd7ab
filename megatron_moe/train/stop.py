"""The stop contract between a trainer and whoever runs it (`study run`, a SLURM job script).

A trainer that gets one of `TRAINER_STOP_SIGNALS` finishes its step, saves a checkpoint, leaves the
`PREEMPTED_MARKER` file in its output directory and exits with `PREEMPTED_EXIT_CODE`; running the same command
again resumes. torchrun reports any failed worker as exit code 1, so a runner decides "preempted" from the
marker (`was_preempted`), not from the exit code alone. Nothing here imports torch at module level: the study
runner and the launcher read these constants without it.

One trainer at a time owns a run directory: it holds an exclusive lock on `RUN_LOCK` there for as long as it
lives. A runner that dies takes its trainer with it (the trainer gets SIGTERM, checkpoints and exits; see
`study.runner`), and `survive_lost_output` keeps that last checkpoint from failing on the dead runner's pipe.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
from pathlib import Path

from megatron_moe import directories
from megatron_moe.files import atomic_write_json


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); the message is one line."""


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was saved and running the same command again resumes."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
TRAINER_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM sends before a time limit or preemption
RUNNER_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
"""Signals that stop `study run`, which hands them to its trainer as SIGTERM."""
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun's --signals-to-handle: the agent passes these on to its trainers instead of dying of them."""
PREEMPTED_MARKER = directories.PREEMPTED
RUN_LOCK = directories.RUN_LOCK
"""Held (flock) by the trainer writing a run directory; holds "pid@host" of that trainer."""


def forked_children_die_with_this_process() -> None:
    """Children this process forks from now on (megatron-core's checkpoint writers) get SIGKILL when it dies, even
    of SIGKILL, instead of living on under init (Linux; elsewhere nothing). They already drop the run's lock at
    fork (`files.lock_exclusive`), so none can hold a killed trainer's run directory."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    forking = [0]  # the pid of the process about to fork, as its child sees it

    def note() -> None:
        forking[0] = os.getpid()

    def arm() -> None:
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != forking[0]:  # the parent died between the fork and the line above
            os.kill(os.getpid(), signal.SIGKILL)

    os.register_at_fork(before=note, after_in_child=arm)


def mark_preempted(out_dir: Path, step: int, signum: int) -> None:
    atomic_write_json(out_dir / PREEMPTED_MARKER, {"step": step, "signal": signal.Signals(signum).name})


def clear_preempted(out_dir: Path) -> None:
    (out_dir / PREEMPTED_MARKER).unlink(missing_ok=True)


def was_preempted(out_dir: Path) -> bool:
    """Whether the last attempt in `out_dir` stopped on a signal with its checkpoint saved."""
    try:
        return isinstance(json.loads((out_dir / PREEMPTED_MARKER).read_text()), dict)
    except (OSError, ValueError):
        return False


class StopFlag:
    """Set by a trainer stop signal; checked between steps so a stop always lands on a step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for sig in TRAINER_STOP_SIGNALS:
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled (ranks may receive the signal at different steps)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([float(self.signum)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return bool(self.signum)


class _SurvivingStream:
    """A text stream whose writes keep succeeding after its reader is gone: on a broken pipe its descriptor is
    pointed at /dev/null, so later writes (and the flush at exit) go nowhere instead of raising."""

    def __init__(self, stream):
        self._stream = stream

    def _lost(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._lost()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._lost()
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_lost_output() -> None:
    """Let this process outlive whoever reads its stdout and stderr (a runner that was killed): it still gets to
    save its checkpoint when the stop signal that follows arrives, instead of dying of a broken pipe."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _SurvivingStream):
            try:
                stream.fileno()
            except (OSError, ValueError, AttributeError):
                continue  # not backed by a descriptor (captured by a test): nothing can break
            setattr(sys, name, _SurvivingStream(stream))
