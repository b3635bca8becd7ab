"""`study run`: every (arm, seed) of a study not yet complete, one after another, each in a fresh trainer process.

Idempotent: a complete run (result.json) is skipped, a partial one resumed from its checkpoint, a run queued or
running on SLURM (`study launch`) left to its job. A stop signal (`RUNNER_STOP_SIGNALS`, e.g. Ctrl-C or SLURM's
SIGTERM) is handed to the trainer as SIGTERM; it checkpoints, and the runner exits with `PREEMPTED_EXIT_CODE`, so
the same command resumes. A runner killed outright (SIGKILL, an OOM kill) takes its trainer with it: the trainer
gets SIGTERM, checkpoints and exits, so no orphan keeps writing the run directory. The study directory's files
are `studydir`'s.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from megatron_moe import directories
from megatron_moe.schema import save_toml
from megatron_moe.files import lock_holder
from megatron_moe.study.datacheck import (
    absent_data_path,
    data_check,
    dry_run_note,
    refuse_unequal_data,
)
from megatron_moe.planner.cost import local_gpu, memory_limit
from megatron_moe.study.design import Design, Run, check_memory, design_study, family_line, format_arms
from megatron_moe.study.studydir import (
    environment,
    git_state,
    live_job,
    log_event,
    now,
    package_root,
    record_attempt,
    run_status,
    study_lock,
    write_study_files,
)
from megatron_moe.study.spec import StudyConfig
from megatron_moe.train.result import read_result
from megatron_moe.train.stop import (
    PREEMPTED_EXIT_CODE,
    RUNNER_STOP_SIGNALS,
    clear_preempted,
    was_preempted,
)


class _Stop(Exception):
    """A runner stop signal arrived: stop the current run (the trainer checkpoints on SIGTERM) and exit with
    PREEMPTED_EXIT_CODE; the same command resumes."""


def _loss(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _train_command(run: Run, nproc: int) -> list[str]:
    cli = ["-m", "megatron_moe.cli", "train", str(run.dir / directories.RUN_TOML)]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]


PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCK_WAIT_S = 180.0
"""How long a runner waits for an earlier trainer of the same run (one whose runner was killed, now saving its
checkpoint) to let go of the run directory."""


def _dies_with_runner() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send the trainer SIGTERM when this runner dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # looked up here: the forked child should only make the call
    runner = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != runner:  # the runner died before the request was made: nobody would send it
            os._exit(1)

    return preexec


def _wait_for_run_dir(run: Run, echo: Callable[[str], None], prefix: str) -> None:
    """Wait (up to LOCK_WAIT_S) while another trainer still holds the run directory; the trainer started after it
    refuses in one line if it is still held."""
    holder = lock_holder(run.dir / directories.RUN_LOCK)
    if holder is None:
        return
    echo(f"{prefix} waiting for the trainer that still holds {run.dir} ({holder}) to stop")
    deadline = time.monotonic() + LOCK_WAIT_S
    while holder is not None and time.monotonic() < deadline:
        time.sleep(0.5)
        holder = lock_holder(run.dir / directories.RUN_LOCK)


def _train_subprocess(run: Run, nproc: int, echo: Callable[[str], None], prefix: str) -> int:
    """Run the trainer in a fresh process, tee its output to run_dir/train.log; returns its exit code.

    The trainer gets a session of its own, so a terminal's Ctrl-C reaches the runner only, which hands it on as
    SIGTERM (checkpoint, then exit); the kernel sends it SIGTERM too should the runner die without handing it
    on. A trainer that saved and stopped on a signal of its own leaves the preemption marker in its run
    directory; that attempt returns PREEMPTED_EXIT_CODE, also under torchrun, which reports a failed worker as
    1. The marker is cleared first, so one left by an earlier attempt cannot count.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_root()), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    _wait_for_run_dir(run, echo, prefix)
    clear_preempted(run.dir)
    with (run.dir / directories.TRAIN_LOG).open("a") as log:
        log.write(f"==== {now()} {' '.join(_train_command(run, nproc))}\n")
        log.flush()
        proc = subprocess.Popen(_train_command(run, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, env=env, start_new_session=True,
                                preexec_fn=_dies_with_runner())
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo(f"{prefix} {line.rstrip()}")
            rc = proc.wait()
            return PREEMPTED_EXIT_CODE if rc and was_preempted(run.dir) else rc
        except BaseException:
            proc.terminate()  # the trainer saves a checkpoint on SIGTERM and exits
            # A second signal must not cut this wait short (the study's lock would go while the trainer still
            # saves): the runner is stopping already, so it is ignored.
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in RUNNER_STOP_SIGNALS}
            try:
                try:
                    rest = proc.communicate(timeout=120)[0]
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rest = proc.communicate()[0]
                log.write(rest or "")  # what it said while stopping
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            raise


def describe_data(data: dict[str, dict[str, dict[str, Any]]], data_order: str) -> list[str]:
    """One line per seed (one line in all when every seed has the same data): source, data seed, fingerprint; then a
    note for each arm that repeats data its schedule did not ask it to."""
    firsts = {seed: next(iter(arms.values())) for seed, arms in data.items()}
    d0 = next(iter(firsts.values()))
    notes = list(dict.fromkeys(f"note: {d['note']}" for arms in data.values() for d in arms.values() if "note" in d))
    if len({d["fingerprint"] for d in firsts.values()}) == 1:
        return [f"data: {d0['source']}, {d0['unique_tokens']:,} unique tokens, data.seed {d0['data_seed']}, "
                f"fingerprint {d0['fingerprint']} (all arms, all seeds; data_order = {data_order})", *notes]
    return [f"data: {d0['source']}, one data order per seed (data_order = {data_order}), the same for all arms of a seed:",
            *(f"  seed {seed}: data.seed {d['data_seed']}, {d['unique_tokens']:,} unique tokens, fingerprint "
              f"{d['fingerprint']}" for seed, d in firsts.items()), *notes]


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path | None = None,
    *,
    study_file: str | None = None,
    keep_going: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
    on_progress: Callable[[int, int], None] | None = None,
    gpu_memory: int | None = None,
    force: bool = False,
) -> int:
    """Train every (arm, seed) not yet complete, one after another; 0 when all runs are complete.
    `on_progress(complete, total)` is called at the start and after each run (a progress bar, say). A run that would
    not fit in `gpu_memory` bytes (default: this machine's GPU's) is refused before anything runs, unless `force`."""
    design = design_study(cfg, out_dir)
    out = design.out_dir
    s = cfg.study
    statuses = {r.name: run_status(r) for r in design.runs}
    n_done = sum(v == "done" for v in statuses.values())
    echo(f"study {s.name}: {len(design.arms)} arms x {len(s.seeds)} seeds = {len(design.runs)} runs in {out} "
         f"({n_done} complete, {sum(v == 'partial' for v in statuses.values())} partial)")
    gpu = local_gpu()
    on_gpu = gpu is not None or gpu_memory is not None  # a --gpu-memory asks about GPUs
    echo(format_arms(design, s.nproc_per_node, on_gpu))
    check_memory(design, s.nproc_per_node, on_gpu, memory_limit(gpu_memory, gpu), force, echo)
    if line := family_line(design):
        echo(line)
    for w in design.warnings:
        echo(f"warning: {w}")
    absent = absent_data_path(design) if dry_run else None
    if absent:
        echo(dry_run_note(absent))
    else:
        data = data_check(design)
        refuse_unequal_data(data)
        for line in describe_data(data, s.data_order):
            echo(line)
    if dry_run:
        for r in design.runs:
            echo(f"  {statuses[r.name]:<8}{r.name}")
        return 0
    with study_lock(out):
        return _run_locked(design, data, study_file, keep_going=keep_going, quiet=quiet, echo=echo,
                           on_progress=on_progress)


def _run_locked(design: Design, data: dict[str, Any], study_file: str | None, *, keep_going: bool, quiet: bool,
                echo: Callable[[str], None], on_progress: Callable[[int, int], None] | None = None) -> int:
    """The runner proper, under the study directory's lock: study record, then every run not yet complete."""
    s, out = design.study.study, design.out_dir
    statuses = {r.name: run_status(r) for r in design.runs}
    write_study_files(design, study_file, data)
    known = {r.name for r in design.runs}
    stray = [p.name for p in (out / directories.RUNS).glob("*") if p.is_dir() and p.name not in known] if (out / directories.RUNS).is_dir() else []
    if stray:
        echo(f"note: {len(stray)} run directories under {out / 'runs'} belong to another spec (left untouched)")

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    old = {sig: signal.getsignal(sig) for sig in RUNNER_STOP_SIGNALS}
    for sig in old:
        signal.signal(sig, on_signal)
    env, git = environment(), git_state()
    total = len(design.runs)
    steps_left = sum(r.config.train.train_steps for r in design.runs if statuses[r.name] != "done")
    steps_run, time_run, failed, queued = 0, 0.0, [], []
    start_all = time.perf_counter()
    current: tuple[Run, dict[str, Any]] | None = None
    if on_progress is not None:
        on_progress(sum(v == "done" for v in statuses.values()), total)
    try:
        for i, run in enumerate(design.runs, 1):
            tag = f"[{i}/{total}] {run.arm} seed {run.seed}"
            if statuses[run.name] == "done":
                echo(f"{tag}: complete, skipped ({run.name})")
                log_event(out, "skip", run=run.name)
                continue
            if live := live_job(run.dir):  # launched with `study launch --slurm` and still queued or running
                echo(f"{tag}: queued on SLURM as job {live[0]} ({live[1]}), skipped ({run.name})")
                log_event(out, "skip", run=run.name, slurm_job=live[0])
                queued.append(run.name)
                continue
            resumed = statuses[run.name] == "partial"
            steps = run.config.train.train_steps
            echo(f"{tag}: {'resuming' if resumed else 'starting'} {steps} steps -> runs/{run.name}")
            run.dir.mkdir(parents=True, exist_ok=True)
            save_toml(run.config, run.dir / directories.RUN_TOML)
            attempt = {"started": now(), "resumed": resumed, "versions": env, "git": git, "command": None}
            current = (run, attempt)
            record_attempt(run, attempt)
            log_event(out, "resume" if resumed else "start", run=run.name)
            t0 = time.perf_counter()
            rc = _train_subprocess(run, s.nproc_per_node, (lambda _: None) if quiet else echo, f"[{i}/{total} {run.arm} s{run.seed}]")
            elapsed = time.perf_counter() - t0
            attempt.update(ended=now(), returncode=rc, elapsed_s=elapsed,
                           command=" ".join(_train_command(run, s.nproc_per_node)))
            record_attempt(run, attempt)
            current = None
            complete = rc == 0 and (run.dir / directories.RESULT).is_file()
            if rc == PREEMPTED_EXIT_CODE:  # the trainer got a stop signal itself, saved and exited: stop too
                log_event(out, "interrupted", signal="trainer stopped", run=run.name, returncode=rc)
                echo(f"{tag}: stopped by a signal with a checkpoint saved; run the same command again to resume")
                return PREEMPTED_EXIT_CODE
            if not complete:
                log_event(out, "failed", run=run.name, returncode=rc, elapsed_s=elapsed)
                echo(f"{tag}: FAILED (exit {rc}); see {run.dir / directories.TRAIN_LOG}")
                failed.append(run.name)
                if not keep_going:
                    break
                continue
            if not s.keep_checkpoints:
                shutil.rmtree(run.dir / directories.CHECKPOINTS, ignore_errors=True)
            result = read_result(run.dir)
            log_event(out, "done", run=run.name, elapsed_s=elapsed, best_val_loss=result.best_val_loss)
            steps_run += steps
            time_run += elapsed
            steps_left -= steps
            eta = time_run / steps_run * steps_left if steps_run else 0.0
            complete = sum(run_status(r) == "done" for r in design.runs)
            echo(f"{tag}: done in {elapsed:,.0f} s, best val loss {_loss(result.best_val_loss)} | "
                 f"study {complete}/{total} complete, {time.perf_counter() - start_all:,.0f} s so far, eta {eta:,.0f} s")
            if on_progress is not None:
                on_progress(complete, total)
    except _Stop as exc:
        if current is not None:
            run, attempt = current
            attempt.update(ended=now(), returncode=None, interrupted=str(exc))
            record_attempt(run, attempt)
        log_event(out, "interrupted", signal=str(exc), run=current[0].name if current else None)
        echo(f"interrupted ({exc}); run the same command again to resume")
        return PREEMPTED_EXIT_CODE
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if failed:
        echo(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    remaining = [r.name for r in design.runs if run_status(r) != "done" and r.name not in queued]
    if remaining:
        return 1
    if queued:
        echo(f"{len(queued)} run(s) are queued or running on SLURM; once they finish: megatron-moe study report {out}")
        return 0
    echo(f"study complete: {total} runs in {out}; next: megatron-moe study report {out}")
    return 0
