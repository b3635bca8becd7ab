"""Short real training runs: the loss falls, files are written, aux losses stay out of the reported LM loss."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from megatron_moe import directories
from tests.conftest import REPO, TINY, TINY_MOE, cli, metrics_rows, train_rows

pytestmark = pytest.mark.slow  # every test here trains a model in a fresh process


def test_tiny_moe_loss_falls_and_metrics_are_written(tmp_path):
    proc = cli("train", *TINY_MOE, "train.train_steps=30", "train.lr=5e-3", "train.log_interval=5", f"train.output_dir={tmp_path}")
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    # Margin: from ~ln(vocab) at init, 30 steps on the synthetic stories take off at least 1.5 nats.
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5, [r["loss"] for r in rows]
    assert all(r["tokens_per_s"] > 0 and "load_balancing_loss" in r and "z_loss" in r for r in rows)
    assert all(r["dropped_fraction"] == 0 for r in rows)  # dropless by default
    result = json.loads((tmp_path / directories.RESULT).read_text())
    assert result["steps"] == 30 and result["best_val_loss"] < rows[0]["loss"]
    assert (tmp_path / directories.CONFIG).is_file()
    assert "step 30/30 | loss" in proc.stdout and "tok/s" in proc.stdout


def test_aux_losses_never_enter_the_reported_lm_loss(tmp_path):
    runs = {}
    for coeff in ("0.0", "10.0"):
        out = tmp_path / coeff
        cli("train", *TINY_MOE, "train.train_steps=3", f"model.moe.aux_loss_coeff={coeff}", f"model.moe.z_loss_coeff={coeff}", f"train.output_dir={out}")
        runs[coeff] = train_rows(out)
    # Step 1's forward is the same model on the same tokens: a huge coefficient changes gradients only.
    assert runs["0.0"][0]["loss"] == runs["10.0"][0]["loss"]
    assert "load_balancing_loss" not in runs["0.0"][0] and runs["10.0"][0]["load_balancing_loss"] > 0.9
    assert runs["0.0"][2]["loss"] != runs["10.0"][2]["loss"]  # yet they do reach the gradients (step 1 has lr 0)


def test_expert_load_capacity_drops_and_wsd_schedule(tmp_path):
    cli(
        "train", *TINY_MOE, "train.train_steps=10", "train.lr_schedule=wsd", "train.lr_warmup_steps=2",
        "train.wsd_decay_fraction=0.3", "model.moe.capacity_factor=0.5", f"train.output_dir={tmp_path}",
    )
    rows = train_rows(tmp_path)
    # Warm-up from 0 over 2 steps, stable at the peak, then the last 3 steps decay (megatron-core's WSD).
    assert [r["lr"] for r in rows[:8]] == [0.0, 0.0015] + [0.003] * 6
    assert rows[-1]["lr"] < rows[-2]["lr"] < 0.003
    for row in rows:
        assert len(row["expert_load"]) == 2 and all(len(layer) == 4 for layer in row["expert_load"])
        assert all(abs(sum(layer) - 1) < 1e-3 for layer in row["expert_load"])
        assert row["load_imbalance"] >= 1.0
        # Capacity 0.5 x (tokens x top-2 / 4 experts) per expert: at least half the assignments are dropped.
        assert row["dropped_fraction"] >= 0.5 - 1e-9


def _lb_gradient(tmp_path, name, nproc, *overrides):
    out = tmp_path / f"{name}.json"
    args = [*TINY_MOE, "model.moe.z_loss_coeff=0", f"train.output_dir={tmp_path / name}", *overrides]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    subprocess.run([*launcher, str(REPO / "tests" / "workers" / "lb_grad.py"), str(out), *args], cwd=REPO, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_load_balancing_gradient_independent_of_dp_size_and_micro_batches(tmp_path):
    one = _lb_gradient(tmp_path, "mb8", 1, "train.micro_batch_size=8")  # 1 micro-batch
    four = _lb_gradient(tmp_path, "mb2", 1, "train.micro_batch_size=2")  # 4 micro-batches
    dp2 = _lb_gradient(tmp_path, "dp2", 2, "train.micro_batch_size=2")  # 2 ranks x 2 micro-batches
    scale = max(abs(x) for x in one)
    assert scale > 1e-6  # the aux loss does reach the router
    for other in (four, dp2):
        assert max(abs(a - b) for a, b in zip(one, other)) < 1e-5 * scale


def test_too_small_validation_split_is_refused_before_training(tmp_path):
    proc = cli("train", *TINY, "data.synthetic_documents=21", "train.eval_iters=50", f"train.output_dir={tmp_path}",
               check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-moe: error: validation split has") and "lower train.eval_iters" in last
    assert not (tmp_path / directories.METRICS).exists()  # refused before any step


def _evaluate_once(tmp_path, name: str, *overrides: str) -> dict:
    out = tmp_path / f"{name}.json"
    args = [*overrides, "train.eval_iters=0", f"train.output_dir={tmp_path / name}"]
    subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "eval_mode.py"), str(out), *args], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_evaluation_covers_the_whole_split_in_eval_mode_identically_for_every_arm(tmp_path):
    moe = _evaluate_once(tmp_path, "moe", *TINY_MOE)
    dense = _evaluate_once(tmp_path, "dense", *TINY)
    batch_tokens = 8 * 32  # global batch x sequence length of TINY
    assert moe["val_tokens"] == (moe["valid_tokens"] - 1) // batch_tokens * batch_tokens > 2 * batch_tokens
    assert moe["modes"] and not any(moe["modes"]) and moe["training_after"]
    assert (dense["val_tokens"], dense["digest"]) == (moe["val_tokens"], moe["digest"])


def test_bits_per_byte_use_the_validation_splits_bytes(reference_run):
    """val_bpb = val_loss / ln 2 / (UTF-8 bytes per token of the validation documents), counted here from the
    decoded documents, on a corpus whose training split has another bytes-per-token figure."""
    from megatron_moe.config import DataConfig
    from megatron_moe.data.source import build_data_source

    run_dir = reference_run(*TINY, "train.train_steps=2", "train.eval_interval=2")
    ds = build_data_source(DataConfig(synthetic_documents=400), seq_length=32, global_batch_size=8)

    def bytes_per_token(store) -> float:
        docs = [np.asarray(store.document(i)) for i in range(store.num_documents)]
        text = sum(len(ds.decode(d[d != ds.eod_id]).encode()) for d in docs)
        return text / sum(len(d) for d in docs)

    valid, train = bytes_per_token(ds.valid), bytes_per_token(ds.train)
    assert abs(valid - train) > 0.01  # the two splits differ: a bpb from the wrong split would not pass
    (row,) = [r for r in metrics_rows(run_dir) if r["kind"] == "eval"]
    assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2) / valid, rel=1e-6)
