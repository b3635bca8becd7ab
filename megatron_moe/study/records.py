"""The runs of a study as found on disk: each (arm, seed) with its metrics rows and result, read for the report, its
plots and the equal-resources fit."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_moe import directories
from megatron_moe.config import ConfigError
from megatron_moe.files import DamagedJsonLines, read_jsonl
from megatron_moe.study.rundir import StudyManifest, load_manifest


@dataclass
class RunData:
    """One (arm, seed) as found on disk."""

    arm: str
    seed: int
    dir: Path
    complete: bool
    """result.json exists."""
    result: dict[str, Any] | None
    train: list[dict[str, Any]] = field(default_factory=list)
    """kind=train rows, one per step (a resumed run's repeated steps keep the last row)."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """kind=eval rows, one per step."""
    damaged_lines: list[int] = field(default_factory=list)
    """metrics.jsonl lines before the last that did not parse, left out (with --allow-damaged)."""

    @property
    def best(self) -> tuple[float, int] | None:
        """(best validation loss, its step) from metrics.jsonl."""
        row = self.best_row
        return None if row is None else (row["val_loss"], row["step"])

    @property
    def best_row(self) -> dict[str, Any] | None:
        """The eval row with the lowest validation loss (the earliest of equal ones)."""
        return min(self.evals, key=lambda r: (r["val_loss"], r["step"])) if self.evals else None


def _rows_by_step(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    by_step: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") == kind and "step" in r:
            by_step[int(r["step"])] = r  # a resumed run may repeat steps after its last checkpoint: keep the last
    return [by_step[s] for s in sorted(by_step)]


def load_run(study_dir: Path, entry: dict[str, Any], allow_damaged: bool = False) -> RunData:
    """One run's files; ConfigError (one line) when its metrics.jsonl has an unreadable line before the last, unless
    `allow_damaged`."""
    run_dir = study_dir / entry["dir"]
    result_path, metrics_path = run_dir / directories.RESULT, run_dir / directories.METRICS
    result = json.loads(result_path.read_text()) if result_path.is_file() else None
    damaged: list[int] = []
    try:
        rows = read_jsonl(metrics_path, allow_damaged=allow_damaged, damaged=damaged) if metrics_path.is_file() else []
    except DamagedJsonLines as exc:
        raise ConfigError(f"{exc} (only a torn last line is skipped); repair the file, or pass --allow-damaged to "
                          "report without those lines") from None
    return RunData(arm=entry["arm"], seed=int(entry["seed"]), dir=run_dir, complete=result is not None,
                   result=result, train=_rows_by_step(rows, "train"), evals=_rows_by_step(rows, "eval"),
                   damaged_lines=damaged)


def load_study_dir(study_dir: str | Path, allow_damaged: bool = False) -> tuple[StudyManifest, list[RunData]]:
    """The manifest (study.json) and every run it lists."""
    man = load_manifest(study_dir)
    return man, [load_run(Path(study_dir), e, allow_damaged) for e in man.runs]
