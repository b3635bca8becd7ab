"""MoE balancing methods: each one, started from routers skewed toward one expert, moves the load back toward
uniform where training without balancing does not; the aux-loss-free expert bias resumes bitwise.

Layout parity of the methods is in tests/test_parallel.py; their config checks in tests/test_config.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_moe import directories
from tests.conftest import REPO, TINY_MOE, cli, train_rows, untimed_rows

pytestmark = pytest.mark.slow
SIGMOID = [*TINY_MOE, "model.moe.score_function=sigmoid", "model.moe.z_loss_coeff=0"]
METHODS = {
    "micro_batch": ["model.moe.aux_loss_coeff=0.1"],
    "sequence": ["model.moe.aux_loss_coeff=0.1", "model.moe.aux_loss=sequence"],
    "global_batch": ["model.moe.aux_loss_coeff=0.1", "model.moe.aux_loss=global_batch"],
    "expert_bias": ["model.moe.aux_loss_coeff=0", "model.moe.expert_bias_update_rate=0.02"],
}


def skewed_run(tmp_path, name: str, overrides: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "balancing.py"), str(out), *SIGMOID,
                    f"train.output_dir={tmp_path / name}", *overrides],
                   cwd=REPO, check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def unbalanced(tmp_path_factory):
    return skewed_run(tmp_path_factory.mktemp("none"), "none", ["model.moe.aux_loss_coeff=0"])


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_pulls_a_skewed_router_toward_uniform_load(tmp_path, unbalanced, method):
    got = skewed_run(tmp_path, method, METHODS[method])
    start, end = got["expert0_load"][0], got["expert0_load"][-1]
    assert start > 0.3  # skewed: uniform top-2 of 4 experts gives each expert 0.25 of the routed tokens
    # Without balancing the favoured expert keeps its share (it grows, here); every method takes it down.
    assert unbalanced["expert0_load"][-1] > start
    assert end < unbalanced["expert0_load"][-1] - 0.05, (got, unbalanced)
    assert got["loss"][-1] < got["loss"][0]  # and the model trains
    if method == "expert_bias":
        assert all(row[0] == min(row) < 0 for row in got["bias"])  # the favoured expert's bias went down
    else:
        assert got["bias"] is None


def test_an_aux_loss_free_run_resumes_bitwise(tmp_path):
    """The expert biases live in the checkpoint: resumed from step 4 of 8, the run logs the uninterrupted run's
    losses, loads and biases."""
    args = [*TINY_MOE, "model.moe.score_function=sigmoid", "model.moe.expert_bias_update_rate=0.01",
            "model.moe.aux_loss=sequence", "train.train_steps=8", "train.save_interval=4", "train.eval_interval=4"]
    straight = tmp_path / "straight"
    cli("train", *args, f"train.output_dir={straight}")
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / directories.CHECKPOINTS / "step_0000008")
    (resumed / directories.METRICS).unlink()
    (resumed / directories.RESULT).unlink()
    cli("train", *args, f"train.output_dir={resumed}")
    want = [r for r in untimed_rows(straight) if r["kind"] == "train" and r["step"] > 4]
    assert [r for r in untimed_rows(resumed) if r["kind"] == "train"] == want
    assert all(r["seq_load_balancing_loss"] > 0.5 for r in want)  # the method's own loss, read from megatron-core
    assert want[-1]["expert_bias"] != train_rows(straight)[0]["expert_bias"]  # the biases did move
