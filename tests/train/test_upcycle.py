"""Dense-to-MoE upcycling (train.init_from): the upcycled MoE computes the dense model's function before it trains,
it trains on, and what megatron-core's conversion cannot do is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_moe import directories
from tests.conftest import HANG_S, REPO, TINY, cli, last_line, train_rows

DENSE = [*TINY, "train.train_steps=6", "train.save_interval=6"]
MOE = [*TINY, "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_hidden_size=128"]
"""The dense run's trunk with 4 experts as wide as its FFN (128): each expert a copy."""
TOLERANCE = 1e-5
"""Largest logit difference allowed (fp32): the MoE sums two expert copies weighted to 1, the dense model runs one
FFN, so they differ by rounding only (measured on the dev machine: 2.4e-7)."""


@pytest.mark.slow
def test_an_upcycled_moe_starts_as_the_dense_model_and_trains(reference_run, tmp_path):
    dense = reference_run(*DENSE)
    out = tmp_path / "logits.json"
    args = [*MOE, f"train.init_from={dense}", f"train.output_dir={tmp_path / 'probe'}"]
    subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "upcycle.py"), str(out), *args], cwd=REPO,
                   check=True, capture_output=True, timeout=HANG_S)
    got = json.loads(out.read_text())
    assert got["expert0_is_dense_ffn"]
    assert got["worst"] < TOLERANCE and got["scale"] > 0.1, got  # trained logits, equal
    run = tmp_path / "moe"
    proc = cli("train", *MOE, "train.train_steps=4", f"train.init_from={dense}", f"train.output_dir={run}")
    assert "upcycled from" in proc.stdout and "each of the 4 experts a copy of its FFN, router fresh" in proc.stdout
    rows = train_rows(run)
    dense_rows = train_rows(dense)
    # it starts where the dense run ended, far below a fresh model's ln(1024) = 6.93
    assert rows[0]["loss"] < dense_rows[0]["loss"] - 0.3 and len(rows) == 4


@pytest.mark.parametrize("extra, message", [
    (["model.moe.num_experts=0"], "upcycling makes an MoE from a dense run, and this model is dense"),
    (["model.hidden_size=128"], "has model.hidden_size = 64, this run 128; the upcycled MoE keeps the dense run's trunk"),
    (["model.moe.first_k_dense=1"], "needs MoE in every layer"),
    (["model.moe.expert_ffn_hidden_size=96"], "model.moe.expert_ffn_hidden_size = 96 must divide the dense run's"),
    (["model.moe.shared_expert_ffn_hidden_size=64"], "into a model with a shared expert is not offered"),
])
def test_upcycling_refusals_are_one_line(tmp_path, extra, message):
    from megatron_moe.config import load_run_config
    from megatron_moe.schema import save_toml

    dense = tmp_path / "dense"
    dense.mkdir()
    save_toml(load_run_config(None, TINY), dense / directories.CONFIG)
    proc = cli("train", *MOE, *extra, f"train.init_from={dense}", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and message in last_line(proc), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()
    if not extra[0].startswith("model.moe.num_experts"):
        return
    # a good config from a run without a checkpoint
    proc = cli("train", *MOE, f"train.init_from={dense}", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "has no checkpoint to start from" in last_line(proc)
    proc = cli("train", *MOE, f"train.init_from={tmp_path}", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "is not a run directory" in last_line(proc)


def test_upcycling_into_virtual_pipeline_stages_is_refused_in_one_line():
    from megatron_moe.config import ConfigError, load_run_config
    from megatron_moe.train.upcycle import check_upcycling

    cfg = load_run_config(None, [*MOE, "model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=2"])
    with pytest.raises(ConfigError, match=r"needs parallel.virtual_pipeline = 1, not 2: start the upcycled run"):
        check_upcycling(cfg, load_run_config(None, [*TINY, "model.num_layers=4"]).model, "train.init_from = 'd'")
