"""The test harness: one way to run the real CLI (in a fresh process, under torchrun when asked, in the foreground
or started in the background), one waiter, one study writer, and reference runs trained once per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from megatron_moe.config import DataConfig
from megatron_moe import directories

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "tinystories"

# A model small enough that a 2-process run of a few steps takes seconds on 2 cores.
TINY = [
    "model.vocab_size=1024",
    "model.seq_length=32",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.ffn_hidden_size=128",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.log_interval=1",
    "train.eval_iters=2",
    "train.lr_warmup_steps=1",
    "data.synthetic_documents=400",
]
TINY_MOE = TINY + [
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_ffn_hidden_size=64",
]


HANG_S = 900
"""How long a test's command may take before it counts as hung. A hang detector, not a speed test: the commands here
take seconds to a minute alone, several times that on a loaded 2-core machine (300 s was seen to run out there)."""


MODULE = [sys.executable, "-m", "megatron_moe.cli"]
"""How a test runs `megatron-moe`: this interpreter on the checkout's package."""


def cli_command(*args: str, nproc: int = 1, prefix: list[str] | None = None) -> list[str]:
    """The command line of `megatron-moe ARGS` (under torchrun when nproc > 1; `prefix` in place of MODULE: a
    wrapper that ends by running the CLI on the arguments after it)."""
    if nproc == 1:
        return [*(prefix or MODULE), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_moe.cli", *args]


def cli_env(nproc: int = 1, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a CLI process: threads split between ranks, output unbuffered, `env` added."""
    return {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", "PYTHONUNBUFFERED": "1", **(env or {})}


def cli(*args: str, nproc: int = 1, check: bool = True, timeout: float = HANG_S, env: dict[str, str] | None = None,
        prefix: list[str] | None = None, cwd: Path = REPO, preexec_fn: Callable[[], None] | None = None
        ) -> subprocess.CompletedProcess:
    """Run `megatron-moe ARGS` in a fresh process (under torchrun when nproc > 1, through `prefix` when given), `env`
    added, in `cwd`; `preexec_fn` runs in the child before it starts."""
    cmd = cli_command(*args, nproc=nproc, prefix=prefix)
    env = cli_env(nproc, env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))  # this checkout first
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_cli(*args: str, env: dict[str, str] | None = None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
              command: list[str] | None = None) -> subprocess.Popen:
    """`megatron-moe ARGS` (or `command`) started in the background, in a session of its own so that `end` can kill
    it with its children."""
    return subprocess.Popen(command or cli_command(*args), cwd=REPO, env=cli_env(1, env), stdout=stdout,
                            stderr=stderr, text=True, start_new_session=True)


def end(proc: subprocess.Popen) -> None:
    """Kill a process from `start_cli` and its children if it still runs, and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(predicate: Callable[[], object], what: str, *, seconds: float = HANG_S,
               alive: subprocess.Popen | None = None) -> None:
    """Poll `predicate` until it holds; fail naming `what` when `seconds` pass first, or when `alive` (the process
    that should make it hold) has ended without it holding."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (exit {alive.returncode})")
        assert time.monotonic() < deadline, f"{what}: not within {seconds:g} s"
        time.sleep(0.05)


def write_study(path: Path, text: str | None = None, *, name: str = "tiny", arms: tuple[str, ...] = ("moe",),
                seeds: tuple[int, ...] = (1,), **study: object) -> Path:
    """A study file at `path` (its folder made): `text` as given, else [study] with this name, arms, seeds and
    further `study` fields (TOML values) on the base config's defaults."""
    from megatron_moe.schema import to_toml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text is not None else
                    to_toml({"study": {"name": name, "arms": list(arms), "seeds": list(seeds), **study}}))
    return path


TIMING_KEYS = ("tokens_per_s", "elapsed_s", "tflops_per_device", "mfu", "gpu_mem_allocated_peak_gib",
               "gpu_mem_reserved_peak_gib")
"""Metrics fields that depend on wall-clock time or the machine: left out where two runs are compared row for row."""


def metrics_rows(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The rows of a run's metrics.jsonl (only those of `kind`, "train" or "eval", when given); every line must
    parse."""
    rows = [json.loads(line) for line in (run_dir / directories.METRICS).read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def untimed_rows(run_dir: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl without its TIMING_KEYS."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics_rows(run_dir)]


def last_line(proc: subprocess.CompletedProcess) -> str:
    """The last line a CLI process wrote to stderr (its one-line error), checked to come without a traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def train_rows(run_dir: Path) -> list[dict]:
    return metrics_rows(run_dir, "train")


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run_dir)]


def pytest_configure(config):
    """Modules in a random order and the tests of each module in a random order, a new seed every run (printed in
    the header; --random-order-seed=N repeats one), wherever pytest-random-order is installed: no test may depend on
    another having run first. A per-test hang limit wherever pytest-timeout is installed."""
    if config.pluginmanager.hasplugin("random_order"):
        config.option.random_order_enabled = True
    # A hang detector, not a speed test: a test still running after this long has deadlocked, and CI should say
    # which test and where instead of running out its clock. pytest-timeout's thread method prints every thread's
    # stack and ends the run, even when the main thread waits in C code that a signal would not interrupt.
    # Generous because the slow tests take minutes on a loaded 2-core machine; `--timeout=N` overrides.
    if config.pluginmanager.hasplugin("timeout") and not config.getoption("timeout", None):
        config.option.timeout = 1200
        config.option.timeout_method = "thread"


def with_other_value(cfg, dotted: str):
    """A copy of dataclass config `cfg` whose field `dotted` holds another value of its type (not validated)."""
    import dataclasses

    head, _, rest = dotted.partition(".")
    if rest:
        return dataclasses.replace(cfg, **{head: with_other_value(getattr(cfg, head), rest)})
    value = getattr(cfg, head)
    if isinstance(value, bool):
        other = not value
    elif isinstance(value, (int, float)):
        other = value * 2 + 1
    elif isinstance(value, str):
        other = value + "x"
    elif isinstance(value, list):
        other = [*value, *value[:1]] or ["x"]
    else:
        raise AssertionError(f"no other value for {dotted} = {value!r}")
    return dataclasses.replace(cfg, **{head: other})


REFERENCE = [*TINY_MOE, "train.train_steps=40", "train.save_interval=5", "train.eval_interval=10", "train.seed=1",
             f"data.seed={DataConfig().seed + 1}"]
"""A 40-step tiny MoE run with checkpoints every 5 steps: seed 1 of a study of these overrides (data.seed is the
default 1234 + the seed), and the uninterrupted run that interrupted and resumed ones are compared with."""


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Callable[..., Path]:
    """`reference_run(*overrides)`: the directory of a `train` run of those overrides, trained once per session
    whichever modules ask for it. Tests read it and copy it; none may write into it."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(*overrides: str) -> Path:
        if overrides not in runs:
            out = tmp_path_factory.mktemp("reference")
            cli("train", *overrides, f"train.output_dir={out}")
            runs[overrides] = out
        return runs[overrides]

    return get


@pytest.fixture(scope="session")
def single_process():
    """This pytest process as a one-rank megatron-core job (CPU layer applied when there is no CUDA)."""
    from megatron_moe.config import ParallelConfig
    from megatron_moe.parallel import initialize_parallel
    from megatron_moe.platform import seed_everything, setup_platform

    device = setup_platform()
    info = initialize_parallel(ParallelConfig(), device)
    seed_everything(0, info.tp_rank, info.ep_rank)
    yield device


@pytest.fixture(autouse=True)
def _fresh_moe_loss_tracker():
    """megatron-core's per-layer aux-loss tracker is process-global and sized by the first model that logs to it;
    the trainer clears it when it builds its model, and tests that build models in this process must too, or a
    deeper model after a shallower one writes past its end."""
    yield
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()
