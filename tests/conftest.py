"""Shared test helpers: run the real CLI in fresh processes (one, or several under torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def cli(*args: str, nproc: int = 1, check: bool = True, timeout: float = HANG_S,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `megatron-moe ARGS` in a fresh process (under torchrun when nproc > 1), `env` added."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_moe.cli", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megatron_moe.cli", *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


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


def train_rows(run_dir: Path) -> list[dict]:
    return metrics_rows(run_dir, "train")


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run_dir)]


def pytest_configure(config):
    """Modules in a random order and the tests of each module in a random order, a new seed every run (printed in
    the header; --random-order-seed=N repeats one), wherever pytest-random-order is installed: no test may depend on
    another having run first."""
    if config.pluginmanager.hasplugin("random_order"):
        config.option.random_order_enabled = True


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
    else:
        raise AssertionError(f"no other value for {dotted} = {value!r}")
    return dataclasses.replace(cfg, **{head: other})


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
