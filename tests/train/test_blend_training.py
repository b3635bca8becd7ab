"""A run trains on a blend of prepared datasets (kept apart from the data tests: mutmut runs those for every change
it makes to the data schedule, and this one starts a training process)."""

from __future__ import annotations

import math
import tomllib

import pytest

from megatron_moe.config import DataConfig
from megatron_moe.data.source import build_data_source
from tests.conftest import TINY, cli, metrics_rows
from tests.data.test_blended_source import prepare_two


def test_a_run_trains_on_a_blend_and_its_bits_per_byte_use_the_blends_validation_bytes(tmp_path):
    two = a, b = prepare_two(tmp_path)
    out = tmp_path / "run"
    cli("train", *TINY, "model.vocab_size=0", f'data.blend=["{a}", "{b}"]', "data.blend_weights=[3.0, 1.0]",
        "train.train_steps=2", "train.eval_interval=2", f"train.output_dir={out}")
    saved = tomllib.loads((out / "config.toml").read_text())["data"]
    assert saved["blend"] == [str(a), str(b)] and saved["blend_weights"] == [3.0, 1.0]
    parts = [build_data_source(DataConfig(path=str(p)), 32, 8) for p in two]
    bpt = 0.75 * parts[0].bytes_per_token + 0.25 * parts[1].bytes_per_token
    (row,) = metrics_rows(out, "eval")
    assert row["val_bpb"] == pytest.approx(row["val_loss"] / math.log(2) / bpt, rel=1e-6)
