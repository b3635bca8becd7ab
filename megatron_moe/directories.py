"""What lies where: the file names of a run directory, a checkpoint and a study directory, written once.

A run directory (`train.output_dir`) as `train` writes it:

    config.toml            the resolved config the run trains with
    metrics.jsonl          one row per logged step and per evaluation: the source of truth for every number
    result.json            written last: the run is complete
    checkpoints/           step_NNNNNNN/ directories and `latest` (see CHECKPOINT_*)
    preempted.json         left by a trainer stopped by a signal after saving (the stop contract)
    config_changes.jsonl   each resume that was allowed to change the config
    .train.lock            held by the one trainer writing the directory

`study run` and `study launch` add run.toml (the config the trainer is given), run.json (arm, seed, hash,
attempts), train.log (the trainer's output), slurm.json (submissions) and slurm.sbatch (the job script).

A study directory holds study.toml, study.json (the study record), log.jsonl (runner events), .lock, runs/<run>/ and,
from `study report`, results.json, report.md, report.html and plots/; job arrays put their scripts and logs in
slurm/.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- a run directory
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
RESULT = "result.json"
CHECKPOINTS = "checkpoints"
PREEMPTED = "preempted.json"
CONFIG_CHANGES = "config_changes.jsonl"
RUN_LOCK = ".train.lock"
RUN_TOML = "run.toml"
RUN_JSON = "run.json"
TRAIN_LOG = "train.log"
SLURM_JSON = "slurm.json"
SLURM_SCRIPT = "slurm.sbatch"

# ---------------------------------------------------------------- a checkpoint (checkpoints/step_NNNNNNN/)
CHECKPOINT_STATE = "train_state.json"
CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_CONFIG = CONFIG
CHECKPOINT_LATEST = "latest"
_STEP_NAME = re.compile(r"step_(\d{7,})")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint of `step`."""
    return f"step_{step:07d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint directory name stands for, or None for any other name."""
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None

# ---------------------------------------------------------------- a study directory
STUDY_TOML = "study.toml"
STUDY_JSON = "study.json"
STUDY_LOG = "log.jsonl"
STUDY_LOCK = ".lock"
RUNS = "runs"
RESULTS = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = "plots"
SLURM_DIR = "slurm"
