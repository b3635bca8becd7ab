"""`study launch --slurm`: one sbatch script per (arm, seed), or one job array over them, and their submission.

Each run is one SLURM job. `srun` starts one torchrun agent per node; the agents meet at a c10d rendezvous
on the job's head node (the first host of `$SLURM_JOB_NODELIST`) and each starts `nproc_per_node` trainers,
so world size = nodes x nproc_per_node = tensor x pipeline x data parallel (the data-parallel size follows
from the launch; the run config fixes tensor, pipeline and expert).

Time limits and preemption: `#SBATCH --signal=B:USR1@<signal_seconds>` sends USR1 to the batch shell before
the time limit (`scancel --signal=USR1 --batch JOB` does the same by hand). The shell hands it to the
training step (srun -> torchrun agents, which pass `TORCHRUN_SIGNALS` on -> trainers); the trainers finish
the current step, save a checkpoint and exit, and the shell requeues the job (`scontrol requeue`; the job
keeps its id and appends to its log), or exits with `PREEMPTED_EXIT_CODE` when the requeue fails. Started
again, the trainer finds the checkpoint in the run directory and resumes bit-exactly. A SIGTERM (scancel, or
SLURM's own preemption) is handed on too, but never requeues.

Run directories are the study's (`design.design_study`): `study run` skips runs finished this way, leaves runs
still queued to their job, and `study report` reads them. Each run directory gains slurm.sbatch (the rendered
job script), slurm.json (the submissions, see `studydir`) and slurm-<job>.out (the job's log, all attempts;
job arrays log to <study>/slurm/ instead).
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from megatron_moe import directories
from megatron_moe.config import ConfigError, validate
from megatron_moe.schema import from_dict, load_toml, save_toml
from megatron_moe.files import atomic_write_text
from megatron_moe.study.datacheck import (
    absent_data_path,
    dry_run_note,
    refuse_unequal_data,
)
from megatron_moe.study.datacheck import data_check as run_data_check
from megatron_moe.planner.cost import ASSUMED_GPU, memory_limit
from megatron_moe.study.design import Design, Run, check_memory, design_study, format_arms
from megatron_moe.study.studydir import (
    LaunchError,
    check_unlocked,
    environment,
    git_state,
    live_job,
    now,
    package_root,
    record_submission,
    run_status,
    write_study_files,
)
from megatron_moe.study.spec import StudyConfig
from megatron_moe.train.stop import PREEMPTED_EXIT_CODE, TORCHRUN_SIGNALS


@dataclass
class LaunchConfig:
    """Where and how each run is submitted. Flags of `study launch`, or keys of a --launch-config TOML."""

    nodes: int = 1
    """Nodes per run."""
    gpus_per_node: int = 0
    """GPUs requested per node (0 = a CPU job); also the default processes per node."""
    nproc_per_node: int = 0
    """Trainer processes per node (0 = gpus_per_node, else the study's study.nproc_per_node)."""
    partition: str = ""
    """SLURM partition (empty = the cluster default)."""
    account: str = ""
    """SLURM account to charge (empty = your default)."""
    qos: str = ""
    """SLURM quality of service (empty = the default)."""
    time: str = ""
    """Time limit of each job attempt in SLURM syntax, e.g. 04:00:00 or 1-00:00:00 (empty = partition default)."""
    cpus_per_task: int = 0
    """CPUs per node task, i.e. for one torchrun agent and its trainers (0 = SLURM's default)."""
    mem: str = ""
    """Memory per node in SLURM syntax, e.g. 200G or 0 for all of it (empty = SLURM's default)."""
    exclusive: bool = False
    """Ask for whole nodes."""
    signal_seconds: int = 300
    """USR1 reaches the batch shell this many seconds before the time limit: checkpoint, then requeue."""
    master_port: int = 0
    """Rendezvous port on the head node (0 = 20000 + job id mod 20000, so jobs sharing a node differ)."""
    container_image: str = ""
    """Container image for the training step (pyxis/enroot `srun --container-image`; empty = none)."""
    container_mounts: str = ""
    """`srun --container-mounts`, e.g. /lustre:/lustre (the run directories must be visible inside)."""
    python: str = ""
    """Python on the compute nodes (default: this interpreter's path; `python` inside a container)."""
    workdir: str = ""
    """Directory the job runs in and puts on PYTHONPATH (default: the run directory, with this checkout of
    megatron-moe on PYTHONPATH when the package runs from one rather than from an installed wheel)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training, e.g. `module load cuda` or `source /path/venv/bin/activate`."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra #SBATCH options, e.g. --constraint=h100 or --reservation=r1."""
    srun_args: list[str] = field(default_factory=list)
    """Extra options of the training step's srun, e.g. --cpu-bind=none."""
    log_dir: str = ""
    """Where job logs go (default: each run directory; <study>/slurm for job arrays)."""
    array: bool = False
    """Submit one job array over the runs instead of one job per run."""
    max_parallel: int = 0
    """Job arrays: at most this many runs at once (0 = no limit)."""


_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")


def time_limit_seconds(text: str) -> int | None:
    """Seconds of a SLURM time limit (None for none: empty, 0, INFINITE or UNLIMITED); ConfigError when malformed."""
    if text.upper() in ("", "0", "INFINITE", "UNLIMITED"):
        return None
    if not _TIME.match(text):
        raise ConfigError(
            f"--time = {text!r} is not a SLURM time limit; use minutes, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(parts) == 1:
        return parts[0] * 60  # minutes
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]  # minutes:seconds
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def validate_launch(lc: LaunchConfig) -> None:
    """Check the options; raises ConfigError naming the flag."""
    for name in ("nodes",):
        if getattr(lc, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(lc, name)} must be >= 1")
    for name in ("gpus_per_node", "nproc_per_node", "cpus_per_task", "max_parallel"):
        if getattr(lc, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(lc, name)} must be >= 0")
    if not 1 <= lc.signal_seconds <= 65535:
        raise ConfigError(f"--signal-seconds = {lc.signal_seconds} must be in [1, 65535]")
    if lc.master_port and not 1024 <= lc.master_port <= 65535:
        raise ConfigError(f"--master-port = {lc.master_port} must be 0 (derived from the job id) or in [1024, 65535]")
    if lc.max_parallel and not lc.array:
        raise ConfigError("--max-parallel applies to job arrays; add --array")
    for name in ("partition", "account", "qos", "time", "mem", "container_image", "container_mounts", "log_dir"):
        value = getattr(lc, name)
        if re.search(r"\s", value):
            raise ConfigError(f"--{name.replace('_', '-')} = {value!r} must not contain whitespace")
    for name in ("sbatch_args", "srun_args"):
        for arg in getattr(lc, name):
            if not arg.startswith("-") or "\n" in arg:
                raise ConfigError(f"--{name.replace('_', '-')[:-5]}-arg {arg!r} must be one option such as --foo=bar")
    if any("\n" in line for line in lc.setup):
        raise ConfigError("--setup takes one shell line per flag")
    limit = time_limit_seconds(lc.time)
    if limit is not None and limit <= lc.signal_seconds:
        raise ConfigError(
            f"--time = {lc.time} ({limit} s) leaves no training before the stop signal at --signal-seconds = "
            f"{lc.signal_seconds} s before the limit; lower --signal-seconds or raise --time"
        )


def load_launch_config(path: str | None, flags: dict[str, Any]) -> LaunchConfig:
    """A --launch-config TOML (top-level keys = LaunchConfig fields), then the flags given (None = not given)."""
    data = load_toml(path) if path else {}
    for key, value in flags.items():
        if value is not None and value != []:
            data[key] = value
    lc = from_dict(LaunchConfig, data, "launch")
    validate_launch(lc)
    return lc


def processes_per_node(lc: LaunchConfig, study_nproc: int = 1) -> int:
    """Trainer processes per node: --nproc-per-node, else --gpus-per-node, else the study's nproc_per_node."""
    return lc.nproc_per_node or lc.gpus_per_node or study_nproc


def torchrun_command(python: str, run_toml: str, *, nnodes: int, nproc_per_node: int, endpoint: str,
                     rdzv_id: str, node_rank: int | None = None) -> list[str]:
    """One node's torchrun agent (c10d rendezvous at `endpoint`) training the run config `run_toml`."""
    cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc_per_node),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id, "--max-restarts", "0",
           # the agent hands these on to the trainers (USR1: checkpoint and stop) instead of dying of them
           "--signals-to-handle", TORCHRUN_SIGNALS]
    if node_rank is not None:  # c10d assigns ranks itself; a fixed node rank only orders the nodes
        cmd += ["--node-rank", str(node_rank)]
    return [*cmd, "-m", "megatron_moe.cli", "train", run_toml]


# The agent's arguments that bash must expand: variables the script sets itself (RUN_DIR, MASTER_*) or SLURM sets.
_RUN_TOML, _ENDPOINT, _RDZV_ID = "$RUN_DIR/run.toml", "$MASTER_ADDR:$MASTER_PORT", "$SLURM_JOB_ID"
_EXPANDED = frozenset({_RUN_TOML, _ENDPOINT, _RDZV_ID})


def _sh(arg: str) -> str:
    """Quote for bash. Only our own `_EXPANDED` arguments, matched whole, are double-quoted so that bash
    substitutes them; everything else (user-supplied paths, options, a --python or a launch profile's values)
    is single-quoted, so a `$(...)` or backquote in it stays text instead of running on the compute node."""
    return f'"{arg}"' if arg in _EXPANDED else shlex.quote(arg)


def _one_line(text: str) -> str:
    """`text` with line breaks and other control characters as spaces: it goes into a comment or an #SBATCH
    line, where a newline would start a shell command."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def _command_lines(cmd: Sequence[str], width: int = 100) -> str:
    """A long command as bash continuation lines, each option kept with its value."""
    groups: list[str] = []
    for arg in cmd:
        if groups and not arg.startswith("-") and groups[-1].startswith("-") and " " not in groups[-1]:
            groups[-1] += " " + _sh(arg)  # an option's value
        else:
            groups.append(_sh(arg))
    lines, line = [], ""
    for g in groups:
        if line and len(line) + 1 + len(g) > width:
            lines.append(line)
            line = "    " + g
        else:
            line = f"{line} {g}" if line else g
    return " \\\n".join([*lines, line])


def sbatch_directives(lc: LaunchConfig, job_name: str, output: str, gpus_per_node: int, extra: Sequence[str] = ()
                      ) -> list[str]:
    """The #SBATCH lines: layout, queue, log, requeue and the stop signal."""
    opts = [f"--job-name={_one_line(job_name)}", f"--nodes={lc.nodes}", "--ntasks-per-node=1"]
    if gpus_per_node:
        opts.append(f"--gpus-per-node={gpus_per_node}")
    if lc.cpus_per_task:
        opts.append(f"--cpus-per-task={lc.cpus_per_task}")
    if lc.mem:
        opts.append(f"--mem={lc.mem}")
    for name in ("partition", "account", "qos", "time"):
        if getattr(lc, name):
            opts.append(f"--{name}={getattr(lc, name)}")
    if lc.exclusive:
        opts.append("--exclusive")
    opts += [f"--output={output}", "--open-mode=append", "--requeue", f"--signal=B:USR1@{lc.signal_seconds}",
             *extra, *lc.sbatch_args]
    return [f"#SBATCH {o}" for o in opts]


def source_checkout() -> str | None:
    """The source tree this package runs from (a checkout, editable installs included), which jobs put on
    PYTHONPATH so that they run this code; None for an installed package, which the job's Python finds in its
    own site-packages (and which must not shadow a container's)."""
    root = package_root()
    return None if root.name in ("site-packages", "dist-packages") else str(root)


JOB_ENVIRONMENT = {
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # megatron-core's tensor-parallel communication keeps its order on one queue
    "NCCL_DEBUG": "WARN",  # NCCL's own errors and warnings in the job log, not its start-up chatter
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed or hung collective ends the job instead of holding the nodes
}
"""Environment of every training step; a value set where the job is submitted, or by a --setup line, wins."""


def job_python(lc: LaunchConfig) -> str:
    return lc.python or ("python" if lc.container_image else sys.executable)


def container_requirements() -> list[str]:
    """megatron-moe's requirements that a container gets installed when its Python lacks them: all but torch and
    numpy, which are the container's own (an NVIDIA PyTorch image builds them for its CUDA)."""
    try:
        reqs = importlib.metadata.requires("megatron-moe") or []
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that is not pip-installed
        pyproject = package_root() / "pyproject.toml"
        reqs = tomllib.loads(pyproject.read_text())["project"]["dependencies"] if pyproject.is_file() else []
    out = []
    for req in reqs:
        if "extra ==" in req:
            continue
        name = re.split(r"[<>=!~; \[]", req, maxsplit=1)[0]
        if name.lower() not in ("torch", "numpy"):
            out.append(req.split(";")[0].strip())
    return out


def container_setup(python: str) -> str:
    """The shell the training step runs first inside a container: when its Python cannot import megatron-moe's
    requirements, install them into a directory of this job on each node (megatron-core without its dependencies,
    so the image's torch stays), then start the torchrun agent given as arguments."""
    reqs = container_requirements()
    modules = ", ".join(re.split(r"[<>=!~ ]", r, maxsplit=1)[0].replace("-", ".") for r in reqs)
    core = [r for r in reqs if r.startswith("megatron-core")]
    rest = [r for r in reqs if not r.startswith("megatron-core")]
    py = shlex.quote(python)
    pip = f"{py} -m pip install --quiet --disable-pip-version-check --target \"$site\""
    return (f'{py} -c "import {modules}" 2>/dev/null || {{ site=/tmp/megatron-moe-site-$SLURM_JOB_ID; '
            f'echo "installing {" ".join(reqs)} into $site"; '
            f'{pip} --no-deps {" ".join(shlex.quote(r) for r in core)} && {pip} {" ".join(shlex.quote(r) for r in rest)}'
            ' && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" || exit 1; }; exec "$@"')


def container_mounts(lc: LaunchConfig, run_dir: Path, visible: Sequence[Path | str]) -> str:
    """`--container-mounts`: the run directory, the job's work directory, the package's checkout and `visible` (the
    study, the data, the logs) at the same place inside, where another of them does not already hold it, then
    --container-mounts as given."""
    source = lc.workdir or source_checkout()
    paths = [run_dir, lc.workdir or run_dir, *([source] if source else []), *visible]
    unique = sorted({Path(p).resolve() for p in paths if p})
    kept = [p for p in unique if not any(q != p and p.is_relative_to(q) for q in unique)]
    return ",".join([*(f"{p}:{p}" for p in kept), *([lc.container_mounts] if lc.container_mounts else [])])


def assumptions(lc: LaunchConfig, run_dir: Path, visible: Sequence[Path | str]) -> list[str]:
    """What the rendered jobs take for granted about the cluster, for the dry run to say."""
    env = ", ".join(f"{k}={v}" for k, v in JOB_ENVIRONMENT.items())
    lines = [f"assumed: each job exports {env} unless the submitting environment or a --setup line sets them"]
    if lc.container_image:
        lines += [f"assumed: container {lc.container_image} (pyxis/enroot) with python, torch and numpy; mounted at the "
                  f"same paths: {container_mounts(lc, run_dir, visible)}",
                  f"assumed: where the image's python lacks them, each job installs {', '.join(container_requirements())}"
                  " into /tmp on each node first (needs network on the compute nodes; an image built from "
                  "docker/Dockerfile has them)"]
    else:
        lines.append(f"assumed: the compute nodes run {job_python(lc)} with this environment's packages, and see "
                     "the study directory, the data and the package at the same paths as here")
    return lines


def render_run_script(lc: LaunchConfig, *, run_dir: Path, job_name: str, nproc_per_node: int, output: str,
                      title: str, keep_checkpoints: bool = True, visible: Sequence[Path | str] = ()) -> str:
    """The batch script of one run: rendezvous on the head node, srun + torchrun, stop signal -> requeue.

    In a container, `visible` (with the run directory and the package's checkout) is mounted, and megatron-moe's
    requirements are installed where the image lacks them."""
    python = job_python(lc)
    workdir = lc.workdir or str(run_dir)
    source = lc.workdir or source_checkout()
    world = lc.nodes * nproc_per_node
    port = str(lc.master_port) if lc.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if lc.cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05)
        srun.append(f"--cpus-per-task={lc.cpus_per_task}")
    agent = torchrun_command(python, _RUN_TOML, nnodes=lc.nodes, nproc_per_node=nproc_per_node,
                             endpoint=_ENDPOINT, rdzv_id=_RDZV_ID)
    if lc.container_image:
        srun += [f"--container-image={lc.container_image}", f"--container-workdir={workdir}",
                 f"--container-mounts={container_mounts(lc, run_dir, visible)}"]
        agent = ["bash", "-c", container_setup(python), "megatron-moe-train", *agent]
    srun += lc.srun_args
    shutdown_s = max(30, lc.signal_seconds - 30)
    lines = [
        "#!/bin/bash",
        f"# {_one_line(title)}",
        f"# {lc.nodes} node(s) x {nproc_per_node} process(es) = world size {world}. Rendered by `megatron-moe study "
        "launch`; resubmit with `study launch` (a plain sbatch of this file is not recorded in slurm.json).",
        *sbatch_directives(lc, job_name, output, lc.gpus_per_node),
        "",
        f"RUN_DIR={shlex.quote(str(run_dir))}",
        f"cd {shlex.quote(workdir)} || exit 1",
        *([f"export PYTHONPATH={shlex.quote(source)}${{PYTHONPATH:+:$PYTHONPATH}}"] if source else []),
        "export PYTHONUNBUFFERED=1",
        "# torchrun agents (torch >= 2.13; 30 s before) give the trainers this long to checkpoint before SIGKILL",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={shutdown_s}",
        *(f"export {k}=${{{k}:-{v}}}" for k, v in JOB_ENVIRONMENT.items()),
        *lc.setup,
        "",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)  # the head node',
        f"export MASTER_PORT={port}",
        'echo "==== $(date -Is) job $SLURM_JOB_ID attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# SLURM signals this shell (--signal=B:USR1@..., scancel --batch): hand the first signal to the step.",
        'stop_signal=""',
        "forward() {",
        '  [ -n "$stop_signal" ] && return',
        "  stop_signal=$1",
        '  echo "==== $(date -Is) SIG$1: the trainers checkpoint after the current step and stop"',
        '  [ -n "${step_pid:-}" ] && kill -s "$1" "$step_pid" 2>/dev/null',
        "}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "",
        "# one torchrun agent per node, c10d rendezvous on the head node",
        _command_lines(srun) + " \\",
        "  " + _command_lines(agent).replace("\n    ", "\n      ") + " &",
        "step_pid=$!",
        '[ -n "$stop_signal" ] && kill -s "$stop_signal" "$step_pid" 2>/dev/null  # a signal that came before the step',
        "while :; do",
        '  wait "$step_pid"; rc=$?',
        '  kill -0 "$step_pid" 2>/dev/null || break  # wait returns early when a trapped signal arrives',
        "done",
        'if [ -f "$RUN_DIR/result.json" ]; then',
        '  echo "==== $(date -Is) run complete"',
        *(() if keep_checkpoints else ['  rm -rf "$RUN_DIR/checkpoints"  # study.keep_checkpoints = false']),
        "  exit 0",
        "fi",
        'if [ "$stop_signal" = USR1 ]; then',
        '  echo "==== $(date -Is) requeueing job $SLURM_JOB_ID: it resumes from the checkpoint in $RUN_DIR"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        f"  exit {PREEMPTED_EXIT_CODE}",
        "fi",
        'echo "==== $(date -Is) training step failed (exit $rc)"',
        'exit $(( rc ? rc : 1 ))',
        "",
    ]
    return "\n".join(lines)


def render_array_script(lc: LaunchConfig, *, scripts: Sequence[Path], job_name: str, output: str, title: str) -> str:
    """A job array whose task i runs the i-th run's own script (same body, so the same signal handling)."""
    spec = f"0-{len(scripts) - 1}" + (f"%{lc.max_parallel}" if lc.max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"# {_one_line(title)}",
        "# Task i runs the i-th run script below (rendered by `megatron-moe study launch --array`).",
        *sbatch_directives(lc, job_name, output, lc.gpus_per_node, extra=[f"--array={spec}"]),
        "",
        "RUN_SCRIPTS=(",
        *(f"  {shlex.quote(str(s))}" for s in scripts),
        ")",
        'exec bash "${RUN_SCRIPTS[$SLURM_ARRAY_TASK_ID]}"',
        "",
    ]
    return "\n".join(lines)


def _scheduler(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise LaunchError(f"{cmd[0]} not found on PATH: run on a SLURM login node, or use --dry-run to only render")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{' '.join(cmd)} did not answer within {timeout:.0f} s") from None


def parse_job_id(stdout: str) -> str:
    """The job id from `sbatch --parsable` ('123' or '123;cluster') or its plain 'Submitted batch job 123'."""
    m = re.match(r"\s*(\d+)(;\S+)?\s*$", stdout) or re.search(r"Submitted batch job (\d+)", stdout)
    if not m:
        raise LaunchError(f"could not read a job id from sbatch's output {stdout.strip()!r}")
    return m.group(1)


def submit(script: Path) -> str:
    """sbatch a script; returns the job id."""
    proc = _scheduler(["sbatch", "--parsable", str(script)])
    if proc.returncode:
        why = proc.stderr.strip() or proc.stdout.strip()
        raise LaunchError(f"sbatch {script} failed (exit {proc.returncode}): {why}")
    return parse_job_id(proc.stdout)


def _runs_to_submit(design: Design, check_queue: bool, echo: Callable[[str], None]) -> list[Run]:
    """The runs neither complete nor (when check_queue) still queued or running from an earlier launch."""
    todo = []
    for run in design.runs:
        if run_status(run) == "done":
            echo(f"{run.arm} seed {run.seed}: complete, skipped ({run.name})")
        elif check_queue and (live := live_job(run.dir)):
            echo(f"{run.arm} seed {run.seed}: already queued as job {live[0]} ({live[1]}), skipped")
        else:
            todo.append(run)
    return todo


def launch_study(cfg: StudyConfig, lc: LaunchConfig, out_dir: str | Path | None = None, *,
                 study_file: str | None = None, dry_run: bool = False, data_check: bool = True,
                 echo: Callable[[str], None] = print, gpu_memory: int | None = None, force: bool = False) -> int:
    """Render (and unless dry_run, submit) a SLURM job for every run of the study not complete nor queued. A run that
    would not fit in `gpu_memory` bytes (default: the planner's assumed GPU's, on a GPU job) is refused before anything
    is written, unless `force`."""
    design = design_study(cfg, out_dir, check_world=False)  # checked below against this launch's world size
    out, name = design.out_dir, cfg.study.name
    nproc = processes_per_node(lc, cfg.study.nproc_per_node)
    world = lc.nodes * nproc
    for run in design.runs:
        try:
            validate(run.config, world)
        except ConfigError as exc:
            raise ConfigError(f"run {run.name} on --nodes {lc.nodes} x {nproc} processes: {exc}") from None
    data_paths = cfg.data.datasets()
    for data_path in data_paths:
        if not Path(data_path).is_absolute():  # the job runs in its run directory or --workdir, not here
            field = "data.blend:" if cfg.data.blend else "data.path ="
            raise ConfigError(f"{field} {data_path!r} is relative; jobs run in their run directory (or "
                              "--workdir), so give an absolute path")
    if re.search(r"\s", str(out)):
        raise ConfigError(f"study directory {str(out)!r} must not contain whitespace (SLURM log paths)")
    p = cfg.parallel
    echo(f"study {name}: {len(design.runs)} runs in {out}; each {lc.nodes} node(s) x {nproc} process(es) = "
         f"world size {world} (tensor {p.tensor} x pipeline {p.pipeline} x data {p.data_parallel_size(world)}"
         f", expert {p.expert})")
    on_gpu = lc.gpus_per_node > 0
    echo(format_arms(design, world, on_gpu))
    check_memory(design, world, on_gpu, memory_limit(gpu_memory, ASSUMED_GPU if on_gpu else None), force, echo)
    for w in design.warnings:
        echo(f"warning: {w}")
    absent = absent_data_path(design) if dry_run and data_check else None
    if absent:
        echo(dry_run_note(absent))
    data = run_data_check(design) if data_check and not absent else None
    if data is not None:
        refuse_unequal_data(data)
    todo = _runs_to_submit(design, check_queue=not dry_run, echo=echo)
    waiting = [r for r in todo if r.config.train.init_from and not Path(r.config.train.init_from).is_dir()]
    for run in waiting:  # jobs do not wait for each other: an upcycled run goes in once its checkpoint exists
        echo(f"  waits   {run.name}: starts from {run.config.train.init_from}, not there yet; launch again once "
             "that dense run has passed that step")
    todo = [r for r in todo if r not in waiting]
    if not todo:
        echo("nothing to submit")
        return 0
    check_unlocked(out)
    write_study_files(design, study_file, data)

    # Logs: each run directory (one job per run: requeued attempts append to slurm-<job>.out), or one folder.
    log_dir = Path(lc.log_dir).resolve() if lc.log_dir else (out / directories.SLURM_DIR if lc.array else None)
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create it: the job would fail silently
    visible = [out, *data_paths, *([log_dir] if log_dir else [])]
    scripts = []
    for run in todo:
        run.dir.mkdir(parents=True, exist_ok=True)
        save_toml(run.config, run.dir / directories.RUN_TOML)
        output = str(log_dir / "%x-%A_%a.out") if lc.array else str((log_dir or run.dir) / "slurm-%j.out")
        script = run.dir / directories.SLURM_SCRIPT
        atomic_write_text(script, render_run_script(
            lc, run_dir=run.dir, job_name=f"{name}-{run.name}", nproc_per_node=nproc, output=output,
            title=f"megatron-moe study {name}: run {run.name} (arm {run.arm}, seed {run.seed})",
            keep_checkpoints=cfg.study.keep_checkpoints, visible=visible))
        scripts.append(script)
    array_script = None
    if lc.array:
        array_script = out / directories.SLURM_DIR / f"array-{datetime.now().strftime('%Y%m%d-%H%M%S')}.sbatch"
        atomic_write_text(array_script, render_array_script(
            lc, scripts=scripts, job_name=name, output=str(log_dir / "%x-%A_%a.out"),
            title=f"megatron-moe study {name}: {len(scripts)} runs as one job array"))

    if dry_run:
        for line in assumptions(lc, todo[0].dir, visible):
            echo(line)
        echo(f"dry run: rendered {len(scripts)} script(s), submitted nothing")
        for run, script in zip(todo, scripts):
            echo(f"  {run.arm} seed {run.seed}: {script}")
        shown = array_script or scripts[0]
        echo(f"---- {shown}\n{shown.read_text().rstrip()}")
        return 0

    common = {"nodes": lc.nodes, "nproc_per_node": nproc, "world_size": world, "versions": environment(),
              "git": git_state()}
    if array_script:
        job = submit(array_script)
        echo(f"submitted job array {job} ({len(todo)} tasks): {array_script}")
        for i, (run, script) in enumerate(zip(todo, scripts)):
            record_submission(run.dir, {"job_id": job, "array_task": i, "submitted": now(), "script": str(script),
                                        "array_script": str(array_script),
                                        "log": str(log_dir / f"{name}-{job}_{i}.out"), **common})
            echo(f"  {run.arm} seed {run.seed}: task {job}_{i} -> runs/{run.name}")
        return 0
    for run, script in zip(todo, scripts):
        job = submit(script)
        record_submission(run.dir, {"job_id": job, "array_task": None, "submitted": now(), "script": str(script),
                                    "log": str((log_dir or run.dir) / f"slurm-{job}.out"), **common})
        echo(f"{run.arm} seed {run.seed}: submitted job {job} -> runs/{run.name}")
    return 0
