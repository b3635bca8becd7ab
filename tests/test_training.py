"""Short real training runs: the loss falls, files are written, aux losses stay out of the reported LM loss."""

from __future__ import annotations

import json

from tests.conftest import TINY_MOE, cli, train_rows


def test_tiny_moe_loss_falls_and_metrics_are_written(tmp_path):
    proc = cli("train", *TINY_MOE, "train.train_steps=30", "train.lr=5e-3", "train.log_interval=5", f"train.output_dir={tmp_path}")
    rows = train_rows(tmp_path)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    # Margin: from ~ln(vocab) at init, 30 steps on the synthetic stories take off at least 1.5 nats.
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5, [r["loss"] for r in rows]
    assert all(r["tokens_per_s"] > 0 and "load_balancing_loss" in r and "z_loss" in r for r in rows)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 30 and result["best_val_loss"] < rows[0]["loss"]
    assert (tmp_path / "config.toml").is_file()
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
