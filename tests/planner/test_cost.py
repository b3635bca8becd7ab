"""The cost estimate: training FLOPs from the ledger turned into GPU-hours at a stated MFU and device peak."""

from __future__ import annotations

import re

import pytest

from megatron_moe.planner.cost import ASSUMED_GPU, ASSUMED_MFU, gpu_hours, peak_flops
from megatron_moe.study.design import design_study, format_arms
from megatron_moe.study.spec import load_study
from tests.conftest import REPO


def test_gpu_hours_by_hand():
    # 1e21 FLOPs on an H100 SXM (989 TFLOP/s bf16) at 40%: 1e21 / (989e12 x 0.4) s = 702.2 h
    assert (ASSUMED_GPU, ASSUMED_MFU) == ("NVIDIA H100 80GB HBM3", 0.40)
    assert gpu_hours(1e21) == pytest.approx(1e21 / (989e12 * 0.4) / 3600) == pytest.approx(702.2, abs=0.1)
    assert gpu_hours(1e21, fp8=True) == pytest.approx(gpu_hours(1e21) / 2)
    assert gpu_hours(1e21, "NVIDIA A100-SXM4-80GB", 0.5) == pytest.approx(1e21 / (312e12 * 0.5) / 3600)
    assert peak_flops("NVIDIA B200", fp8=False) == 2250e12
    with pytest.raises(ValueError, match="no peak FLOP/s known for 'a toaster'"):
        gpu_hours(1.0, "a toaster")


def test_the_arm_table_prices_every_run_and_the_study():
    design = design_study(load_study(REPO / "examples" / "equal_resources" / "7b.toml"), check_world=False)
    lines = format_arms(design).splitlines()
    header = lines[0].split()
    assert {"FLOPs", "GPU-h"} <= set(header)
    flops = {a.name: a.config.train.train_steps * a.tokens_per_step * a.ledger.flops_train_per_token
             for a in design.arms}
    assert {a.name: a.train_flops for a in design.arms} == flops
    total = sum(flops.values())  # one seed
    m = re.fullmatch(r"cost: (\S+) training FLOPs for the 8 runs, about ([\d,]+) GPU-hours at 40% MFU on an NVIDIA "
                     r"H100 80GB HBM3 .*", lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) == pytest.approx(total, rel=1e-2)
    assert int(m.group(2).replace(",", "")) == pytest.approx(total / (989e12 * 0.4) / 3600, rel=1e-3)
