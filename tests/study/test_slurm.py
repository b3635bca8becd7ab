"""`study launch --slurm`: rendered scripts, multi-node torchrun, and a real SLURM on this machine.

Three groups:
- rendering and bad input (no scheduler needed): a 2-node x 8-GPU layout gives the right counts, rendezvous
  and container flags; bad flags fail with one line and exit 2;
- two torchrun agents on loopback (`--nnodes 2`, c10d rendezvous, one process each) form one job whose
  expert-parallel losses match the single-process run: the multi-node launch path without a cluster;
- a local SLURM (tests/study/slurm_fixture.py: munged, slurmctld and two slurmd emulating two nodes, all started
  here and torn down after): a 2-task srun forms one gloo group; a study launched as a job array runs to
  completion and `study run`/`study report` reuse its run directories; a USR1 checkpoints and requeues a
  run's job, which resumes and ends with the losses of the uninterrupted run; a 2-node job trains like one
  process.
The SLURM group skips, saying why, where a cluster cannot start (not root, packages missing).

Every process runs with OMP_NUM_THREADS=1: the machine is small and shared, and runs compared bit for bit
must use the same thread count.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_moe import directories
from megatron_moe.cli import main
from megatron_moe.config import DataConfig, load_run_config
from megatron_moe.parallel import free_port
from megatron_moe.schema import save_toml
from megatron_moe.study import slurm as slurm_launch
from megatron_moe.study.records import load_results
from megatron_moe.study.slurm import (
    LaunchConfig,
    parse_job_id,
    render_run_script,
    time_limit_seconds,
    torchrun_command,
)
from megatron_moe.train.stop import PREEMPTED_EXIT_CODE, TORCHRUN_SIGNALS
from tests.conftest import (REFERENCE, REPO, TINY_MOE, cli, cli_env, end, train_losses, train_rows, wait_until,
                            write_study)
from tests.study.slurm_fixture import ENDED, LocalSlurm, unavailable_reason

STEPS = 40
RUN = [*TINY_MOE, f"train.train_steps={STEPS}", "train.seed=1"]
SEED_1_DATA = f"data.seed={DataConfig().seed + 1}"  # the data order of seed 1 in a study built from RUN
TOLERANCE = 1e-5  # nats; other layouts sum in another order (see test_parallel.py), resumed runs are exact


ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""Jobs here share 2 cores with the SLURM daemons and each other."""


def _cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return cli(*args, env={**(env or {}), **ONE_THREAD}, check=check)


def _study_file(tmp_path: Path) -> Path:
    """Study "tiny": the base MoE, seed 1."""
    return write_study(tmp_path / "tiny.toml")


def _close(got: list[float], ref: list[float]) -> None:
    assert len(got) == len(ref) == STEPS
    worst = max(abs(a - b) for a, b in zip(got, ref))
    assert worst < TOLERANCE, f"largest loss difference {worst:.2e}"


@pytest.fixture
def reference(reference_run) -> list[float]:
    """Losses of the single-process run every launched run is compared with: seed 1 of a study of RUN (whose
    evaluations and checkpoints do not change its losses)."""
    return train_losses(reference_run(*REFERENCE))


# ================================================================ rendering and bad input


def test_render_two_nodes_by_eight_gpus(tmp_path):
    out = tmp_path / "study"
    proc = _cli(
        "study", "launch", str(_study_file(tmp_path)), *TINY_MOE,
        "train.global_batch_size=16", "train.micro_batch_size=1",
        "--slurm", "--dry-run", "--skip-data-check", "-o", str(out), "--nodes", "2", "--gpus-per-node", "8",
        "--partition", "batch", "--account", "proj", "--qos", "high", "--time", "04:00:00", "--signal-seconds", "600",
        "--container-image", "nvcr.io#nvidia/pytorch:26.04-py3", "--container-mounts", "/lustre:/lustre",
        "--setup", "module load nccl",
    )
    assert "world size 16 (tensor 1 x pipeline 1 x data 16, expert 1)" in proc.stdout
    (run_dir,) = (out / "runs").iterdir()
    script = (run_dir / directories.SLURM_SCRIPT).read_text()
    directives = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    for d in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch", "--account=proj",
              "--qos=high", "--time=04:00:00", "--requeue", "--open-mode=append", "--signal=B:USR1@600",
              f"--output={run_dir}/slurm-%j.out"):
        assert d in directives, (d, directives)
    flat = re.sub(r"\s*\\\n\s*", " ", script)  # join continuation lines
    assert "--nnodes 2 --nproc-per-node 8 --rdzv-backend c10d" in flat
    assert '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"' in flat
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    assert "--container-image=nvcr.io#nvidia/pytorch:26.04-py3" in flat
    # the study directory and this checkout at the same paths inside, then the mounts asked for
    mounts = re.search(r"--container-mounts=(\S+)", flat).group(1).split(",")
    assert f"{out}:{out}" in mounts and f"{REPO}:{REPO}" in mounts and mounts[-1] == "/lustre:/lustre"
    assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in script  # overridable defaults
    assert script.index("export NCCL_DEBUG") < script.index("module load nccl")  # --setup lines come after
    assert "assumed: container nvcr.io#nvidia/pytorch:26.04-py3" in proc.stdout
    assert "assumed: each job exports CUDA_DEVICE_MAX_CONNECTIONS=1" in proc.stdout
    assert re.search(r"srun --ntasks-per-node=1 --kill-on-bad-exit=1 .*python -m torch\.distributed\.run", flat)
    assert '-m megatron_moe.cli train "$RUN_DIR/run.toml" &' in flat
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in flat
    assert "module load nccl" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert subprocess.run(["bash", "-n", str(run_dir / directories.SLURM_SCRIPT)]).returncode == 0
    # The run directory is the study's: study run/report read it; a dry run submits nothing.
    assert (run_dir / directories.RUN_TOML).is_file() and (out / directories.STUDY_JSON).is_file()
    assert not (run_dir / directories.SLURM_JSON).exists()
    assert load_run_config(run_dir / directories.RUN_TOML).train.output_dir == str(run_dir)


def test_render_job_array(tmp_path):
    out = tmp_path / "study"
    _cli("study", "launch", str(_study_file(tmp_path)), *TINY_MOE, "study.seeds=[1,2,3]", "--slurm", "--dry-run",
         "--skip-data-check", "-o", str(out), "--array", "--max-parallel", "2", "--master-port", "29500")
    (array,) = (out / "slurm").glob("array-*.sbatch")
    text = array.read_text()
    assert "#SBATCH --array=0-2%2" in text and f"#SBATCH --output={out}/slurm/%x-%A_%a.out" in text
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 3 and all(str(r / directories.SLURM_SCRIPT) in text for r in runs)
    assert "export MASTER_PORT=29500" in (runs[0] / directories.SLURM_SCRIPT).read_text()
    assert subprocess.run(["bash", "-n", str(array)]).returncode == 0


def test_layout_is_checked_against_the_launch_world_size(tmp_path):
    """Expert parallel 2 needs two processes: the launch's, not `study run`'s study.nproc_per_node = 1."""
    args = ["study", "launch", str(_study_file(tmp_path)), *TINY_MOE, "parallel.expert=2", "--slurm", "--dry-run",
            "--skip-data-check"]
    _cli(*args, "-o", str(tmp_path / "two"), "--nproc-per-node", "2")
    (run_dir,) = (tmp_path / "two" / "runs").iterdir()
    assert "--nproc-per-node 2" in (run_dir / directories.SLURM_SCRIPT).read_text()
    one = _cli(*args, "-o", str(tmp_path / "one"), check=False)
    assert one.returncode == 2 and "parallel.expert = 2 does not divide data x tensor = 1 x 1 = 1" in one.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "add --slurm"),
        (["--slurm", "--nodes", "0"], "--nodes = 0 must be >= 1"),
        (["--slurm", "--time", "4h"], "--time = '4h' is not a SLURM time limit"),
        (["--slurm", "--time", "5", "--signal-seconds", "300"], "leaves no training before the stop signal"),
        (["--slurm", "--nodes", "3"], "not divisible by train.micro_batch_size x data parallel"),
        (["--slurm", "--max-parallel", "2"], "--max-parallel applies to job arrays"),
        (["--slurm", "--sbatch-arg", "constraint=h100"], "must be one option such as --foo=bar"),
        (["--slurm", "--partition", "a b"], "must not contain whitespace"),
        (["--slurm", "--launch-config", "LAUNCH"], "unknown key 'launch.gpus'"),
        # a name goes into #SBATCH --job-name and the study directory: no options smuggled in, no path out of runs/
        (["--slurm", "study.name=mini --account=stolen --qos=high"], "study.name = 'mini --account=stolen --qos=high' is not allowed"),
        (["--slurm", "study.name=../../../../tmp/x"], "study.name = '../../../../tmp/x' is not allowed"),
        (["--slurm", "study.name=-x"], "is not allowed; use 1-100 letters, digits"),
    ],
)
def test_bad_launch_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "launch.toml").write_text("gpus = 8\n")
    args = [a.replace("LAUNCH", str(tmp_path / "launch.toml")) for a in args]
    rc = main(["study", "launch", str(_study_file(tmp_path)), *TINY_MOE, "-o", str(tmp_path / "s"), "--dry-run",
               "--skip-data-check", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("megatron-moe: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def _rendered(tmp_path: Path, *flags: str) -> tuple[Path, str]:
    """(run directory, its script) of a dry-run launch of the one-run study, in this process."""
    tmp_path.mkdir(parents=True)
    out = tmp_path / "study"
    assert main(["study", "launch", str(_study_file(tmp_path)), *TINY_MOE, "--slurm", "--dry-run", "--skip-data-check",
                 "-o", str(out), *flags]) == 0
    (run_dir,) = (out / "runs").iterdir()
    return run_dir, (run_dir / directories.SLURM_SCRIPT).read_text()


def test_jobs_run_in_their_run_directory_from_a_checkout_or_a_wheel(tmp_path, monkeypatch, capsys):
    # From this checkout: the job runs in its run directory and imports the checkout's code.
    run_dir, script = _rendered(tmp_path / "checkout")
    assert f"\ncd {run_dir} || exit 1\n" in script
    assert re.findall(r"^export PYTHONPATH=(\S+)$", script, re.M) == [f"{REPO}${{PYTHONPATH:+:$PYTHONPATH}}"]
    # Installed from a wheel: nothing in the script points into site-packages (its Python finds the package).
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    monkeypatch.setattr(slurm_launch, "package_root", lambda: site)
    run_dir, script = _rendered(tmp_path / "wheel")
    assert f"\ncd {run_dir} || exit 1\n" in script
    assert "PYTHONPATH=" not in script and "site-packages" not in script
    assert str(REPO) not in script.replace(sys.executable, "python")  # the interpreter aside, nothing of the checkout
    assert subprocess.run(["bash", "-n", str(run_dir / directories.SLURM_SCRIPT)]).returncode == 0
    # --workdir, as before: the job runs there and puts it on PYTHONPATH.
    run_dir, script = _rendered(tmp_path / "workdir", "--workdir", "/opt/moe")
    assert "\ncd /opt/moe || exit 1\n" in script
    assert re.findall(r"^export PYTHONPATH=(\S+)$", script, re.M) == ["/opt/moe${PYTHONPATH:+:$PYTHONPATH}"]


def test_user_arguments_cannot_run_shell_code_in_the_job_script(tmp_path):
    """A `$(...)`, backquote or `$VAR` in --python, a launch profile's srun option or container path stays text in the
    rendered script; only our own variables (the run directory, rendezvous, job id) are expanded."""
    marker = tmp_path / "ran"
    evil = f"$(touch {marker})"
    lc = LaunchConfig(python=f"/opt/py{evil}/python", srun_args=[f"--comment=`touch {marker}`"],
                      container_image=f"img{evil}", container_mounts="/a:/b$HOME", workdir=str(tmp_path / "w d"))
    script = render_run_script(lc, run_dir=tmp_path / "run", job_name="j\n#SBATCH --x", nproc_per_node=1,
                               output=str(tmp_path / "slurm-%j.out"), title="t\nrm -rf /")
    flat = re.sub(r"\s*\\\n\s*", " ", script)
    assert f"'/opt/py{evil}/python' -m torch.distributed.run" in flat
    assert f"'--comment=`touch {marker}`'" in flat and f"'--container-image=img{evil}'" in flat
    assert re.search(r"'--container-mounts=[^']*,/a:/b\$HOME'", flat)
    assert '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID"' in flat
    assert '-m megatron_moe.cli train "$RUN_DIR/run.toml" &' in flat
    assert "\nrm -rf /" not in script and "\n#SBATCH --x" not in script  # names stay on their own line
    # bash agrees: with the commands stubbed out, the arguments they would get are the literal texts
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("srun", "scontrol"):
        (stubs / name).write_text('#!/bin/sh\nprintf "%s\\n" "$@" >> "$ARGS_LOG"\n')
        (stubs / name).chmod(0o755)
    (tmp_path / "w d").mkdir()
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "ARGS_LOG": str(tmp_path / "args"), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n1", "HOME": "/home/x"}
    subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    args = (tmp_path / "args").read_text().splitlines()
    assert f"/opt/py{evil}/python" in args and f"--comment=`touch {marker}`" in args
    assert any(a.startswith("--container-mounts=") and a.endswith(",/a:/b$HOME") for a in args)
    assert str(tmp_path / "run") + "/run.toml" in args
    assert not marker.exists()


@pytest.mark.parametrize("has_requirements", [True, False])
def test_container_step_installs_what_the_image_lacks_then_starts_the_agent(tmp_path, has_requirements):
    """Inside a container the step first checks that its python imports megatron-moe's requirements; when it does
    not, megatron-core is installed without dependencies (the image's torch stays) and the rest with theirs, into
    a directory of the job on PYTHONPATH; then the agent starts with its arguments intact."""
    from megatron_moe.study.slurm import container_requirements, container_setup

    stub = tmp_path / "py"
    stub.write_text('#!/bin/sh\nif [ "$1" = -c ]; then exit "$IMPORT_RC"; fi\n'
                    'printf "%s|" "$@" >> "$LOG"; printf "PYTHONPATH=%s\\n" "$PYTHONPATH" >> "$LOG"\n')
    stub.chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": "/usr/bin:/bin", "LOG": str(log), "SLURM_JOB_ID": "42", "IMPORT_RC": "0" if has_requirements else "1"}
    proc = subprocess.run(["bash", "-c", container_setup(str(stub)), "step", str(stub), "-m", "agent", "a b"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[-1].startswith("-m|agent|a b|")  # the agent, with its arguments intact
    if has_requirements:
        assert len(calls) == 1 and calls[0].endswith("PYTHONPATH=")
        return
    site = "/tmp/megatron-moe-site-42"
    core = [r for r in container_requirements() if r.startswith("megatron-core")]
    assert core == ["megatron-core==0.16.1"] and not any(r.startswith(("torch", "numpy")) for r in container_requirements())
    assert calls[0].startswith(f"-m|pip|install|--quiet|--disable-pip-version-check|--target|{site}|--no-deps|{core[0]}|")
    assert "|tokenizers>=0.19|" in calls[1] and "--no-deps" not in calls[1]
    assert calls[-1].endswith(f"PYTHONPATH={site}")


def test_relative_data_path_is_refused(tmp_path):
    proc = _cli("study", "launch", str(_study_file(tmp_path)), *TINY_MOE, "data.path=data/ts", "--slurm", "--dry-run",
                "--skip-data-check", "-o", str(tmp_path / "s"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("megatron-moe: error: data.path = 'data/ts' is relative")
    assert not (tmp_path / "s").exists()


def _requeue_exit_code(script: str) -> int:
    """The exit code of the batch script after a USR1 stop whose `scontrol requeue` failed."""
    m = re.search(r'^  scontrol requeue "\$SLURM_JOB_ID" && exit 0\n  exit (\d+)$', script, re.M)
    assert m, script
    return int(m.group(1))


def test_stop_contract_is_rendered_from_train_stop(tmp_path, monkeypatch):
    """The batch script's preempted exit code and torchrun's handed-on signals come from train/stop.py."""
    def render() -> str:
        return render_run_script(LaunchConfig(), run_dir=tmp_path / "run", job_name="j", nproc_per_node=2,
                                 output=str(tmp_path / "slurm-%j.out"), title="t")

    assert _requeue_exit_code(render()) == PREEMPTED_EXIT_CODE == 75
    monkeypatch.setattr(slurm_launch, "PREEMPTED_EXIT_CODE", 99)
    assert _requeue_exit_code(render()) == 99
    cmd = torchrun_command("python", "run.toml", nnodes=1, nproc_per_node=2, endpoint="h:1", rdzv_id="r")
    assert cmd[cmd.index("--signals-to-handle") + 1] == TORCHRUN_SIGNALS
    assert f"--signals-to-handle {TORCHRUN_SIGNALS}" in re.sub(r"\s*\\\n\s*", " ", render())


def test_time_limits_and_job_ids():
    assert [time_limit_seconds(t) for t in ("90", "90:30", "04:00:00", "1-00", "1-02:03", "2-00:00:01", "")] == [
        5400, 5430, 14400, 86400, 93780, 172801, None]
    assert [time_limit_seconds(t) for t in ("0", "infinite", "UNLIMITED")] == [None] * 3  # SLURM: no limit
    assert parse_job_id("1234\n") == "1234" and parse_job_id("77;cluster") == "77"
    assert parse_job_id("Submitted batch job 9") == "9"


# ================================================================ two nodes on loopback, no scheduler


@pytest.mark.slow
def test_two_torchrun_agents_on_loopback_match_single_process(reference, tmp_path):
    cfg = load_run_config(None, [*RUN, SEED_1_DATA, "parallel.expert=2", f"train.output_dir={tmp_path / 'run'}"],
                          world_size=2)
    save_toml(cfg, tmp_path / directories.RUN_TOML)
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(torchrun_command(sys.executable, str(tmp_path / directories.RUN_TOML), nnodes=2,
                                          nproc_per_node=1, endpoint=endpoint, rdzv_id="loopback", node_rank=rank),
                         cwd=REPO, env=cli_env(env=ONE_THREAD), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for rank in (0, 1)
    ]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world 2 = tp 1 x pp 1 x dp 2 (ep 2)" in "".join(outputs)
    _close(train_losses(tmp_path / "run"), reference)


def test_torchrun_agent_hands_usr1_to_the_trainer(tmp_path):
    """USR1 to the agent alone (what srun delivers to its task) reaches the trainer, which checkpoints and
    stops; an agent that does not handle USR1 dies of it and leaves the trainer running on, orphaned."""
    run_dir = tmp_path / "run"
    cfg = load_run_config(None, [*TINY_MOE, "train.train_steps=2000", f"train.output_dir={run_dir}"], world_size=1)
    save_toml(cfg, tmp_path / directories.RUN_TOML)
    agent = subprocess.Popen(torchrun_command(sys.executable, str(tmp_path / directories.RUN_TOML), nnodes=1,
                                              nproc_per_node=1, endpoint=f"127.0.0.1:{free_port()}", rdzv_id="usr1"),
                             cwd=REPO, env=cli_env(env=ONE_THREAD), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group: only the agent is signalled
    try:
        wait_until(lambda: (run_dir / directories.METRICS).is_file() and train_rows(run_dir), "a logged step",
                   alive=agent)
        agent.send_signal(signal.SIGUSR1)
        output = agent.communicate(timeout=120)[0]
    finally:
        os.killpg(agent.pid, signal.SIGKILL) if agent.poll() is None else None
    assert re.search(r"stopped by signal at step \d+", output), output[-3000:]
    assert list((run_dir / directories.CHECKPOINTS).iterdir()), output[-3000:]


# ================================================================ a real SLURM on this machine


@pytest.fixture(scope="module")
def slurm():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm()
    try:
        cluster.start()
    except RuntimeError as exc:
        pytest.skip(f"local SLURM did not start: {str(exc).splitlines()[0]}")
    yield cluster
    cluster.stop()


def _launch(slurm: LocalSlurm, tmp_path: Path, out: Path, *flags: str) -> tuple[str, Path]:
    """`study launch --slurm` the one-run study into `out`; returns (job id, run directory)."""
    proc = _cli("study", "launch", str(_study_file(tmp_path)), *RUN, "--slurm", "-o", str(out), *flags, env=slurm.env)
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    (run_dir,) = (out / "runs").iterdir()
    return job, run_dir


def _job_log(run_dir: Path, job: str) -> str:
    path = run_dir / f"slurm-{job}.out"
    return path.read_text() if path.is_file() else f"(no log {path} yet)"


@pytest.mark.slow
def test_srun_two_tasks_form_one_gloo_group(slurm, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, torch, torch.distributed as dist\n"
        "rank, world = int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS'])\n"
        "dist.init_process_group('gloo', init_method='env://', rank=rank, world_size=world)\n"
        "x = torch.tensor([rank + 1.0])\n"
        "dist.all_reduce(x)\n"
        f"open('{tmp_path}/rank%d' % rank, 'w').write('%s %g' % (os.environ['SLURMD_NODENAME'], x.item()))\n"
        "dist.destroy_process_group()\n"
    )
    nodes = len(slurm.nodes)
    job_script = tmp_path / "job.sh"
    job_script.write_text(
        f"#!/bin/bash\n#SBATCH --nodes={nodes}\n#SBATCH --ntasks=2\n#SBATCH --output={tmp_path}/job.out\n"
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        f"export MASTER_PORT={free_port()}\n"
        f"srun --kill-on-bad-exit=1 {sys.executable} {worker}\n"
    )
    job = parse_job_id(slurm.run("sbatch", "--parsable", str(job_script)).stdout)
    assert slurm.wait_job(job, timeout=120) == "COMPLETED", (tmp_path / "job.out").read_text()
    results = [(tmp_path / f"rank{r}").read_text().split() for r in (0, 1)]
    assert [float(v) for _, v in results] == [3.0, 3.0]  # 1 + 2, on both ranks
    if nodes == 2:
        assert {n for n, _ in results} == set(slurm.nodes)  # one task on each emulated node
    assert slurm.drained() == ""


SEEDS = "study.seeds=[1,2]"


@pytest.fixture(scope="module")
def slurm_study(slurm, tmp_path_factory) -> tuple[Path, str, list[Path]]:
    """The study over seeds 1 and 2 launched as a job array on the local SLURM and run to completion:
    (study directory, array job id, run directories by seed)."""
    tmp = tmp_path_factory.mktemp("slurm_study")
    out = tmp / "study"
    proc = _cli("study", "launch", str(_study_file(tmp)), *RUN, SEEDS, "--slurm", "--array", "-o", str(out),
                env=slurm.env)
    job = re.search(r"submitted job array (\d+) \(2 tasks\)", proc.stdout).group(1)
    runs = sorted((out / "runs").iterdir())  # moe-s1-..., moe-s2-...
    for i, run_dir in enumerate(runs):
        state = slurm.wait_job(f"{job}_{i}", timeout=240)
        log = out / "slurm" / f"tiny-{job}_{i}.out"
        assert (run_dir / directories.RESULT).is_file(), f"task {job}_{i} ended {state}:\n" + (
            log.read_text()[-3000:] if log.is_file() else "(no log)")
    return out, job, runs


@pytest.mark.slow
def test_job_array_runs_every_seed_and_logs_each_task(slurm_study):
    out, job, runs = slurm_study
    (array,) = (out / "slurm").glob("array-*.sbatch")
    assert "#SBATCH --array=0-1" in array.read_text()
    for i, run_dir in enumerate(runs):
        sub = json.loads((run_dir / directories.SLURM_JSON).read_text())["submissions"][-1]
        assert (sub["job_id"], sub["array_task"], sub["world_size"]) == (job, i, 1)
        assert sub["log"] == str(out / "slurm" / f"tiny-{job}_{i}.out")
        assert "run complete" in Path(sub["log"]).read_text()
        assert (run_dir / directories.SLURM_SCRIPT).is_file() and (run_dir / directories.RUN_TOML).is_file()


@pytest.mark.slow
def test_launched_study_completes_and_study_commands_reuse_it(slurm, slurm_study, reference):
    out, _, runs = slurm_study
    _close(train_losses(runs[0]), reference)  # seed 1 is the reference config
    study_file = out.parent / "tiny.toml"
    # study run finds the runs complete; a second launch submits nothing; the report reads the same directory.
    again = _cli("study", "run", str(study_file), *RUN, SEEDS, "-o", str(out))
    assert again.stdout.count("complete, skipped") == 2
    relaunch = _cli("study", "launch", str(study_file), *RUN, SEEDS, "--slurm", "-o", str(out), "--skip-data-check",
                    env=slurm.env)
    assert relaunch.stdout.count("complete, skipped") == 2 and "nothing to submit" in relaunch.stdout
    _cli("study", "report", str(out))
    results = load_results(out / directories.RESULTS)
    assert [(r["seed"], r["complete"], r["steps"]) for r in results.runs] == [(1, True, STEPS), (2, True, STEPS)]


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm, slurm_study, tmp_path):
    uninterrupted = slurm_study[2][0]
    job, run_dir = _launch(slurm, tmp_path, tmp_path / "study")
    assert run_dir.name == uninterrupted.name  # same config, same hash
    again = _cli("study", "launch", str(tmp_path / "tiny.toml"), *RUN, "--slurm", "-o",
                 str(tmp_path / "study"), "--skip-data-check", env=slurm.env)
    assert f"already queued as job {job}" in again.stdout  # a queued run is not submitted twice
    wait_until(lambda: ((run_dir / directories.METRICS).is_file() and train_rows(run_dir))
               or slurm.job_state(job) in ENDED, "the job's first step")
    assert slurm.job_state(job) not in ENDED, _job_log(run_dir, job)
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@... does before the time limit
    state = slurm.wait_job(job, timeout=240, release=True)  # start the requeued job once it may
    log = _job_log(run_dir, job)
    assert state == "COMPLETED" and (run_dir / directories.RESULT).is_file(), log[-3000:]
    stopped = re.search(r"stopped by signal at step (\d+)", log)
    assert stopped and int(stopped.group(1)) < STEPS, log[-3000:]
    assert "requeueing job" in log and "attempt 2" in log and "resumed from" in log
    assert train_losses(run_dir) == train_losses(uninterrupted)  # bit-exact resume


@pytest.mark.slow
def test_study_run_skips_runs_queued_on_slurm(slurm, tmp_path):
    out = tmp_path / "study"
    job, run_dir = _launch(slurm, tmp_path, out, "--sbatch-arg=--hold", "--skip-data-check")
    try:
        assert slurm.job_state(job) == "PENDING"
        local = _cli("study", "run", str(tmp_path / "tiny.toml"), *RUN, "-o", str(out), env=slurm.env)
        assert f"queued on SLURM as job {job} (PENDING), skipped" in local.stdout
        assert "1 run(s) are queued or running on SLURM" in local.stdout
        assert not (run_dir / directories.METRICS).exists()  # nothing trained locally
    finally:
        slurm.run("scancel", job)


@pytest.mark.slow
def test_two_node_job_trains_like_one_process(slurm, reference, tmp_path):
    if len(slurm.nodes) < 2:
        pytest.skip("only one host name resolves to this machine: cannot emulate two nodes")
    job, run_dir = _launch(slurm, tmp_path, tmp_path / "study", "--nodes", "2", "--skip-data-check")
    state = slurm.wait_job(job, timeout=240)
    log = _job_log(run_dir, job)
    assert state == "COMPLETED" and (run_dir / directories.RESULT).is_file(), log[-3000:]
    assert "world 2 = tp 1 x pp 1 x dp 2" in log
    assert re.search(r"attempt 1 on \S+,\S+, rendezvous \S+:\d+", log)  # two nodes in the job's node list
    _close(train_losses(run_dir), reference)


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_the_job_script_hands_the_stop_signal_on_and_requeues_only_on_usr1(tmp_path, sig, requeued):
    """The rendered batch script under bash, with stub srun and scontrol (no daemon): the signal SLURM sends the
    batch shell reaches the step; USR1 (the time limit's) then requeues the job, TERM (cancel, preemption) never."""
    script = render_run_script(LaunchConfig(), run_dir=tmp_path / "run", job_name="j", nproc_per_node=1,
                               output=str(tmp_path / "slurm-%j.out"), title="t")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/bash\ntrap \'echo USR1 >> "$SIG_LOG"; exit 0\' USR1\n'
                                'trap \'echo TERM >> "$SIG_LOG"; exit 0\' TERM\n'
                                'touch "$STARTED"\nwhile :; do sleep 0.05; done\n')
    (stubs / "scontrol").write_text('#!/bin/sh\nprintf "%s " "$@" >> "$SCONTROL_LOG"; echo >> "$SCONTROL_LOG"\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (tmp_path / "run").mkdir()
    started, signals, scontrol = tmp_path / "started", tmp_path / "signals", tmp_path / "scontrol"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
           "STARTED": str(started), "SIG_LOG": str(signals), "SCONTROL_LOG": str(scontrol)}
    job = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(started.exists, "the step starting", seconds=60, alive=job)
        job.send_signal(sig)
        output = job.communicate(timeout=60)[0]
    finally:
        end(job)
    assert signals.read_text().split() == [sig.name.removeprefix("SIG")], output
    requeues = [line for line in scontrol.read_text().splitlines() if line.startswith("requeue")]
    assert requeues == (["requeue 7 "] if requeued else []), output
    assert job.returncode == (0 if requeued else 1), output
