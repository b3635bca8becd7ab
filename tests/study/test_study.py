"""Studies: spec loading, arm derivation by the planner, the example configs, and a real 2-arm x 2-seed study
that is interrupted, resumed without redoing finished runs, and reported."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_moe import directories
from megatron_moe.config import ConfigError, RunConfig
from megatron_moe.planner.match import match_dense
from megatron_moe.study.datacheck import data_check
from megatron_moe.study.design import design_study, run_hash
from megatron_moe.study.records import load_results
from megatron_moe.study.spec import load_study
from tests.conftest import REPO, cli, end, start_cli, train_rows, wait_until, write_study

EXAMPLES = REPO / "examples"

# The smallest study the trainer runs in a few seconds per run (the TINY model of conftest, as a study file).
MINI = """
[study]
name = "mini"
arms = ["dense_active", "moe"]
seeds = [1, 2]

[model]
vocab_size = 1024
seq_length = 32
num_layers = 2
hidden_size = 64
num_attention_heads = 4
num_query_groups = 2
ffn_hidden_size = 128

[model.moe]
num_experts = 4
top_k = 2
expert_ffn_hidden_size = 64

[data]
synthetic_documents = 400

[train]
train_steps = 4
micro_batch_size = 4
global_batch_size = 8
lr_warmup_steps = 1
log_interval = 1
eval_interval = 2
eval_iters = 2
"""


def _write(tmp_path: Path, text: str = MINI, name: str = "mini.toml") -> Path:
    return write_study(tmp_path / name, text)


# ---------------------------------------------------------------- spec


@pytest.mark.parametrize("override, message", [
    ("study.arms=['moe', 'dense_wide']", r"study.arms: 'dense_wide' is not allowed; expected one of moe, "),
    ("study.arms=['moe', 'moe']", r"lists an arm twice"),
    ("study.arms=['moe', 'equal_resources']", r"put it alone in a study"),
    ("study.seeds=[1, 1]", r"study.seeds = \[1, 1\] must be a non-empty list of distinct seeds"),
    ("study.seeds=[]", r"study.seeds"),
    ("study.budget_tokens=1000", None),
    ("study.colour='red'", r"unknown key 'study.colour'; valid keys here: name, arms, seeds"),
    ("study.match.resize='depth'", r"study.match.resize = 'depth' is not allowed"),
    ("model.moe.num_experts=0", r"a study's base model must be the MoE"),
    ("study.nproc_per_node=0", r"study.nproc_per_node = 0 must be >= 1"),
    ("study.match.tolerance_pct=-1", r"study.match.tolerance_pct = -1.0 must be > 0"),
    ("study.budget_flops=nan", r"study.budget_flops = nan is not allowed; expected a finite number"),
    ("study.data_order='per_arm'", r"study.data_order = 'per_arm' is not allowed; expected one of 'per_seed', 'shared'"),
    ("study.arms=['moe_upcycled', 'dense_active']", r"moe_upcycled starts from the dense_active run of its seed; list "
                                                     "dense_active before it"),
    ("study.arms=['moe', 'moe_upcycled']", r"list dense_active before it"),
    ("study.arms=['dense_active', 'moe_upcycled']\nstudy.keep_checkpoints=false", None),
    ("study.upcycle_at=1.0", r"study.upcycle_at = 1.0 must be in \(0, 1\)"),
])
def test_bad_study_specs_fail_with_one_line(tmp_path, override, message):
    path = _write(tmp_path)
    if "keep_checkpoints" in override:
        with pytest.raises(ConfigError, match="study.keep_checkpoints = false deletes the dense_active checkpoints"):
            load_study(path, override.split("\n"))
        return
    if override.startswith("study.upcycle_at"):
        override = [override, "study.arms=['dense_active', 'moe_upcycled']"]
        with pytest.raises(ConfigError, match=message):
            load_study(path, override)
        return
    if message is None:  # budget_tokens alone is fine; with budget_flops it is not
        load_study(path, [override])
        override, message = "study.budget_flops=1e12", "are both set; set one"
        with pytest.raises(ConfigError, match=message):
            load_study(path, ["study.budget_tokens=1000", override])
        return
    with pytest.raises(ConfigError, match=message) as exc:
        load_study(path, [override])
    assert "\n" not in str(exc.value)


def test_arms_are_derived_by_the_planner(tmp_path):
    cfg = load_study(_write(tmp_path), ["study.arms=['dense_active', 'moe', 'dense_total', 'dense_flops']"])
    design = design_study(cfg, tmp_path / "out")
    arms = {a.name: a for a in design.arms}
    assert list(arms) == ["dense_active", "moe", "dense_total", "dense_flops"]
    base = cfg.base()
    assert arms["moe"].config.model == base.model and arms["moe"].match == {}
    for contract in ("active", "total", "flops"):
        arm, m = arms[f"dense_{contract}"], match_dense(base.model, contract)
        assert arm.config.model == m.config and not arm.config.model.is_moe
        assert arm.match["residual_pct"] == m.residual_pct and arm.match["target"] == m.target
        assert arm.changed_fields == m.changed_fields  # only model.* fields differ from the base
    # Everything but the model is identical across arms: data, optimizer, schedule, evaluation, steps.
    for a in design.arms:
        assert a.config.data == base.data
        assert dataclasses.replace(a.config.train, output_dir="") == dataclasses.replace(base.train, output_dir="")
    assert [(p.name, p.baseline, p.moe) for p in design.pairs] == [
        ("matched-active", "dense_active", "moe"), ("matched-total", "dense_total", "moe"),
        ("matched-flops", "dense_flops", "moe")]
    # One run per (arm, seed): the seed is the model-init seed and offsets the data seed (the same for every arm
    # of a seed); dirs keyed by a hash.
    assert len(design.runs) == 8
    for r in design.runs:
        assert r.config.train.seed == r.seed and r.config.data.seed == base.data.seed + r.seed
        assert dataclasses.replace(r.config.data, seed=base.data.seed) == base.data
        assert r.dir == (tmp_path / "out" / "runs" / f"{r.arm}-s{r.seed}-{r.hash}").resolve()
        assert r.config.train.output_dir == str(r.dir)
    assert len({r.dir for r in design.runs}) == 8
    # Two contracts may derive the same model (here flops = active): same hash, still one directory per arm.
    assert arms["dense_flops"].config.model == arms["dense_active"].config.model
    assert len({r.hash for r in design.runs}) == 6


VARIANT = """
[study.variants.moe_aux_free]
score_function = "sigmoid"
aux_loss_coeff = 0.0
expert_bias_update_rate = 1e-3
"""


def test_variant_arms_differ_from_the_base_moe_only_in_balancing_and_pair_with_every_dense_arm(tmp_path):
    text = MINI.replace('arms = ["dense_active", "moe"]', 'arms = ["dense_active", "moe", "moe_aux_free", "dense_total"]')
    cfg = load_study(_write(tmp_path, text + VARIANT))
    design = design_study(cfg, tmp_path / "out")
    arms = {a.name: a for a in design.arms}
    variant, moe = arms["moe_aux_free"], arms["moe"]
    assert variant.contract == "variant" and variant.match == {}
    assert variant.changed_fields == ("model.moe.score_function", "model.moe.aux_loss_coeff",
                                      "model.moe.expert_bias_update_rate")
    assert dataclasses.replace(variant.config.model, moe=moe.config.model.moe) == moe.config.model
    assert variant.ledger == moe.ledger  # the same parameters: each dense arm is matched to both MoE arms
    assert variant.config.train == moe.config.train and variant.config.data == moe.config.data
    assert [(p.name, p.baseline, p.moe) for p in design.pairs] == [
        ("matched-active", "dense_active", "moe"), ("matched-total", "dense_total", "moe"),
        ("moe_aux_free-matched-active", "dense_active", "moe_aux_free"),
        ("moe_aux_free-matched-total", "dense_total", "moe_aux_free"),
        ("moe_aux_free-vs-moe", "moe", "moe_aux_free")]
    assert len({r.hash for r in design.runs}) == len(design.runs) == 8


@pytest.mark.parametrize("variant, arms, message", [
    ("num_experts = 8", None, r"study.variants.moe_aux_free.num_experts: a variant may change only score_function, "),
    ("expert_bias_update_rate = 1e-3", None, r"study.variants.moe_aux_free: model.moe.expert_bias_update_rate = "
                                             r"0.001 \(aux-loss-free balancing\) needs model.moe.score_function"),
    ("aux_loss = 'token'", None, r"study.variants.moe_aux_free.aux_loss = 'token' is not allowed"),
    ("aux_loss_coeff = 0.1", '["moe", "dense_active"]', r"study.variants.moe_aux_free is defined but not listed in "),
    ("aux_loss_coeff = 0.1", '["moe", "moe_switch"]', r"study.arms: 'moe_switch' is not allowed; expected one of "
                                                      r"moe, .*, or a name defined in \[study.variants\]"),
])
def test_bad_variants_fail_with_one_line(tmp_path, variant, arms, message):
    text = MINI.replace('arms = ["dense_active", "moe"]', f'arms = {arms or ["moe", "moe_aux_free"]}'.replace("'", '"'))
    with pytest.raises(ConfigError, match=message) as exc:
        load_study(_write(tmp_path, text + f"\n[study.variants.moe_aux_free]\n{variant}\n"))
    assert "\n" not in str(exc.value)


def test_run_hash_covers_every_field_but_bookkeeping():
    """Generated from the schema: changing any one field changes the run hash unless its role is bookkeeping, so a
    new field is covered the day it is added (and a study re-run with another budget starts new runs)."""
    from megatron_moe.config import field_roles
    from tests.conftest import with_other_value

    cfg = RunConfig()
    h = run_hash(cfg)
    for name, role in field_roles().items():
        assert (run_hash(with_other_value(cfg, name)) == h) == (role == "bookkeeping"), (name, role)



def test_fields_added_later_leave_existing_run_hashes_alone():
    """A field added after hashes were first recorded is hashed only when it leaves its default, so the runs of
    existing studies keep their directories: the main job's 9 runs hash as they did when its README table was made."""
    from megatron_moe.config import added_defaults

    assert set(added_defaults()) >= {"parallel.context", "data.start_batch", "train.init_from",
                                     "train.recompute_granularity", "train.overlap_grad_reduce"}
    design = design_study(load_study(EXAMPLES / "tiny_three_arm" / "cpu.toml"), "/tmp/unused")
    assert sorted(r.hash for r in design.runs) == [
        "0bf70267d9f1", "142a50d170e1", "16649fef2584", "3cb3052c2232", "6deff3be2c9a", "abfbf1630711",
        "e0e1d03c3290", "e73e2ce810bb", "f54331fe3c17"]


def test_sinks_name_each_run_without_changing_its_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative tensorboard_dir is resolved here, at planning
    plain = design_study(load_study(_write(tmp_path)), tmp_path / "out")
    assert all(not r.config.train.tensorboard_dir and not r.config.train.wandb_run_name for r in plain.runs)
    sinks = design_study(load_study(_write(tmp_path), ["train.tensorboard_dir='tb'", "train.wandb_project='p'",
                                                     "train.wandb_run_name='ignored'"]), tmp_path / "out")
    assert [(r.dir, r.hash) for r in sinks.runs] == [(r.dir, r.hash) for r in plain.runs]
    for r in sinks.runs:
        t = r.config.train
        assert t.wandb_run_name == f"mini/{r.arm}-s{r.seed}" and t.wandb_project == "p"
        assert t.tensorboard_dir == str((tmp_path / "tb").resolve() / "mini" / f"{r.arm}-s{r.seed}")
    only_tb = design_study(load_study(_write(tmp_path), ["train.tensorboard_dir='tb'"]), tmp_path / "out")
    assert all(r.config.train.wandb_run_name == "" for r in only_tb.runs)  # W&B stays off


# ---------------------------------------------------------------- data orders


def test_each_seed_has_its_own_data_order_shared_by_its_arms(tmp_path):
    from megatron_moe.study import runner
    from megatron_moe.study.studydir import study_record

    cfg = load_study(_write(tmp_path), ["study.seeds=[1, 2, 3]"])
    assert cfg.study.data_order == "per_seed"
    design = design_study(cfg, tmp_path / "study")
    assert {(r.arm, r.seed): r.config.data.seed for r in design.runs} == {
        (arm, seed): cfg.data.seed + seed for arm in ("dense_active", "moe") for seed in (1, 2, 3)}
    data = data_check(design)
    assert list(data) == ["1", "2", "3"]
    for seed, arms in data.items():
        assert list(arms) == ["dense_active", "moe"]
        assert len({d["fingerprint"] for d in arms.values()}) == 1  # all arms of a seed: one data stream
        assert {d["data_seed"] for d in arms.values()} == {cfg.data.seed + int(seed)}
    assert len({arms["moe"]["fingerprint"] for arms in data.values()}) == 3  # a different order per seed
    record = study_record(design, None, data)
    assert record.data_fingerprints_equal is True and record.data_order == "per_seed"
    assert record.data_seeds == {"1": cfg.data.seed + 1, "2": cfg.data.seed + 2, "3": cfg.data.seed + 3}
    # what `study run --dry-run` says: one line per seed
    lines: list[str] = []
    assert runner.run_study(cfg, tmp_path / "study", dry_run=True, echo=lines.append) == 0
    for seed, arms in data.items():
        assert any(f"seed {seed}: data.seed {cfg.data.seed + int(seed)}," in line
                   and arms["moe"]["fingerprint"] in line for line in lines)


def test_a_shared_data_order_keeps_one_fingerprint(tmp_path):
    cfg = load_study(_write(tmp_path), ["study.seeds=[1, 2, 3]", "study.data_order='shared'"])
    design = design_study(cfg, tmp_path / "study")
    assert {r.config.data.seed for r in design.runs} == {cfg.data.seed}
    data = data_check(design)
    assert len({d["fingerprint"] for arms in data.values() for d in arms.values()}) == 1
    per_seed = design_study(load_study(_write(tmp_path), ["study.seeds=[1, 2, 3]"]), tmp_path / "study")
    # the data seed is part of the run hash: the two policies never share a run directory
    assert not {r.hash for r in design.runs} & {r.hash for r in per_seed.runs}


def test_runner_refuses_when_the_arms_of_a_seed_see_different_data(tmp_path, monkeypatch):
    from megatron_moe.study import runner

    cfg = load_study(_write(tmp_path))
    real = data_check(design_study(cfg, tmp_path / "study"))

    def skewed(design):
        data = json.loads(json.dumps(real))
        data["2"]["moe"]["fingerprint"] = "beefbeefbeefbeef"
        return data

    monkeypatch.setattr(runner, "data_check", skewed)
    monkeypatch.setattr(runner, "_train_subprocess", lambda *a, **k: pytest.fail("trained an unfair study"))
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=r"arms of one seed would see different data \(fingerprints seed 2: "
                                              r"dense_active [0-9a-f]{16}, moe beefbeefbeefbeef\)") as exc:
            runner.run_study(cfg, tmp_path / "study", dry_run=dry_run, echo=lambda _: None)
        assert "\n" not in str(exc.value) and "seed 1" not in str(exc.value)
    assert not (tmp_path / "study").exists()  # refused before the study directory was written
    # `study launch` runs the same data check and refuses alike, before any script is rendered
    from megatron_moe.study import slurm

    monkeypatch.setattr(slurm, "run_data_check", skewed)
    with pytest.raises(ConfigError, match=r"arms of one seed would see different data"):
        slurm.launch_study(cfg, slurm.LaunchConfig(), tmp_path / "study", dry_run=True, echo=lambda _: None)
    assert not (tmp_path / "study").exists()
    # different orders across seeds (the unskewed data) are not refused
    monkeypatch.setattr(runner, "data_check", lambda design: real)
    assert runner.run_study(cfg, tmp_path / "study", dry_run=True, echo=lambda _: None) == 0


def test_budgets(tmp_path):
    path = _write(tmp_path)
    tokens_per_step = 8 * 32
    design = design_study(load_study(path, ["study.budget_tokens=2600"]))
    assert {a.config.train.train_steps for a in design.arms} == {2600 // tokens_per_step}
    # A compute budget: each arm trains floor(C / (training FLOPs/token x tokens/step)) steps.
    c = 1e12
    design = design_study(load_study(path, ["study.budget_flops=1e12", "study.arms=['moe', 'dense_total']"]))
    for a in design.arms:
        assert a.config.train.train_steps == int(c // (a.ledger.flops_train_per_token * tokens_per_step))
    steps = {a.name: a.config.train.train_steps for a in design.arms}
    assert steps["dense_total"] < steps["moe"]  # the total-matched dense is dearer per token
    with pytest.raises(ConfigError, match=r"= 1 steps, not above train.lr_warmup_steps = 1"):
        design_study(load_study(path, ["study.budget_tokens=300"]))


# ---------------------------------------------------------------- the examples


def test_tiny_three_arm_examples():
    for name, max_total in (("cpu", 3e6), ("gpu", 25e6)):
        cfg = load_study(EXAMPLES / "tiny_three_arm" / f"{name}.toml")
        design = design_study(cfg)
        arms = {a.name: a for a in design.arms}
        assert list(arms) == ["dense_active", "moe", "dense_total"] and cfg.study.seeds == [1, 2, 3]
        moe = arms["moe"].config.model
        assert (moe.moe.num_experts, moe.moe.top_k, moe.moe.topk_renormalize) == (4, 2, True)
        assert moe.moe.aux_loss_coeff > 0 and moe.moe.z_loss_coeff > 0
        assert (moe.normalization, moe.activation, moe.position_embedding) == ("RMSNorm", "swiglu", "rope")
        for a in design.arms:  # only the FFN resized: one trunk, tight match, sub-25M
            m = a.config.model
            assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size) == (
                moe.num_layers, moe.hidden_size, moe.num_attention_heads, moe.vocab_size)
            assert a.ledger.total_params < max_total
            if a.match:
                assert abs(a.match["residual_pct"]) < 0.5
        assert len({a.config.train.train_steps for a in design.arms}) == 1
        if name == "gpu":  # 20 training tokens per active parameter, as compute-optimal training has it
            tokens = arms["moe"].config.train.train_steps * arms["moe"].tokens_per_step
            assert tokens / arms["moe"].ledger.active_params >= 20
            assert cfg.data.path == "" and cfg.data.corpus == "tinystories"  # refused as it stands: see below


@pytest.mark.slow  # trains the built-in corpus's 8192-token BPE on first use
def test_gpu_example_refuses_the_built_in_corpus(tmp_path):
    proc = cli("study", "run", str(EXAMPLES / "tiny_three_arm" / "gpu.toml"), "--dry-run", "-o", str(tmp_path / "s"),
               check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("megatron-moe: error: train.train_steps = 17500 would read the built-in tinystories "
                                  "corpus 1")  # about 140 times over
    assert "give data.path = a prepared dataset" in proc.stderr and proc.stderr.count("\n") == 1


def test_balancing_example_compares_two_moe_arms_differing_only_in_balancing():
    design = design_study(load_study(EXAMPLES / "balancing" / "cpu.toml"))
    arms = {a.name: a for a in design.arms}
    assert list(arms) == ["dense_active", "moe", "moe_aux_free"]
    switch, free = arms["moe"].config.model.moe, arms["moe_aux_free"].config.model.moe
    assert (switch.aux_loss_coeff, switch.expert_bias_update_rate) == (0.01, 0.0)
    assert (free.aux_loss_coeff, free.expert_bias_update_rate) == (0.0, 1e-3)
    assert dataclasses.replace(free, aux_loss_coeff=0.01, expert_bias_update_rate=0.0) == switch
    assert abs(arms["dense_active"].match["residual_pct"]) < 0.5
    assert {p.name for p in design.pairs} == {"matched-active", "moe_aux_free-matched-active", "moe_aux_free-vs-moe"}


@pytest.mark.parametrize("name, n_total", [("cpu", None), ("2b", 2.0e9), ("7b", 6.5e9)])
def test_equal_resources_examples(name, n_total):
    cfg = load_study(EXAMPLES / "equal_resources" / f"{name}.toml")
    design = design_study(cfg)
    fam = design.family
    if n_total:
        assert fam["total_params"] == pytest.approx(n_total, rel=0.005)
    dense, *moes = design.arms
    assert dense.name == "er_dense" and not dense.config.model.is_moe and dense.config.parallel.expert == 1
    assert len(moes) >= 3
    rates = [a.ledger.r_a for a in moes]
    assert min(rates) <= 0.21 and max(rates) >= 0.45 and all(0.09 <= r <= 0.55 for r in rates)
    tokens_per_step = fam["tokens_per_step"]
    for a in design.arms:
        m, e = a.config.model, a.config.model.moe
        # equal N (within the planner's 0.5%), equal C (to one step of tokens), equal unique tokens D
        assert abs(a.ledger.nonembedding_params - fam["total_params"]) <= 0.005 * fam["total_params"]
        spent = a.config.train.train_steps * tokens_per_step * a.match["flops_per_token"]
        assert 0 <= fam["compute"] - spent < (tokens_per_step + 1) * a.match["flops_per_token"]
        assert a.config.data.unique_tokens == fam["unique_tokens"] and a.config.data.epochs == 0
        assert a.config.data == dense.config.data  # one token stream for every arm: same fingerprint
        if m.is_moe:  # first layer dense, shared expert of size K x D_e, repeats > 1 (strict reuse)
            assert e.first_k_dense == 1 and e.shared_expert_ffn_hidden_size == e.top_k * m.expert_ffn
            assert a.match["repeats"] > 1 and e.num_experts % cfg.parallel.expert == 0
    assert dense.match["repeats"] == 1
    if name != "cpu":
        assert cfg.study.nproc_per_node == 8 and cfg.train.precision == "bf16"


def test_study_help_is_fast_and_shows_examples():
    t0 = time.perf_counter()
    proc = cli("study", "run", "--help")
    assert "study run examples/tiny_three_arm/cpu.toml" in proc.stdout and time.perf_counter() - t0 < 10
    modules = ", ".join(f"megatron_moe.study.{m}" for m in ("spec", "design", "studydir", "runner", "slurm", "stats",
                                                             "report"))
    proc = subprocess.run([sys.executable, "-c", f"import sys, megatron_moe.cli, {modules}; print(' '.join(sys.modules))"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "megatron_moe.study.runner" in proc.stdout.split() and "torch" not in proc.stdout.split()


def test_bad_study_file_exits_2(tmp_path):
    proc = cli("study", "run", str(_write(tmp_path)), "study.arms=['dense']", check=False)
    assert proc.returncode == 2 and "study.arms: 'dense' is not allowed" in proc.stderr


# ---------------------------------------------------------------- preemption under torchrun

# Stands in for the trainer: torchrun reports any failed worker as exit code 1, so only the preemption marker
# tells a trainer that stopped on a signal (checkpoint saved) from one that failed.
FAKE_TRAINER = """
import sys
from pathlib import Path
from megatron_moe.train.stop import mark_preempted
run_dir, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "marker":
    mark_preempted(run_dir, 3, 15)
else:
    print("megatron-moe: stopped by signal at step 3; checkpoint saved, run again to resume")
sys.exit(1)
"""


@pytest.mark.parametrize("mode", ["marker", "text", "stale marker"])
def test_study_run_counts_a_trainer_as_preempted_from_its_marker(tmp_path, monkeypatch, mode):
    from megatron_moe.study import runner
    from megatron_moe.train.stop import (
        PREEMPTED_EXIT_CODE,
        PREEMPTED_MARKER,
        mark_preempted,
        was_preempted,
    )

    cfg = load_study(_write(tmp_path), ["study.arms=['moe']", "study.seeds=[1]"])
    (run,) = design_study(cfg, tmp_path / "study").runs
    monkeypatch.setattr(runner, "_train_command", lambda r, nproc: [
        sys.executable, "-c", FAKE_TRAINER, str(r.dir), "text" if mode == "stale marker" else mode])
    if mode == "stale marker":  # left by an earlier attempt: must not count for this one
        run.dir.mkdir(parents=True)
        mark_preempted(run.dir, 1, 15)
    lines: list[str] = []
    rc = runner.run_study(cfg, tmp_path / "study", echo=lines.append)
    log = [json.loads(x) for x in (tmp_path / "study" / directories.STUDY_LOG).read_text().splitlines()]
    attempt = json.loads((run.dir / directories.RUN_JSON).read_text())["attempts"][-1]
    if mode == "marker":
        assert rc == PREEMPTED_EXIT_CODE and attempt["returncode"] == PREEMPTED_EXIT_CODE
        assert log[-1] == {**log[-1], "event": "interrupted", "signal": "trainer stopped", "run": run.name}
        assert any("stopped by a signal with a checkpoint saved" in line for line in lines)
        assert was_preempted(run.dir)
    else:  # the trainer's words alone do not make it preempted
        assert rc == 1 and attempt["returncode"] == 1
        assert log[-1] == {**log[-1], "event": "failed", "run": run.name, "returncode": 1}
        assert any("FAILED (exit 1)" in line for line in lines)
        assert not (run.dir / PREEMPTED_MARKER).exists()


# ---------------------------------------------------------------- a real study


def _metrics_best(run_dir: Path) -> float:
    evals = {}
    for line in (run_dir / directories.METRICS).read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "eval":
            evals[row["step"]] = row["val_loss"]
    return min(evals.values())


def test_study_runs_is_interrupted_resumes_and_reports(tmp_path):
    study_file, out = _write(tmp_path), tmp_path / "study"
    extra = ["train.save_interval=2", "study.keep_checkpoints=false"]  # checkpoints, deleted once complete
    # 1. Start the runner and stop it with a Ctrl-C (SIGINT to its process group) once its first run is complete
    #    and the second has begun: the trainer, in a session of its own, gets SIGTERM from the runner and saves.
    runner = start_cli("study", "run", str(study_file), *extra, "-o", str(out), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    try:
        log = out / directories.STUDY_LOG
        wait_until(lambda: list(out.glob(f"{directories.RUNS}/*/{directories.RESULT}")), "the first run complete",
                   alive=runner)
        wait_until(lambda: len(log.read_text().splitlines()) >= 3, "the second run's start event", alive=runner)
        second = out / directories.RUNS / json.loads(log.read_text().splitlines()[2])["run"]
        wait_until(lambda: (second / directories.METRICS).is_file(), "the second run training", alive=runner)
        os.killpg(runner.pid, signal.SIGINT)
        time.sleep(0.3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGINT)  # an impatient second Ctrl-C: the runner still waits for the save
        output, _ = runner.communicate(timeout=60)
    finally:
        end(runner)
    assert runner.returncode == 75, output  # EX_TEMPFAIL, as the trainer after a stop signal
    assert "interrupted (SIGINT)" in output
    first = sorted(out.glob("runs/*/result.json"))
    assert len(first) == 1
    first_mtime = first[0].stat().st_mtime_ns
    log = [json.loads(x) for x in (out / directories.STUDY_LOG).read_text().splitlines()]
    assert [e["event"] for e in log] == ["start", "done", "start", "interrupted"]
    interrupted = log[-1]["run"]
    assert interrupted == log[2]["run"] and not (out / "runs" / interrupted / directories.RESULT).exists()
    info = json.loads((out / "runs" / interrupted / directories.RUN_JSON).read_text())
    assert info["attempts"][-1]["interrupted"] == "SIGINT"
    assert "megatron-moe: stopped by signal at step" in (out / "runs" / interrupted / directories.TRAIN_LOG).read_text()

    # 2. The same command again: the finished run is skipped, the interrupted one resumed, the rest started.
    proc = cli("study", "run", str(study_file), *extra, "-o", str(out), "--quiet")
    assert "complete, skipped" in proc.stdout and "study complete: 4 runs" in proc.stdout
    log = [json.loads(x) for x in (out / directories.STUDY_LOG).read_text().splitlines()][4:]
    assert [(e["event"], e["run"]) for e in log[:2]] == [("skip", first[0].parent.name), ("resume", interrupted)]
    assert [e["event"] for e in log] == ["skip", "resume", "done", "start", "done", "start", "done"]
    assert first[0].stat().st_mtime_ns == first_mtime  # not redone
    # 3. A third time: nothing to do.
    proc = cli("study", "run", str(study_file), *extra, "-o", str(out), "--quiet")
    log = [json.loads(x) for x in (out / directories.STUDY_LOG).read_text().splitlines()][11:]
    assert [e["event"] for e in log] == ["skip"] * 4

    # Provenance: resolved config, versions and git commit per run; manifest with the planner's residuals.
    raw = json.loads((out / directories.STUDY_JSON).read_text())
    assert [a["name"] for a in raw["arms"]] == ["dense_active", "moe"] and raw["data_fingerprints_equal"]
    assert raw["arms"][0]["match"]["residual_pct"] == pytest.approx(
        match_dense(load_study(study_file).model, "active").residual_pct)
    for entry in raw["runs"]:
        run_dir = out / entry["dir"]
        assert entry["dir"] == f"runs/{entry['arm']}-s{entry['seed']}-{entry['hash']}"
        info = json.loads((run_dir / directories.RUN_JSON).read_text())
        assert info["versions"]["torch"] and info["versions"]["megatron-core"] == "0.16.1"
        assert info["versions"]["python"] and info["versions"]["megatron-moe"]
        assert "git" in info and (info["git"] is None or len(info["git"]["commit"]) == 40)
        assert (run_dir / directories.CONFIG).is_file() and (run_dir / directories.RUN_TOML).is_file()
        assert (run_dir / directories.METRICS).is_file() and not (run_dir / directories.CHECKPOINTS).exists()

    # 4. The report's numbers are the ones recomputed from metrics.jsonl.
    proc = cli("study", "report", str(out))
    assert "Paired gaps" in proc.stdout
    results = load_results(out / directories.RESULTS)
    best = {(e["arm"], e["seed"]): _metrics_best(out / e["dir"]) for e in raw["runs"]}
    for arm in results.arms:
        vals = [best[(arm["arm"], s)] for s in (1, 2)]
        assert arm["best_val_loss"]["per_seed"] == {"1": vals[0], "2": vals[1]}
        assert arm["best_val_loss"]["mean"] == pytest.approx(sum(vals) / 2, abs=1e-12)
        assert arm["best_val_loss"]["std"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2), abs=1e-12)
        last = [train_rows(out / e["dir"])[-1].get("load_imbalance") for e in raw["runs"] if e["arm"] == arm["arm"]]
        if arm["arm"] == "moe":
            assert arm["final_load_imbalance"]["mean"] == pytest.approx(sum(last) / 2, abs=1e-12) and min(last) >= 1
        else:
            assert last == [None, None] and arm["final_load_imbalance"]["mean"] is None
    (gap,) = results.gaps
    diffs = [best[("dense_active", s)] - best[("moe", s)] for s in (1, 2)]
    assert gap["name"] == "matched-active" and gap["per_seed"] == {"1": diffs[0], "2": diffs[1]}
    assert gap["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
    assert [p["step"] for p in gap["over_training"]] == [2, 4]
    assert results.data_fingerprints_equal
    # each seed trained on its own data order, the same for both arms (fingerprints from the runs' result.json)
    fps = results.fingerprints
    assert all(len(set(fps[s].values())) == 1 for s in ("1", "2")) and fps["1"]["moe"] != fps["2"]["moe"]
    # 4 steps are far too few tokens per parameter and too few to call a best, and 2 seeds too few for an
    # interval: the only warnings here
    assert all("at their last evaluation" in w or w.startswith("too few seeds for an interval")
               or "fewer tokens than they have parameters" in w for w in results.warnings)
    for name in (directories.REPORT_MD, directories.REPORT_HTML, directories.RESULTS):
        assert (out / name).is_file()


def test_study_run_reports_progress_after_each_run(tmp_path, monkeypatch):
    from megatron_moe.study import runner

    cfg = load_study(_write(tmp_path), ["study.arms=['moe']", "study.seeds=[1, 2]"])
    finished = ("import sys, pathlib; from megatron_moe.train.result import RunResult, write_result; "
                "d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); "
                "write_result(d, RunResult(steps=1, final_train_loss=1.0, best_val_loss=1.0, best_val_step=1, "
                "train_time_s=1.0, tokens_per_step=1))")
    monkeypatch.setattr(runner, "_train_command", lambda r, nproc: [sys.executable, "-c", finished, str(r.dir)])
    calls: list[tuple[int, int]] = []
    assert runner.run_study(cfg, tmp_path / "study", echo=lambda _: None,
                            on_progress=lambda done, total: calls.append((done, total))) == 0
    assert calls == [(0, 2), (1, 2), (2, 2)]


def test_the_data_check_notes_an_arm_that_repeats_data_unasked(tmp_path):
    design = design_study(load_study(_write(tmp_path), ["train.train_steps=400", "study.arms=['moe']",
                                                        "study.seeds=[1]"]), tmp_path / "s")
    (described,) = data_check(design)["1"].values()
    assert described["epochs"] > 1
    assert described["note"].startswith(f"arm moe: the built-in synthetic corpus is read {described['epochs']:.2f} times")


def test_loose_reuse_is_refused_with_its_new_name(tmp_path):
    with pytest.raises(ConfigError, match=r"reuse = 'loose' is now called 'fresh'"):
        load_study(_write(tmp_path), ["study.equal_resources.reuse='loose'"])


def test_the_dry_run_says_which_arms_repeat_data_unasked():
    from megatron_moe.study.runner import describe_data

    d = {"source": "tinystories", "unique_tokens": 1000, "data_seed": 1235, "fingerprint": "f00d"}
    note = "arm dense_total: the built-in tinystories corpus is read 2.00 times over (1,000 unique tokens); ..."
    lines = describe_data({"1": {"moe": d, "dense_total": {**d, "note": note}}}, "per_seed")
    assert lines[0].startswith("data: tinystories, 1,000 unique tokens") and lines[1:] == [f"note: {note}"]


def test_a_design_warns_about_thin_budgets_and_unequal_step_counts(tmp_path):
    mini = design_study(load_study(_write(tmp_path)), tmp_path / "mini")
    (thin,) = mini.warnings  # 4 steps of 256 tokens against ~0.2M parameters per arm
    assert thin.startswith("2 of 2 arms train on fewer tokens than they have parameters (dense_active 0.00")
    long = design_study(load_study(_write(tmp_path), ["train.train_steps=100000"]), tmp_path / "long")
    assert long.warnings == []
    er = design_study(load_study(EXAMPLES / "equal_resources" / "cpu.toml"), tmp_path / "er")
    (steps,) = [w for w in er.warnings if "optimizer steps" in w]
    assert steps.startswith("the arms' optimizer steps differ by 5.9x (er_dense 50, er_moe_ra0.15 294; more than 2x)")
    from megatron_moe.study import runner

    lines: list[str] = []
    runner.run_study(load_study(_write(tmp_path)), tmp_path / "mini", dry_run=True, echo=lines.append)
    assert f"warning: {thin}" in lines


# ---------------------------------------------------------------- the upcycled arm

UPCYCLED = ["study.arms=['dense_active', 'moe', 'moe_upcycled']", "study.seeds=[1]", "train.train_steps=6",
            "train.eval_interval=3", "study.upcycle_at=0.5"]


def test_the_upcycled_arm_continues_dense_active_from_its_step_k(tmp_path):
    """moe_upcycled starts from the checkpoint dense_active keeps at step k = upcycle_at x its steps, trains the rest of
    the same stream, and counts the dense steps in its tokens and FLOPs; dense_active's runs stay the same runs."""
    path = _write(tmp_path)
    design = design_study(load_study(path, UPCYCLED), tmp_path / "s")
    plain = design_study(load_study(path, [UPCYCLED[0].replace(", 'moe_upcycled'", ""), *UPCYCLED[1:]]), tmp_path / "s")
    arms = {a.name: a for a in design.arms}
    dense, up = arms["dense_active"], arms["moe_upcycled"]
    assert dense.config.train.keep_checkpoints_at == [3] and up.match["dense_steps"] == 3
    assert up.config.train.train_steps == 3 and up.config.data.start_batch == 3
    assert up.config.model == arms["moe"].config.model  # the base MoE
    assert up.planned_tokens == dense.planned_tokens == 6 * 8 * 32
    assert up.train_flops == 3 * 8 * 32 * (dense.ledger.flops_train_per_token + up.ledger.flops_train_per_token)
    runs = {r.arm: r for r in design.runs}
    assert runs["dense_active"].hash == next(r.hash for r in plain.runs if r.arm == "dense_active")
    assert runs["moe_upcycled"].config.train.init_from == str(runs["dense_active"].dir / "checkpoints" / "step_0000003")
    assert [(p.name, p.baseline, p.moe) for p in design.pairs][-2:] == [
        ("upcycled-vs-dense_active", "dense_active", "moe_upcycled"), ("upcycled-vs-moe", "moe", "moe_upcycled")]
    # the study's location does not enter the hash: the source checkpoint is hashed relative to runs/
    moved = design_study(load_study(path, UPCYCLED), tmp_path / "elsewhere")
    assert [r.hash for r in moved.runs] == [r.hash for r in design.runs]
    # a dense arm that is not the MoE's trunk cannot be upcycled: refused when the study is designed
    with pytest.raises(ConfigError, match="arm moe_upcycled: .* has model.hidden_size = \d+, this run 64; the upcycled MoE keeps the dense run.s trunk"):
        design_study(load_study(path, [*UPCYCLED, "study.match.resize='ffn+hidden'"]), tmp_path / "w")


@pytest.mark.slow  # three short trainings
def test_an_upcycled_arm_runs_in_a_study_and_is_reported_on_its_tokens(tmp_path):
    path = _write(tmp_path)
    out = tmp_path / "s"
    proc = cli("study", "run", str(path), *UPCYCLED, "-o", str(out), "--quiet")
    assert "moe_upcycled seed 1: starting 3 steps" in proc.stdout
    design = design_study(load_study(path, UPCYCLED), out)
    runs = {r.arm: r for r in design.runs}
    assert (runs["dense_active"].dir / "checkpoints" / "step_0000003").is_dir()  # kept past the last two
    log = (runs["moe_upcycled"].dir / directories.TRAIN_LOG).read_text()
    assert f"upcycled from {runs['dense_active'].dir / 'checkpoints' / 'step_0000003'}" in log
    assert "each of the 4 experts one of 2 slices of its FFN (granular upcycling)" in log
    # its first step reads batch 3 of the stream: what dense_active's step 4 read
    up_rows, dense_rows = train_rows(runs["moe_upcycled"].dir), train_rows(runs["dense_active"].dir)
    assert up_rows[0]["tokens"] == dense_rows[3]["tokens"]
    cli("study", "report", str(out))
    results = load_results(out / directories.RESULTS)
    arm = next(a for a in results.arms if a["arm"] == "moe_upcycled")
    assert arm["seeds"] == [1]
    run = next(r for r in results.runs if r["arm"] == "moe_upcycled")
    assert run["steps"] == 6 and run["last_eval_step"] == 6  # counted on the stream: the dense steps included
    gap = next(g for g in results.gaps if g["name"] == "upcycled-vs-dense_active")
    assert [p["step"] for p in gap["over_training"]] == [6] and gap["over_training"][0]["tokens"] == 6 * 8 * 32
