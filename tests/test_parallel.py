"""Parallel layouts over gloo, and activation recomputation, reproduce the single-process losses of the same model and data.

Every layout sees the same global batch per step, and `init_weights` draws the same model whatever the
layout, so losses agree up to float32 reduction order. Tolerance: 1e-5 on every logged train quantity and on
the evaluation loss over 8 optimizer steps (measured differences are below 1e-6; reductions are summed in a
different order across ranks), tight enough that a missing gradient reduction shows.
"""

from __future__ import annotations

import pytest

from tests.conftest import TINY_MOE, cli, metrics_rows, train_rows

pytestmark = pytest.mark.slow

STEPS = ["train.train_steps=8", "train.eval_interval=4", "model.moe.first_k_dense=1"]
TOLERANCE = 1e-5


@pytest.fixture
def reference(reference_run):
    out = reference_run(*TINY_MOE, *STEPS)
    rows = train_rows(out)
    assert len(rows) == 8
    return rows, metrics_rows(out, "eval")


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.tensor=2", "parallel.sequence_parallel=true"],
        ["parallel.expert=2"],
        ["parallel.pipeline=2"],
        [],  # data parallel 2
        ["train.distributed_optimizer=true", "train.overlap_grad_reduce=true", "train.overlap_param_gather=true",
         "train.save_interval=4"],  # data parallel 2, gradients reduced and parameters gathered while computing
    ],
    ids=["tp2", "ep2", "pp2", "dp2", "dp2-overlapped"],
)
def test_two_process_layout_matches_single_process(reference, tmp_path, layout):
    # Data parallel 2 starts from an empty data cache: rank 0 builds the synthetic corpus, rank 1 reads it.
    cache = tmp_path / "cache"
    cli("train", *TINY_MOE, *STEPS, *layout, f"train.output_dir={tmp_path}", nproc=2,
        env={"MEGATRON_MOE_CACHE": str(cache)} if not layout else None)
    if not layout:
        assert [p.name for p in cache.iterdir()] == ["synthetic-v1-docs400-vocab512"], list(cache.iterdir())
    ref_rows, ref_evals = reference
    rows = train_rows(tmp_path)
    assert len(rows) == len(ref_rows)
    for got, ref in zip(rows, ref_rows):
        for key in ("loss", "grad_norm", "load_balancing_loss", "z_loss"):
            assert abs(got[key] - ref[key]) < TOLERANCE, f"step {got['step']} {key}: {got[key]} vs single-process {ref[key]}"
    evals = metrics_rows(tmp_path, "eval")
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals] == [4, 8]
    for got, ref in zip(evals, ref_evals):
        assert abs(got["val_loss"] - ref["val_loss"]) < TOLERANCE, f"eval at step {got['step']}: {got} vs {ref}"
    assert rows[-1]["loss"] < rows[0]["loss"]  # and it trains


def _assert_rows_match(rows, ref_rows, what: str):
    for got, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss", "grad_norm", "load_balancing_loss", "z_loss"):
            assert abs(got[key] - ref[key]) < TOLERANCE, f"step {got['step']} {key}: {got[key]} vs {what} {ref[key]}"


def test_virtual_pipeline_matches_single_process_and_resumes_with_one_chunk(reference_run, tmp_path):
    # Four layers over two pipeline ranks in two chunks each: rank 0 runs layers 1 and 3, rank 1 layers 2 and 4, by
    # megatron-core's interleaved 1F1B schedule. Then its step-4 checkpoint resumes with one chunk per rank: tensors
    # are stored by their global names, so a checkpoint moves between chunkings like between other layouts.
    import shutil

    from megatron_moe import directories

    four = [*TINY_MOE, *STEPS, "model.num_layers=4", "train.save_interval=4"]
    ref = reference_run(*four)
    ref_rows, ref_evals = train_rows(ref), metrics_rows(ref, "eval")
    run = tmp_path / "vpp"
    cli("train", *four, "parallel.pipeline=2", "parallel.virtual_pipeline=2", f"train.output_dir={run}", nproc=2)
    _assert_rows_match(train_rows(run), ref_rows, "single-process")
    for got, want in zip(metrics_rows(run, "eval"), ref_evals, strict=True):
        assert abs(got["val_loss"] - want["val_loss"]) < TOLERANCE, f"eval at step {got['step']}: {got} vs {want}"

    shutil.rmtree(run / directories.CHECKPOINTS / "step_0000008")
    (run / directories.METRICS).unlink()
    (run / directories.RESULT).unlink()
    resumed = cli("train", *four, "parallel.pipeline=2", f"train.output_dir={run}", nproc=2)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [5, 6, 7, 8]
    _assert_rows_match(rows, ref_rows[4:], "single-process")


@pytest.mark.parametrize("recompute", [
    ["train.recompute_granularity=full"],
    ["train.recompute_granularity=full", "train.recompute_num_layers=2"],
    ["train.recompute_granularity=full", "parallel.pipeline=2"],
    ["train.recompute_granularity=selective", "train.recompute_modules=['core_attn','layernorm','mlp','moe']"],
], ids=["full", "full-2layers", "full-pp2", "selective"])
def test_recomputation_matches_single_process(reference, tmp_path, recompute):
    # Recomputing activations in the backward pass changes memory, not the function: the same losses, gradient
    # norms and evaluations as the run that keeps them (the selective case recomputes every module the tiny model
    # has: its first layer is dense, so both "mlp" and "moe" apply).
    nproc = 2 if "parallel.pipeline=2" in recompute else 1
    cli("train", *TINY_MOE, *STEPS, *recompute, f"train.output_dir={tmp_path}", nproc=nproc)
    ref_rows, ref_evals = reference
    rows = train_rows(tmp_path)
    assert len(rows) == len(ref_rows) == 8
    for got, ref in zip(rows, ref_rows):
        for key in ("loss", "grad_norm", "load_balancing_loss", "z_loss"):
            assert abs(got[key] - ref[key]) < TOLERANCE, f"step {got['step']} {key}: {got[key]} vs kept {ref[key]}"
    assert abs(metrics_rows(tmp_path, "eval")[-1]["val_loss"] - ref_evals[-1]["val_loss"]) < TOLERANCE


# Aux-loss-free expert bias with the sequence-level loss (DeepSeek-V3's combination), and the global-batch loss.
# The global-batch loss accumulates expert counts over a step's micro-batches as they run, so it depends on how
# the batch is split into micro-batches and ranks: only tensor parallelism (same split) must reproduce it.
BALANCING = {
    "bias+sequence": (["model.moe.score_function=sigmoid", "model.moe.expert_bias_update_rate=0.01",
                       "model.moe.aux_loss=sequence"], "seq_load_balancing_loss"),
    "global_batch": (["model.moe.aux_loss=global_batch"], "global_load_balancing_loss"),
}


@pytest.fixture
def balancing_reference(reference_run):
    return lambda name: train_rows(reference_run(*TINY_MOE, *STEPS, *BALANCING[name][0]))


@pytest.mark.parametrize("method, layout", [
    ("bias+sequence", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("bias+sequence", []),  # data parallel 2: the routers see what expert parallel 2 in a world of 2 gives them
    ("global_batch", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
], ids=["bias+sequence-tp2", "bias+sequence-dp2", "global_batch-tp2"])
def test_balancing_methods_match_single_process(balancing_reference, tmp_path, method, layout):
    overrides, loss_key = BALANCING[method]
    ref_rows = balancing_reference(method)
    cli("train", *TINY_MOE, *STEPS, *overrides, *layout, f"train.output_dir={tmp_path}", nproc=2)
    rows = train_rows(tmp_path)
    assert len(rows) == len(ref_rows) == 8
    keys = ["loss", "grad_norm", loss_key, "z_loss", "load_imbalance"]
    for got, ref in zip(rows, ref_rows):
        for key in keys:
            assert abs(got[key] - ref[key]) < TOLERANCE, f"step {got['step']} {key}: {got[key]} vs single-process {ref[key]}"
        if "expert_bias" in ref:
            assert got["expert_bias"] == ref["expert_bias"]
    assert ("expert_bias" in ref_rows[-1]) == (method == "bias+sequence")
