"""The study directory on disk: the study record (study.json, typed in `records`), the runs' records (run.json, slurm.json), the runner's log
and its lock, which `study run`, `study launch` and `study report` share. What lies where is `megatron_moe.directories`.

The code version (git commit) and package versions are recorded here, never hashed into a run's name.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import platform
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megatron_moe import directories
from megatron_moe.config import ConfigError
from megatron_moe.schema import to_toml
from megatron_moe.files import atomic_write_json, atomic_write_text
from megatron_moe.study.datacheck import unequal_data
from megatron_moe.study.records import RunEntry, StudyRecord, load_study_record
from megatron_moe.study.design import Design, Run, run_data_seed

LIVE_STATES = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SIGNALING", "STAGE_OUT",
}
"""squeue states of a job that will still run (or is running): its run is not submitted again."""


class LaunchError(RuntimeError):
    """A scheduler command failed; the message is one line."""


def environment() -> dict[str, str | None]:
    """Versions of python, torch, megatron-core, numpy and this package (without importing torch)."""
    from importlib import metadata

    import megatron_moe

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "megatron-core": version("megatron-core"),
        "numpy": version("numpy"),
        "megatron-moe": megatron_moe.__version__,
        "platform": platform.platform(),
    }


def package_root() -> Path:
    """The checkout this package runs from: trainers and jobs get it on PYTHONPATH."""
    import megatron_moe

    return Path(megatron_moe.__file__).resolve().parent.parent


def git_state() -> dict[str, Any] | None:
    """The commit of the checkout this package runs from and whether tracked files are modified."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(package_root()), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty)}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_status(run: Run) -> str:
    """'done' (result.json exists), 'partial' (started, not finished) or 'new'."""
    if (run.dir / directories.RESULT).is_file():
        return "done"
    if (run.dir / directories.RUN_JSON).is_file() or (run.dir / directories.METRICS).is_file():
        return "partial"
    return "new"


@contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold the study directory's lock: two runners on one study directory would train the same runs twice."""
    out.mkdir(parents=True, exist_ok=True)
    lock = (out / directories.STUDY_LOCK).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ConfigError(f"another `study run` is using {out} (lock {out / directories.STUDY_LOCK})") from None
    try:
        yield
    finally:
        lock.close()


def check_unlocked(out: Path) -> None:
    """Refuse while a `study run` holds the study directory's lock: jobs would train the same runs."""
    lock_path = out / directories.STUDY_LOCK
    if not lock_path.is_file():
        return
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"a `study run` is using {out} (lock {lock_path}); launch when it has stopped") from None


def study_record(design: Design, study_file: str | None, data: dict[str, Any] | None) -> StudyRecord:
    """The study-level record written to study.json."""
    cfg = design.study
    shared = cfg.study.data_order == "shared"
    return StudyRecord(
        name=cfg.study.name,
        study_file=study_file,
        updated=now(),
        spec=dataclasses.asdict(cfg.study),
        base=cfg.base().to_dict(),
        seeds=list(cfg.study.seeds),
        data_seed=cfg.data.seed,
        data_order=cfg.study.data_order,
        data_seeds={str(seed): run_data_seed(cfg, seed) for seed in cfg.study.seeds},
        seed_policy="train.seed = the run's seed (model init); " + (
            "data.seed = data_seed for every run (one data order)" if shared else
            "data.seed = data_seed + the run's seed (one data order per seed, shared by its arms)"),
        gap_sign="gap = best val loss(baseline) - best val loss(MoE); positive = the MoE is better",
        arms=[a.record() for a in design.arms],
        pairs=list(design.pairs),
        family=design.family,
        data=data,
        data_fingerprints_equal=None if data is None else not unequal_data(data),
        runs=[RunEntry(arm=r.arm, seed=r.seed, hash=r.hash, dir=f"{directories.RUNS}/{r.name}") for r in design.runs],
        environment=environment(),
        git=git_state(),
        design_warnings=design.warnings,
    )


def write_study_files(design: Design, study_file: str | None, data: dict[str, Any] | None) -> None:
    """study.toml and study.json. Without a data check (`data` None) an earlier study.json's planned data
    fingerprints are kept while the base data config is unchanged: they are what the report compares against
    before any run is complete."""
    out = design.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / directories.STUDY_TOML, to_toml(dataclasses.asdict(design.study)))
    record = study_record(design, study_file, data)
    try:
        previous = load_study_record(out) if data is None and (out / directories.STUDY_JSON).is_file() else None
    except ConfigError:  # unreadable or of another layout: this record replaces it
        previous = None
    if previous is not None:
        if previous.base.get("data") == record.base["data"] and previous.data_order == record.data_order:
            record = dataclasses.replace(record, data=previous.data,
                                         data_fingerprints_equal=previous.data_fingerprints_equal)
    atomic_write_json(out / directories.STUDY_JSON, dataclasses.asdict(record))


def log_event(out: Path, event: str, **fields: Any) -> None:
    with (out / directories.STUDY_LOG).open("a") as f:
        f.write(json.dumps({"time": now(), "event": event, **fields}) + "\n")


def record_attempt(run: Run, attempt: dict[str, Any]) -> None:
    """Add or update (same start time) one attempt in run.json."""
    path = run.dir / directories.RUN_JSON
    info = json.loads(path.read_text()) if path.is_file() else {
        "arm": run.arm, "seed": run.seed, "hash": run.hash, "attempts": [],
    }
    attempts = [a for a in info["attempts"] if a.get("started") != attempt["started"]] + [attempt]
    info.update(attempts=attempts, versions=attempt["versions"], git=attempt["git"])
    atomic_write_json(path, info)


def submissions(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / directories.SLURM_JSON
    return json.loads(path.read_text())["submissions"] if path.is_file() else []


def record_submission(run_dir: Path, entry: dict[str, Any]) -> None:
    atomic_write_json(run_dir / directories.SLURM_JSON, {"submissions": [*submissions(run_dir), entry]})


def job_state(job: str) -> str | None:
    """squeue's state of a job or array task ('123', '123_4'); None when SLURM no longer knows it."""
    if shutil.which("squeue") is None:
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"squeue -j {job} did not answer within 60 s: cannot tell whether it is queued") from None
    if proc.returncode != 0:
        if "invalid job id" in proc.stderr.lower():  # SLURM has forgotten the job: it is not queued
            return None
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise LaunchError(f"squeue -j {job} failed ({reason}): cannot tell whether it is queued")
    states = proc.stdout.split()
    return states[0] if states else None


def live_job(run_dir: Path) -> tuple[str, str] | None:
    """(job, state) of the run's last submission when it is still queued or running."""
    subs = submissions(run_dir)
    if not subs:
        return None
    last = subs[-1]
    job = last["job_id"] + (f"_{last['array_task']}" if last.get("array_task") is not None else "")
    state = job_state(job)
    return (job, state) if state in LIVE_STATES else None
