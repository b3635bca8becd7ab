"""Start-up checks of a run directory, before any data or model is built: one owner (a lock), the checkpoint to
resume from, and refusals of what must not happen silently (a resume with a changed config, a new run over
another run's metrics). Decided once on global rank 0 and handed to every rank by the trainer.
"""

from __future__ import annotations

import errno
import json
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from megatron_moe import directories
from megatron_moe.config import RESUMABLE_ROLES, ConfigError, RunConfig, load_run_config
from megatron_moe.files import Locked, lock_exclusive
from megatron_moe.train.checkpoint import find_checkpoint




@dataclass
class StartPlan:
    """What a run does at start-up, decided once (global rank 0) and handed to every rank."""

    checkpoint: Path | None
    """The checkpoint to resume from (None: start at step 0)."""
    notes: list[str]
    """One line each: checkpoints skipped and why, a `latest` file ignored."""
    changes: dict[str, tuple[Any, Any]]
    """Config fields changed since the checkpoint (allowed by train.allow_config_change): (old, new)."""


def claim_output_dir(out_dir: Path) -> list[str]:
    """Hold the run directory's lock for the life of this process; ConfigError (one line) when another process
    holds it. On a file system without locks the run goes on unlocked. Returns notes (a stale lock taken over)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create train.output_dir = {str(out_dir)!r}: {exc.strerror}") from None
    notes: list[str] = []
    try:
        lock_exclusive(out_dir / directories.RUN_LOCK, notes)
    except Locked as exc:
        raise ConfigError(f"train.output_dir = {str(out_dir)!r} is in use by another training process "
                          f"({exc.holder or 'unknown'}, lock {exc.path}); wait for it to end or stop it") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise ConfigError(f"cannot lock train.output_dir = {str(out_dir)!r}: {exc.strerror}") from None
    return notes


def release_unused_output_dir(out_dir: Path) -> None:
    """Remove a run directory that this attempt created and that holds nothing but its lock (a refusal after the
    claim): a refused run leaves no trace."""
    try:
        if {p.name for p in out_dir.iterdir()} <= {directories.RUN_LOCK}:
            (out_dir / directories.RUN_LOCK).unlink(missing_ok=True)
            out_dir.rmdir()
    except OSError:
        pass


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recorded_config(out_dir: Path, checkpoint: Path | None) -> dict[str, Any] | None:
    """The config the checkpoint was trained with, else the run directory's config.toml; None when neither
    can be read."""
    for path in ([checkpoint / directories.CHECKPOINT_CONFIG] if checkpoint else []) + [out_dir / directories.CONFIG]:
        try:
            return _flatten(tomllib.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
    return None


def config_changes(recorded: dict[str, Any], cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Fields a resume may not change (roles outside `config.RESUMABLE_ROLES`) whose value in `cfg` differs from
    the flattened `recorded` config (fields one of them lacks, added or removed by another version of this package,
    are not compared)."""
    now = _flatten(cfg.without(RESUMABLE_ROLES))
    return {k: (recorded[k], v) for k, v in now.items() if k in recorded and recorded[k] != v}


def _describe(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    shown = [f"{k} {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def plan_start(cfg: RunConfig) -> StartPlan:
    """The checkpoint to resume from and the config changes since, after refusing what must not happen: a
    damaged run directory (TrainingError), a resume with a changed config, or a new run over another run's
    metrics (ConfigError, each naming the override)."""
    t = cfg.train
    out_dir = Path(t.output_dir)
    checkpoint, notes = find_checkpoint(out_dir / directories.CHECKPOINTS)
    recorded = _recorded_config(out_dir, checkpoint)
    if checkpoint is not None:
        changes = {} if recorded is None else config_changes(recorded, cfg)
        if changes and not t.allow_config_change:
            raise ConfigError(
                f"train.output_dir = {str(out_dir)!r} was started with another config ({_describe(changes)}); "
                f"use a new train.output_dir, or set train.allow_config_change = true to resume from "
                f"{checkpoint.name} with the new values")
        return StartPlan(checkpoint, notes, changes)
    if (out_dir / directories.RESULT).is_file() and not t.overwrite_output_dir:
        raise ConfigError(
            f"train.output_dir = {str(out_dir)!r} holds a finished run (result.json) and no checkpoint to resume "
            "from; use a new train.output_dir, or set train.overwrite_output_dir = true to train it again from step 0")
    if (out_dir / directories.METRICS).is_file() and not t.overwrite_output_dir:
        changes = None if recorded is None else config_changes(recorded, cfg)
        if changes is None or changes:
            why = f"config {_describe(changes)}" if changes else "no config.toml"
            raise ConfigError(
                f"train.output_dir = {str(out_dir)!r} holds another run's metrics.jsonl ({why}) and no checkpoint; "
                "use a new train.output_dir, or set train.overwrite_output_dir = true to replace it")
    return StartPlan(None, notes, {})


def record_config_change(out_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append a resume's allowed config change to the run directory's config_changes.jsonl."""
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "step": step,
           "changes": {k: [old, new] for k, (old, new) in changes.items()}}
    with (out_dir / directories.CONFIG_CHANGES).open("a") as f:
        f.write(json.dumps(row) + "\n")


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return _describe(changes, limit=len(changes))


# ---------------------------------------------------------------- reading another run (export, upcycling)


def run_config(run_dir: Path, named: str, what: str = "a run directory") -> RunConfig:
    """The config the run in `run_dir` trained with; ConfigError (one line, calling it `named`, not `what`) when there
    is none."""
    if not (run_dir / directories.CONFIG).is_file():
        raise ConfigError(f"{named} is not {what} (no {directories.CONFIG})")
    return load_run_config(run_dir / directories.CONFIG)


def newest_checkpoint(run_dir: Path, named: str, purpose: str) -> Path:
    """The run's newest verified checkpoint; ConfigError (one line, calling it `named`: it has no checkpoint
    `purpose`) when it has none."""
    checkpoint, _ = find_checkpoint(run_dir / directories.CHECKPOINTS)
    if checkpoint is None:
        raise ConfigError(f"{named} has no checkpoint {purpose} (train with train.save_interval > 0; a study deletes "
                          "its runs' checkpoints unless study.keep_checkpoints = true)")
    return checkpoint
