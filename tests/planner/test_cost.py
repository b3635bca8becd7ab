"""The cost estimate: training FLOPs from the ledger turned into GPU-hours at a stated MFU and device peak."""

from __future__ import annotations

import json
import re

import pytest

from megatron_moe.planner.cost import ASSUMED_GPU, ASSUMED_MFU, gpu_hours, local_gpu, memory_limit, peak_flops
from megatron_moe.planner.memory import estimate_memory
from megatron_moe.text import human_bytes, parse_memory
from megatron_moe.study.design import design_study, format_arms
from megatron_moe.study.spec import load_study
from tests.conftest import REPO, cli


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
    lines = format_arms(design, 8, on_gpu=True).splitlines()
    header = lines[0].split()
    assert {"FLOPs", "GPU-h", "mem/GPU"} <= set(header)
    for line, a in zip(lines[1:], design.arms):  # memory per GPU on 8 GPUs, bf16 (the example's precision)
        need = estimate_memory(a.config, 8, precision="bf16").per_gpu.total
        assert line.split()[0] == a.name and f" {human_bytes(need)} " in line, line
    assert lines[-2].startswith("columns: ") and "D_se = shared-expert FFN width (a shared expert is present)" in lines[-2]
    flops = {a.name: a.config.train.train_steps * a.tokens_per_step * a.ledger.flops_train_per_token
             for a in design.arms}
    assert {a.name: a.train_flops for a in design.arms} == flops
    total = sum(flops.values())  # one seed
    m = re.fullmatch(r"cost: (\S+) training FLOPs for the 8 runs, about ([\d,]+) GPU-hours at 40% MFU on an NVIDIA "
                     r"H100 80GB HBM3 .*", lines[-1])
    assert m, lines[-1]
    assert float(m.group(1)) == pytest.approx(total, rel=1e-2)
    assert int(m.group(2).replace(",", "")) == pytest.approx(total / (989e12 * 0.4) / 3600, rel=1e-3)


def test_plan_of_a_study_prices_and_sizes_every_arm():
    proc = cli("plan", "examples/equal_resources/7b.toml")
    out = proc.stdout
    assert "study equal_resources_7b: 8 arms x 1 seeds = 8 runs of 8 GPUs each" in out
    assert "about 32,831 GPU-hours" in out  # the cost line: as test_the_arm_table_prices_every_run_and_the_study
    memory = out[out.index("memory per GPU on world size 8 (bf16, recompute none"):]
    design = design_study(load_study(REPO / "examples" / "equal_resources" / "7b.toml"), check_world=False)
    for a in design.arms:
        g = estimate_memory(a.config, 8).per_gpu
        row = next(line for line in memory.splitlines() if line.startswith(a.name + " "))
        assert row.split()[-3:] == [*human_bytes(g.total).split(), "fits"], row
        assert human_bytes(g.optimizer) in row and human_bytes(g.activations) in row
    # the dense arm on 8 GPUs with the distributed optimizer: 7.10B bf16 weights, fp32 gradients, 12 bytes of
    # optimizer state per parameter over 8 ranks
    dense = estimate_memory(design.arms[0].config, 8).per_gpu
    assert dense.params == design.arms[0].ledger.total_params
    assert (dense.weights, dense.grads, dense.optimizer) == (2 * dense.params, 4 * dense.params, -(-12 * dense.params // 8))
    data = json.loads(cli("plan", "examples/equal_resources/7b.toml", "--json", "--gpus", "16").stdout)
    assert data["world_size"] == 16 and len(data["arms"]) == 8
    assert data["arms"][0]["memory"]["per_gpu_bytes"]["total"] == estimate_memory(design.arms[0].config, 16).per_gpu.total
    # 141GB is not enough either way... a 16GB device is: the dense arm does not fit
    small = cli("plan", "examples/equal_resources/7b.toml", "--gpu-memory", "16GB").stdout
    assert "er_dense " in small and "GiB  over" in small and "checked against --gpu-memory 16.0 GiB" in small


def test_plan_json_of_a_run_config_has_memory_per_gpu():
    data = json.loads(cli("plan", "examples/tiny_moe.toml", "--json", "--gpus", "2", "parallel.expert=2").stdout)
    parts = data["memory"]["per_gpu_bytes"]
    assert set(parts) == {"weights", "grads", "optimizer", "activations", "total"}
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total") > 0
    assert data["memory"]["world_size"] == 2 and set(data["memory"]["arms"]) == {"dense_active", "dense_total",
                                                                                  "dense_flops"}


def test_dry_runs_refuse_a_study_that_does_not_fit(tmp_path):
    args = ["examples/equal_resources/7b.toml", "data.path=/nonexistent", "--dry-run", "-o", str(tmp_path / "s")]
    proc = cli("study", "run", *args, "--gpu-memory", "40GB", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    arms = design_study(load_study(REPO / "examples" / "equal_resources" / "7b.toml"), check_world=False).arms
    needs = [estimate_memory(a.config, 8).per_gpu.total for a in arms]
    over = sum(n > 40 << 30 for n in needs)
    assert needs[0] == max(needs) and over >= 2
    assert (f"arm er_dense needs about {human_bytes(needs[0])} per GPU on world size 8" in proc.stderr
            and f"more than --gpu-memory 40.0 GiB; {over - 1} more arms too" in proc.stderr
            and "--force" in proc.stderr), proc.stderr
    assert not (tmp_path / "s").exists()
    forced = cli("study", "run", *args, "--gpu-memory", "40GB", "--force")
    assert "warning: arm er_dense needs about" in forced.stdout and "(going on: --force)" in forced.stdout
    launch = cli("study", "launch", *args, "--slurm", "--gpus-per-node", "8", "--skip-data-check",
                 "train.micro_batch_size=8", check=False)
    assert launch.returncode == 2 and "more than the 80 GiB of an NVIDIA H100 80GB HBM3" in launch.stderr, launch.stderr
    bad = cli("study", "run", *args, "--gpu-memory", "lots", check=False)
    assert bad.returncode == 2 and "--gpu-memory = 'lots' is not a memory size" in bad.stderr


def test_memory_limit_comes_from_the_flag_or_the_device(tmp_path):
    assert parse_memory("80GB") == parse_memory("80GiB") == 80 << 30
    assert memory_limit(None, "NVIDIA H200") == (141 << 30, "the 141 GiB of an NVIDIA H200 (--gpu-memory to change)")
    assert memory_limit(40 << 30, "NVIDIA H200")[0] == 40 << 30
    assert memory_limit(None, None)[0] is None and memory_limit(None, "a toaster")[0] is None
    info = tmp_path / "0000:01:00.0" / "information"
    info.parent.mkdir()
    info.write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   42\n")
    assert local_gpu(tmp_path) == "NVIDIA H100 80GB HBM3" and local_gpu(tmp_path / "none") is None


@pytest.mark.parametrize("example", ["2b", "7b"])
def test_the_cluster_examples_pick_expert_counts_their_expert_parallelism_divides(example):
    design = design_study(load_study(REPO / "examples" / "equal_resources" / f"{example}.toml"), check_world=False)
    moe = [a.config for a in design.arms if a.config.model.is_moe]
    assert len(moe) >= 5 and {c.parallel.expert for c in moe} == {8}
    assert [c.model.moe.num_experts % 8 for c in moe] == [0] * len(moe), [c.model.moe.num_experts for c in moe]
    assert all(c.model.expert_ffn % 16 == 0 for c in moe)  # the examples' width alignment (multiple_of = 16)
