"""A study's records as found on disk: the study record (study.json: what was designed, typed and versioned) and each
(arm, seed) run with its metrics rows and result, read for the report, its plots and the equal-resources fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_moe import directories
from megatron_moe.files import DamagedJsonLines, read_jsonl
from megatron_moe.schema import ConfigError, load_json_record
from megatron_moe.study.spec import DataOrder
from megatron_moe.train.result import RunResult, read_result

STUDY_RECORD_VERSION = 1
"""study.json's layout version; a record without one (written before it had one) is version 0 and is upgraded on
reading."""


@dataclass(frozen=True)
class ArmRecord:
    """One arm as designed (see `design.Arm`)."""

    name: str
    contract: str
    is_moe: bool
    changed_fields: list[str]
    train_steps: int
    tokens_per_step: int
    planned_tokens: int
    total_params: int
    active_params: int
    nonembedding_params: int
    nonembedding_active_params: int
    r_a: float
    flops_train_per_token: int
    flops_er_per_token: int
    changes: dict[str, Any] = field(default_factory=dict)
    """The changed fields' values."""
    match: dict[str, Any] = field(default_factory=dict)
    """Matched quantity, target, achieved and residual_pct (empty for the base MoE)."""
    model: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairRecord:
    """A paired comparison: gap = best val loss(baseline) - best val loss(moe), per seed."""

    name: str
    baseline: str
    moe: str
    description: str = ""


@dataclass(frozen=True)
class RunEntry:
    arm: str
    seed: int
    dir: str
    """Relative to the study directory."""
    hash: str = ""


@dataclass(frozen=True)
class StudyRecord:
    """study.json: the study as designed, written by `study run` and `study launch`, read by `study report`."""

    name: str
    seeds: list[int]
    arms: list[ArmRecord]
    pairs: list[PairRecord]
    runs: list[RunEntry]
    version: int = STUDY_RECORD_VERSION
    study_file: str | None = None
    updated: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    data_seed: int | None = None
    """The study's data.seed."""
    data_order: DataOrder = "shared"
    data_seeds: dict[str, int] = field(default_factory=dict)
    """data.seed of each seed's runs, keyed by seed as a string (as JSON keys are)."""
    seed_policy: str | None = None
    gap_sign: str | None = None
    family: dict[str, Any] | None = None
    """The equal-resources family (None without one)."""
    data: dict[str, dict[str, dict[str, Any]]] | None = None
    """Planned data description per seed (a string), then arm (None: launched without a data check)."""
    data_fingerprints_equal: bool | None = None
    """Whether the arms of every seed share one planned fingerprint (None: no data check)."""
    environment: dict[str, Any] | None = None
    git: dict[str, Any] | None = None
    design_warnings: list[str] = field(default_factory=list)
    """What made the design's answer weak before anything trained (`design.Design.warnings`)."""


RESULTS_VERSION = 1
"""results.json's layout version."""


@dataclass(frozen=True)
class StudyResults:
    """Everything a study report shows, as plain data: written as results.json, rendered as report.md and
    report.html. Rows below the top level are plain dicts, keyed as results.json shows them."""

    study: str
    study_dir: str
    generated: str
    confidence: float
    metric: str
    gap_sign: str
    seeds: list[int]
    data_order: DataOrder
    data_seeds: dict[str, int]
    arms: list[dict[str, Any]]
    """Per arm: best validation loss (per seed, mean, interval), bits/byte, final train loss and load imbalance."""
    gaps: list[dict[str, Any]]
    """Per pair: the per-seed gap, its mean and interval, the ordering and the gap over training."""
    contract: list[dict[str, Any]]
    """Per arm: what is held equal (parameters, FLOPs/token, tokens, data fingerprints)."""
    fingerprints: dict[str, dict[str, str | None]]
    runs: list[dict[str, Any]]
    warnings: list[str]
    data_seed: int | None = None
    ordering: dict[str, Any] | None = None
    regime: dict[str, Any] | None = None
    data_fingerprints_equal: bool | None = None
    family: dict[str, Any] | None = None
    equal_resources: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    git: dict[str, Any] | None = None
    version: int = RESULTS_VERSION


def load_results(path: str | Path) -> StudyResults:
    """A results.json written by `study report`; ConfigError (one line, naming the file) when unreadable, misshapen
    or of another layout version."""
    return load_json_record(StudyResults, Path(path), version=RESULTS_VERSION,
                            remedy="run `megatron-moe study report` again")


def _upgraded(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-0 record in today's layout: it had no data_order (one data.seed for every run) and described the
    data per arm, which then holds for every seed."""
    raw = dict(raw)
    if isinstance(raw.get("family"), dict) and raw["family"].get("reuse") == "loose":  # the one-epoch scheme's old name
        raw["family"] = {**raw["family"], "reuse": "fresh"}
    if "data_order" not in raw:
        raw["data_order"] = "shared"
        if isinstance(raw.get("data"), dict):
            raw["data"] = {str(seed): raw["data"] for seed in raw.get("seeds") or []}
        if raw.get("data_seed") is not None and not raw.get("data_seeds"):
            raw["data_seeds"] = {str(seed): raw["data_seed"] for seed in raw.get("seeds") or []}
    return raw


_REDO = "run `megatron-moe study run` again"


def load_study_record(study_dir: str | Path) -> StudyRecord:
    """Read `study_dir`/study.json; ConfigError (one line, naming the file and the bad key) when missing, corrupt,
    misshapen or of a newer layout."""
    study_dir = Path(study_dir)
    path = study_dir / directories.STUDY_JSON
    if not path.is_file():
        raise ConfigError(f"{str(study_dir)!r} is not a study directory (no study.json; run `megatron-moe study run` first)")
    record = load_json_record(StudyRecord, path, version=STUDY_RECORD_VERSION, remedy=_REDO, upgrade=_upgraded)
    names = {a.name for a in record.arms}
    for what, arm in [*((f"pair {p.name}", arm) for p in record.pairs for arm in (p.baseline, p.moe)),
                      *((f"run {r.dir}", r.arm) for r in record.runs)]:
        if arm not in names:
            raise ConfigError(f"{path} is not a valid study.json: {what} names arm {arm!r}, which is not in 'arms'; "
                              f"{_REDO}")
    return record


@dataclass
class RunData:
    """One (arm, seed) as found on disk."""

    arm: str
    seed: int
    dir: Path
    complete: bool
    result: RunResult | None
    """result.json (None: the run is not complete)."""
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


def load_run(study_dir: Path, entry: RunEntry, allow_damaged: bool = False) -> RunData:
    """One run's files; ConfigError (one line) when its metrics.jsonl has an unreadable line before the last, unless
    `allow_damaged`."""
    run_dir = study_dir / entry.dir
    result, metrics_path = read_result(run_dir), run_dir / directories.METRICS
    damaged: list[int] = []
    try:
        rows = read_jsonl(metrics_path, allow_damaged=allow_damaged, damaged=damaged) if metrics_path.is_file() else []
    except DamagedJsonLines as exc:
        raise ConfigError(f"{exc} (only a torn last line is skipped); repair the file, or pass --allow-damaged to "
                          "report without those lines") from None
    return RunData(arm=entry.arm, seed=entry.seed, dir=run_dir, complete=result is not None,
                   result=result, train=_rows_by_step(rows, "train"), evals=_rows_by_step(rows, "eval"),
                   damaged_lines=damaged)


def load_study_dir(study_dir: str | Path, allow_damaged: bool = False) -> tuple[StudyRecord, list[RunData]]:
    """The study record (study.json) and every run it lists. An upcycled arm's steps are counted on its data stream,
    from the start of the dense run it began from (its step 1 is that run's step k + 1), so that its tokens and its
    curves include the dense steps, as its budget does."""
    record = load_study_record(study_dir)
    offset = {a.name: int(a.match.get("dense_steps", 0)) for a in record.arms}
    runs = [load_run(Path(study_dir), e, allow_damaged) for e in record.runs]
    for r in runs:
        if offset.get(r.arm):
            r.train = [{**row, "step": row["step"] + offset[r.arm]} for row in r.train]
            r.evals = [{**row, "step": row["step"] + offset[r.arm]} for row in r.evals]
    return record, runs
