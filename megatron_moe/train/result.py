"""result.json: the record a finished run leaves, written last by the trainer (its presence means the run is
complete) and read by the study runner and report. No torch at import: readers are not trainers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_moe import directories
from megatron_moe.files import atomic_write_json
from megatron_moe.schema import load_json_record

RUN_RESULT_VERSION = 1
"""result.json's layout version; one without (written before it had one) is version 0, which had the same keys."""


@dataclass(frozen=True)
class RunResult:
    steps: int
    """Optimizer steps trained."""
    final_train_loss: float | None
    best_val_loss: float | None
    """The lowest validation loss over the run's evaluations (None without any)."""
    best_val_step: int | None
    train_time_s: float
    """Seconds spent training in the attempt that finished (excluding start-up)."""
    tokens_per_step: int
    data: dict[str, Any] = field(default_factory=dict)
    """What the run read: source, fingerprint, unique and consumed tokens, epochs (`data.describe`)."""
    gpu_mem_allocated_peak_gib: float | None = None
    gpu_mem_reserved_peak_gib: float | None = None
    version: int = RUN_RESULT_VERSION


def write_result(run_dir: str | Path, result: RunResult) -> None:
    atomic_write_json(Path(run_dir) / directories.RESULT, dataclasses.asdict(result))


def read_result(run_dir: str | Path) -> RunResult | None:
    """The run's result.json (None when the run has not finished); ConfigError (one line, naming the file) when it
    is unreadable, misshapen or of a newer layout."""
    path = Path(run_dir) / directories.RESULT
    if not path.is_file():
        return None
    return load_json_record(RunResult, path, version=RUN_RESULT_VERSION, remedy="delete it and train the run again",
                            upgrade=lambda raw: raw)  # version 0 had today's keys
