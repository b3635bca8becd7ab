#!/usr/bin/env python
"""Plant known bugs, one at a time, in a copy of the package and check that the tests meant to catch each do.

Each mutant names a function or method by its qualified name in a module (found in the module's syntax tree, so
nesting and position do not matter), a piece of source inside that function, what replaces it, and the tests that
must fail with it in place. A mutant whose function is missing, whose text is not found exactly once inside it,
or whose replacement leaves the syntax tree unchanged (a no-op) fails the check: a refactor cannot silently
retire a mutant.
The copy lives in a temporary directory (package, tests, pyproject.toml); the tests run there, so subprocesses
started by the tests (`python -m megatron_moe.cli ...` with the copy as working directory) also see the mutant.
Prints a table of mutant, tests run and caught or not; exits 1 when a mutant survives or no longer applies.

    .venv/bin/python tools/mutation_check.py            # every mutant
    .venv/bin/python tools/mutation_check.py residual   # mutants whose name contains "residual"
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    claim: str
    path: str
    function: str
    """Qualified name of the function holding `find` ("Class.method", "outer.inner")."""
    find: str
    replace: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant("residual-as-fraction", "residuals are (achieved - target) / target in percent",
           "megatron_moe/planner/match.py", "match_dense", "residual_pct=100.0 * (achieved - target) / target,",
           "residual_pct=(achieved - target) / target,",
           ("tests/planner/test_planner.py::test_match_dense_residual_and_diff",)),
    Mutant("family-residual-as-fraction", "equal-resources arms report their residual against N in percent",
           "megatron_moe/planner/family.py", "equal_resources_family.member", "params_residual_pct=100.0 * (led.nonembedding_params - n_total) / n_total,",
           "params_residual_pct=(led.nonembedding_params - n_total) / n_total,",
           ("tests/planner/test_planner.py::test_equal_resources_family",)),
    Mutant("ledger-drops-router", "the ledger equals the parameter count of the built megatron-core model",
           "megatron_moe/planner/ledger.py", "numbers_of", "router = s.moe_layers * s.experts * d", "router = 0",
           ("tests/planner/test_planner.py::test_ledger_equals_built_model",)),
    Mutant("fingerprint-head-only", "the data fingerprint covers the whole sample stream",
           "megatron_moe/data/source.py", "DataSource.fingerprint", "                h.update(sch.epoch_order(epoch)[0].tobytes())\n",
           "                pass\n",
           ("tests/data/test_data.py::test_fingerprint_sees_a_change_in_a_later_epochs_order",)),
    Mutant("verify-skips-token-range", "--verify checks every token id against the vocabulary",
           "megatron_moe/data/store.py", "verify_dataset", "        if top >= vocab or (len(tokens) and int(tokens.min()) < 0):",
           "        if False:",
           ("tests/data/test_data.py::test_verify_catches_token_ids_outside_the_vocabulary_even_with_rewritten_checksums",)),
    Mutant("same-data-order-every-seed", "each seed has its own data order, shared by the arms of that seed",
           "megatron_moe/study/design.py", "run_data_seed",
           'return cfg.data.seed if cfg.study.data_order == "shared" else cfg.data.seed + seed',
           "return cfg.data.seed",
           ("tests/study/test_study.py::test_each_seed_has_its_own_data_order_shared_by_its_arms",)),
    Mutant("runner-accepts-unequal-data", "the runner refuses arms of a seed whose data fingerprints differ",
           "megatron_moe/study/datacheck.py", "refuse_unequal_data", "    bad = unequal_data(data)\n    if bad:", "    bad = unequal_data(data)\n    if False:",
           ("tests/study/test_study.py::test_runner_refuses_when_the_arms_of_a_seed_see_different_data",)),
    Mutant("preemption-by-exit-code-only", "study run counts a trainer as preempted from the marker it leaves",
           "megatron_moe/study/runner.py", "_train_subprocess", "was_preempted(", "(lambda d: True)(",
           ("tests/study/test_study.py::test_study_run_counts_a_trainer_as_preempted_from_its_marker",)),
    Mutant("eval-in-train-mode", "evaluation runs in eval mode",
           "megatron_moe/train/trainer.py", "Trainer.evaluate", "            chunk.eval()\n", "            pass\n",
           ("tests/train/test_trainer.py::test_evaluation_covers_the_whole_split_in_eval_mode_identically_for_every_arm",)),
    Mutant("eval-one-batch", "evaluation covers the whole validation split by default",
           "megatron_moe/data/source.py", "DataSource.valid_batch_count", "num_batches = max(1, (self.valid.num_tokens - 1) // (batch_size * s))",
           "num_batches = 1",
           ("tests/train/test_trainer.py::test_evaluation_covers_the_whole_split_in_eval_mode_identically_for_every_arm",)),
    Mutant("grouped-experts-unscaled", "grouped-GEMM experts start like sequential ones, output projections scaled",
           "megatron_moe/model.py", "init_name", 'lambda x: f".experts.local_experts.{int(x.group(2)) + offset}.linear_fc{x.group(1)}.weight"',
           'lambda x: f".experts.linear_fc{x.group(1)}.weight{int(x.group(2)) + offset}.grouped"',
           ("tests/test_model.py::test_grouped_and_sequential_experts_share_init_names_and_output_scaling",)),
    Mutant("sp-norm-grads-not-reduced", "tensor-parallel layouts reproduce the single-process run (norm weights' "
           "gradients summed over tensor ranks under sequence parallelism)",
           "megatron_moe/model.py", "TorchNorm.__new__", "            param.sequence_parallel = config.sequence_parallel\n",
           "            param.sequence_parallel = False\n",
           ("tests/test_parallel.py::test_two_process_layout_matches_single_process[tp2]",)),
    Mutant("rng-not-restored", "resume restores the RNG states",
           "megatron_moe/train/checkpoint.py", "_set_rng_state", '    torch.set_rng_state(state["torch"])\n', "",
           ("tests/train/test_rng.py::test_rng_states_round_trip_through_a_weights_only_file",)),
    Mutant("expert-load-miscounted", "per-layer expert load is the tokens each router sends to each expert",
           "megatron_moe/train/monitors.py", "ExpertLoadMonitor._hook", "self.counts[layer] += routing_map.sum(dim=0)",
           "self.counts[layer] += routing_map.sum(dim=0).flip(0)",
           ("tests/train/test_monitors.py::test_expert_load_equals_the_top_k_of_the_router_logits_on_a_fixed_batch",)),
    Mutant("balancing-type-ignored", "model.moe.aux_loss picks megatron-core's sequence or global-batch loss",
           "megatron_moe/model.py", "transformer_config", "BALANCING[e.aux_loss].router_type if e.aux_loss_coeff > 0",
           '"aux_loss" if e.aux_loss_coeff > 0',
           ("tests/train/test_balancing.py::test_an_aux_loss_free_run_resumes_bitwise",)),
    Mutant("expert-bias-never-on", "expert_bias_update_rate > 0 turns on aux-loss-free balancing",
           "megatron_moe/model.py", "transformer_config", "moe_router_enable_expert_bias=e.expert_bias_update_rate > 0",
           "moe_router_enable_expert_bias=False",
           ("tests/test_model.py::test_the_expert_bias_is_a_buffer_and_leaves_the_counts_unchanged",)),
    Mutant("variant-changes-any-field", "a study variant differs from the base MoE only in routing and balancing",
           "megatron_moe/study/spec.py", "variant_moe", "        if key not in VARIANT_FIELDS:", "        if False:",
           ("tests/study/test_study.py::test_bad_variants_fail_with_one_line",)),
    Mutant("data-error-on-rank-0-only", "a bad data path is a one-line error on every rank under torchrun",
           "megatron_moe/train/trainer.py", "Trainer._build_data", "            except (ConfigError, TrainingError) as exc:\n                error = exc\n",
           "            except (ConfigError, TrainingError) as exc:\n                raise\n",
           ("tests/train/test_faults.py::test_errors_under_torchrun_are_one_line_on_every_rank",)),
    Mutant("config-error-traceback", "bad input is a one-line error with exit code 2",
           "megatron_moe/cli/__init__.py", "main", "    except ConfigError as exc:\n", "    except ZeroDivisionError as exc:\n",
           ("tests/test_cli.py::test_config_show_refuses_a_bad_override_in_one_line",
            "tests/test_cli.py::test_bad_output_dirs_and_zero_sizes_are_one_line_errors")),
    Mutant("gaps-paired-by-position", "gaps are paired by seed (a seed missing from the middle of one arm)",
           "megatron_moe/study/stats.py", "paired", "    gaps = {s: baseline[s] - moe[s] for s in seeds}",
           "    gaps = {s: b - m for s, b, m in zip(seeds, baseline.values(), moe.values())}",
           ("tests/study/test_report.py::test_gaps_pair_by_seed_when_a_middle_seed_is_missing",)),
    Mutant("bpb-from-training-split", "bits per byte use the validation split's bytes per token",
           "megatron_moe/data/source.py", "DataSource.__init__", 'float(self.manifest["splits"]["valid"]["bytes_per_token"])',
           'float(self.manifest["splits"]["train"]["bytes_per_token"])',
           ("tests/train/test_trainer.py::test_bits_per_byte_use_the_validation_splits_bytes",)),
    Mutant("requeue-on-term", "the job requeues on USR1 (the time limit's signal), never on TERM",
           "megatron_moe/study/slurm.py", "render_run_script", """        'if [ "$stop_signal" = USR1 ]; then',""",
           """        'if [ "$stop_signal" = TERM ]; then',""",
           ("tests/study/test_slurm.py::test_the_job_script_hands_the_stop_signal_on_and_requeues_only_on_usr1",)),
    Mutant("memory-grads-sharded", "the memory estimate's gradients equal the buffers a built model holds",
           "megatron_moe/planner/memory.py", "estimate_memory", 'grads=params * table["grads"], optimizer=opt,',
           'grads=params * table["grads"] // dp, optimizer=opt,',
           ("tests/planner/test_memory.py::test_estimate_equals_what_a_built_model_and_optimizer_hold[ep2-distopt]",)),
    Mutant("activations-without-softmax-statistics", "the activation estimate follows its documented formula",
           "megatron_moe/planner/memory.py", "_activation_bytes_per_token",
           "total += 4 * m.num_attention_heads / tp  # softmax statistics", "total += 0  # softmax statistics",
           ("tests/planner/test_memory.py::test_activations_follow_the_documented_formula",)),
    Mutant("recompute-ignored", "train.recompute_granularity recomputes activations",
           "megatron_moe/model.py", "transformer_config", "kwargs.update(recompute or {})", "kwargs.update({})",
           ("tests/test_model.py::test_recomputation_keeps_fewer_activations",)),
    Mutant("upcycle-not-loaded", "an upcycled MoE starts as the dense model",
           "megatron_moe/train/upcycle.py", "upcycle", 'model.load_state_dict(upcycle_state_dict([model], [dense])["model"])',
           'upcycle_state_dict([model], [dense])',
           ("tests/train/test_upcycle.py::test_an_upcycled_moe_starts_as_the_dense_model_and_trains",)),
    Mutant("qwen-shared-expert-not-doubled", "a shared expert exports to Qwen2-MoE exactly",
           "megatron_moe/export/hf.py", "hf_state", '"mlp.shared_expert.down_proj.weight": 2 * fc2,',
           '"mlp.shared_expert.down_proj.weight": fc2,',
           ("tests/export/test_hf.py::test_each_moe_goes_to_the_class_that_holds_it_and_gives_its_logits",)),
    Mutant("rope-base-ignored", "megatron-core trains like the independent plain-PyTorch model",
           "megatron_moe/model.py", "build_model", "rotary_base=m.rotary_base,", "rotary_base=500000,",
           ("tests/bench/test_baseline_parity.py::test_megatron_core_and_plain_pytorch_train_alike[dense]",)),
    Mutant("upcycled-dense-steps-uncounted", "an upcycled arm's tokens and curves count its dense steps",
           "megatron_moe/study/records.py", "load_study_dir",
           'offset = {a.name: int(a.match.get("dense_steps", 0)) for a in record.arms}', "offset = {}",
           ("tests/study/test_study.py::test_an_upcycled_arm_runs_in_a_study_and_is_reported_on_its_tokens",)),
    Mutant("vocab-zero-unresolved", "model.vocab_size = 0 is the data's vocabulary",
           "megatron_moe/data/source.py", "with_data_vocabulary", "    if cfg.model.vocab_size:\n", "    if True:\n",
           ("tests/data/test_data.py::test_vocab_size_zero_is_the_datas",)),
    Mutant("blend-slots-by-index", "a blend's every prefix holds each dataset's share to within one sample",
           "megatron_moe/data/blend.py", "BlendPattern.__init__", "order = np.lexsort((which, times))",
           "order = np.lexsort((times, which))",
           ("tests/data/test_blend.py::test_every_prefix_holds_each_share_to_one_sample_and_reads_each_dataset_in_order",)),
    Mutant("blend-bpb-first-dataset", "a blend's bits per byte use each dataset's validation bytes in its share",
           "megatron_moe/data/source.py", "BlendedSource.__init__",
           "self.bytes_per_token = float(sum(w * part.bytes_per_token for w, part in zip(share, self.parts)))",
           "self.bytes_per_token = first.bytes_per_token",
           ("tests/train/test_blend_training.py::test_a_run_trains_on_a_blend_and_its_bits_per_byte_use_the_blends_validation_bytes",)),
    Mutant("virtual-pipeline-batched-p2p", "virtual pipeline stages reproduce the single-process losses",
           "megatron_moe/model.py", "transformer_config", "kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)",
           "kwargs.update(overlap_p2p_comm=False, batch_p2p_comm=True)",
           ("tests/test_parallel.py::test_virtual_pipeline_matches_single_process_and_resumes_with_one_chunk",)),
    Mutant('t-interval-wrong-df', 'paired gaps get mean ± std and a Student-t interval, mean ± t(0.975, n−1) × std / √n',
           'megatron_moe/study/stats.py', 'summarize', 'half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)',
           'half = t_quantile(0.5 + confidence / 2.0, n) * std / math.sqrt(n)',
           ('tests/study/test_stats.py::test_paired_statistics_by_hand',)),
    Mutant('interval-at-two-seeds', 'below 3 seeds there is no interval, and the tables say "too few seeds for an interval"',
           'megatron_moe/study/stats.py', 'summarize', 'if n < MIN_SEEDS_FOR_INTERVAL:',
           'if n < MIN_SEEDS_FOR_INTERVAL - 1:',
           ('tests/study/test_report.py::test_results_from_run_directories',)),
    Mutant('ordering-holds-on-winner-only', "the report gives the ordering of the arms' means and in how many seeds that whole ordering holds",
           'megatron_moe/study/stats.py', 'ordering', 'holds = [s for s, o in per_seed.items() if o == order]',
           'holds = [s for s, o in per_seed.items() if o[0] == order[0]]',
           ('tests/study/test_report.py::test_ordering_line_counts_the_seeds_where_it_holds',)),
    Mutant('regime-sign-flipped', "the regime line is dense_active minus dense_total per seed (positive: extra parameters pay), with a warning unless dense_total is ahead in every seed by more than the seeds' spread",
           'megatron_moe/study/report.py', 'capacity_regime', 'ahead = [best[small][s] - best[large][s] for s in seeds]',
           'ahead = [best[large][s] - best[small][s] for s in seeds]',
           ('tests/study/test_report.py::test_the_regime_line_and_its_warning_when_extra_parameters_do_not_pay',)),
    Mutant('best-is-last-against-first-eval', "the report warns when a run's best evaluation is its last (the budget is too short to call a best)",
           'megatron_moe/study/report.py', 'build_results', 'b[1] == r.evals[-1]["step"]',
           'b[1] == r.evals[0]["step"]',
           ('tests/study/test_report.py::test_best_at_the_last_evaluation_is_warned_about',)),
    Mutant('jsonl-damage-check-inverted', 'a torn last line of a metrics.jsonl is left out; any other unreadable line is refused in one line (or left out with a warning under --allow-damaged)',
           'megatron_moe/files.py', 'read_jsonl', 'if number < len(lines):',
           'if number == len(lines):',
           ('tests/study/test_report.py::test_an_unreadable_line_before_the_last_is_refused_unless_allowed',)),
    Mutant('bootstrap-unpaired', "the optimum r_a*'s interval comes from resampling seeds jointly across the arms (paired), not arm by arm",
           'megatron_moe/study/stats.py', 'fit_optimum', '[sum(per_seed[x][s] for s in draw) / len(draw) for x in grid]',
           '[sum(per_seed[x][s] for s in rng.choices(shared, k=len(shared))) / len(draw) for x in grid]',
           ('tests/study/test_stats.py::test_the_bootstrap_resamples_seeds_jointly_across_the_grid',)),
    Mutant('gpu-hours-at-full-mfu', 'GPU-hours = training FLOPs / (989 TFLOP/s × 40% MFU) on an H100 SXM (FP8 peak twice that)',
           'megatron_moe/planner/cost.py', 'gpu_hours', 'return train_flops / (peak * mfu) / 3600.0',
           'return train_flops / peak / 3600.0',
           ('tests/planner/test_cost.py::test_gpu_hours_by_hand',)),
    Mutant('step-ratio-by-name', 'study run/launch warn (and the report repeats) when arms train on fewer tokens than parameters, or their optimizer step counts differ by more than 2x',
           'megatron_moe/study/design.py', 'Design.warnings', 'few, many = min(steps, key=steps.get), max(steps, key=steps.get)',
           'few, many = min(steps), max(steps)',
           ('tests/study/test_study.py::test_a_design_warns_about_thin_budgets_and_unequal_step_counts',)),
    Mutant('three-checkpoints-kept', 'checkpoints are saved under output_dir/checkpoints and the last two are kept',
           'megatron_moe/train/checkpoint.py', '_prune', 'if kept < KEEP and verify_checkpoint(path) is None:',
           'if kept <= KEEP and verify_checkpoint(path) is None:',
           ('tests/train/test_checkpoint_contract.py::test_two_newest_checkpoints_are_kept',)),
    Mutant('epochs-floored-to-whole', 'a data-reuse schedule of unique-token budget B and R epochs (fractional R included) streams floor(R × B) tokens, to within one sequence',
           'megatron_moe/data/schedule.py', 'Schedule.__init__', 'int(np.floor(epochs * self.unique_tokens))',
           'int(np.floor(epochs)) * self.unique_tokens',
           ('tests/data/test_data.py::test_budget_and_epochs_give_exactly_r_times_b_tokens[2.5]',)),
    Mutant('run-hash-drops-layout', "a study's run hash covers every field but the bookkeeping ones (layout and schedule fields included)",
           'megatron_moe/config.py', 'RunConfig.hashed', 'd = self.without({"bookkeeping"})',
           'd = self.without({"bookkeeping", "layout"})',
           ('tests/study/test_study.py::test_run_hash_covers_every_field_but_bookkeeping',)),
    Mutant('resume-refuses-layout-changes', 'a resume may change the schedule, layout and bookkeeping fields and nothing else without train.allow_config_change',
           'megatron_moe/train/rundir.py', 'config_changes', 'now = _flatten(cfg.without(RESUMABLE_ROLES))',
           'now = _flatten(cfg.without({"bookkeeping"}))',
           ('tests/test_config.py::test_every_field_has_a_role_and_resume_may_change_exactly_the_resumable_ones',)),
    Mutant('peak-by-substring', 'MFU uses the datasheet bf16 peak of the exact device torch names (H100 SXM 989, PCIe 756, NVL 835; H200 989, H200 NVL 835), FP8 twice that',
           'megatron_moe/planner/cost.py', 'peak_flops', 'peak = PEAK_BF16_FLOPS.get(name.strip())',
           'peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)',
           ('tests/train/test_monitors.py::test_peak_flops_by_exact_device_name',)),
    Mutant('best-is-last-eval', 'the best validation loss is the minimum over the periodic evaluations, not the last one',
           'megatron_moe/study/records.py', 'RunData.best_row', 'return min(self.evals, key=lambda r: (r["val_loss"], r["step"])) if self.evals else None',
           'return self.evals[-1] if self.evals else None',
           ('tests/study/test_report.py::test_results_from_run_directories',)),
    Mutant('bench-dense-matched-on-total', '`megatron-moe bench` measures a run config that is an MoE together with its dense model matched on active parameters (a study config with all its arms)',
           'megatron_moe/bench/measure.py', 'cases_for', 'dense = dataclasses.replace(cfg, model=match_dense(cfg.model, "active", cfg.parallel.tensor).config)',
           'dense = dataclasses.replace(cfg, model=match_dense(cfg.model, "total", cfg.parallel.tensor).config)',
           ('tests/bench/test_bench.py::test_cases_of_a_run_config_and_of_a_study',)),
    Mutant('launch-memory-unchecked-by-default', "a GPU `study launch` (--dry-run included) checks each arm's estimated memory against an 80 GB H100 unless --gpu-memory gives another size, and refuses an arm over it in one line (unless --force)",
           'megatron_moe/study/slurm.py', 'launch_study', 'memory_limit(gpu_memory, ASSUMED_GPU if on_gpu else None)',
           'memory_limit(gpu_memory, None)',
           ('tests/planner/test_cost.py::test_dry_runs_refuse_a_study_that_does_not_fit',)),
    Mutant('progress-line-every-update', 'outside a terminal (in a log), `data prepare` shows its progress as a line every 10 s, not on every update',
           'megatron_moe/data/prepare.py', 'Progress.update', 'if not self.enabled or now - self.last < 10.0:',
           'if not self.enabled:',
           ('tests/data/test_data.py::test_progress_lines_outside_a_terminal_show_percent_and_eta',)),
    Mutant('one-document-file-unwarned', 'text files hold documents separated by an `<|endoftext|>` line (or one per line with --line-documents); a many-line file that yields one document gets a warning',
           'megatron_moe/data/inputs.py', 'iter_documents', 'if start == 1 and n >= LINES_WARNING and separator:',
           'if start > 1 and n >= LINES_WARNING and separator:',
           ('tests/data/test_data.py::test_line_documents_and_the_warning_for_one_long_document',)),
    Mutant('repeats-counted-in-samples', "a run that reads its data more than once without its config asking for it (no data.unique_tokens, data.epochs or data.consumed_tokens) says so when it starts and in the study's dry run",
           'megatron_moe/data/source.py', 'DataSource.repeats', 'epochs = train_steps * self.global_batch_size * self.seq_length / self.schedule.unique_tokens',
           'epochs = train_steps * self.global_batch_size / self.schedule.unique_tokens',
           ('tests/study/test_study.py::test_the_data_check_notes_an_arm_that_repeats_data_unasked',)),
    Mutant('blend-budget-not-split', 'in a blend each dataset keeps its own schedule: data.unique_tokens and data.consumed_tokens are split between the datasets by weight',
           'megatron_moe/data/source.py', 'BlendedSource.__init__', 'unique_tokens=int(w * cfg.unique_tokens),',
           'unique_tokens=cfg.unique_tokens,',
           ('tests/data/test_blended_source.py::test_the_budget_is_split_by_weight_and_the_fingerprint_covers_the_blend',)),
    Mutant('tensorboard-purge-off-by-one', 'after a resume, the steps redone since the checkpoint replace the old ones in metrics.jsonl and TensorBoard',
           'megatron_moe/train/monitors.py', 'TensorBoardSink.__init__', 'purge_step=(resumed_step or 0) + 1',
           'purge_step=resumed_step',
           ('tests/train/test_sinks.py::test_tensorboard_hides_the_steps_a_resumed_run_redoes',)),
    Mutant('failed-save-leaves-partial', 'a save that fails (disk full, permissions) is one line naming the path and the space needed, and removes its partial directory',
           'megatron_moe/train/checkpoint.py', '_all_agree', 'shutil.rmtree(tmp, ignore_errors=True)',
           'pass',
           ('tests/train/test_checkpoint_contract.py::test_a_failed_save_removes_its_partial_directory_and_keeps_the_last',)),
    Mutant('export-capacity-below-one-only', 'a model with no exact Hugging Face form (sigmoid routing, the aux-loss-free expert bias, a capacity factor, LayerNorm, GELU, learned positions) is refused in one line saying which',
           'megatron_moe/export/hf.py', 'exportable', 'if e.capacity_factor:',
           'if e.capacity_factor and e.capacity_factor < 1.0:',
           ('tests/export/test_hf.py::test_a_model_without_a_faithful_form_is_refused',)),
    Mutant('unrenormalised-top-k-to-mixtral', 'an MoE exports to Mixtral, or to Qwen2-MoE when Mixtral cannot hold it: a shared expert, dense layers between MoE layers, top-k without renormalisation',
           'megatron_moe/export/hf.py', 'hf_family', 'plain = (not m.moe.shared_expert_ffn_hidden_size and all(m.moe_layer_pattern()) and m.moe.topk_renormalize)',
           'plain = (not m.moe.shared_expert_ffn_hidden_size and all(m.moe_layer_pattern()))',
           ('tests/export/test_hf.py::test_each_moe_goes_to_the_class_that_holds_it_and_gives_its_logits',)),
    Mutant('upcycle-allows-dense-first-layers', "what megatron-core's upcycling conversion cannot do is refused in one line: dense layers between MoE layers, a shared expert, tensor parallelism above 1, a trunk that differs",
           'megatron_moe/train/upcycle.py', 'check_upcycling', 'if m.moe.first_k_dense or m.moe.every_n != 1:',
           'if m.moe.every_n != 1:',
           ('tests/train/test_upcycle.py::test_upcycling_refusals_are_one_line',)),
    Mutant('upcycled-arm-restarts-stream', 'a `moe_upcycled` arm is upcycled from the dense_active run of its seed at study.upcycle_at of its steps and trained on the rest of the same data stream (data.start_batch)',
           'megatron_moe/study/design.py', '_upcycled_arm', 'dataclasses.replace(cfg.data, start_batch=k)',
           'cfg.data',
           ('tests/study/test_study.py::test_the_upcycled_arm_continues_dense_active_from_its_step_k',)),
    Mutant('job-environment-not-overridable', 'each job exports CUDA_DEVICE_MAX_CONNECTIONS=1, NCCL_DEBUG=WARN and TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless the submitting environment or a --setup line sets them',
           'megatron_moe/study/slurm.py', 'render_run_script', '*(f"export {k}=${{{k}:-{v}}}" for k, v in JOB_ENVIRONMENT.items()),',
           '*(f"export {k}={v}" for k, v in JOB_ENVIRONMENT.items()),',
           ('tests/study/test_slurm.py::test_render_two_nodes_by_eight_gpus',)),
    Mutant('report-html-links-plot-files', '`study report` writes report.md, a self-contained report.html with plots, results.json and plots/',
           'megatron_moe/study/report.py', 'render_html', "src='data:image/png;base64,{base64.b64encode(data).decode()}'",
           "src='plots/{e(name)}'",
           ('tests/study/test_report.py::test_report_files',)),
    Mutant('dead-lock-check-skipped', "a lock left by a process of this host that no longer runs is taken over with a note; another host's is not",
           'megatron_moe/files.py', 'lock_exclusive', 'if _gone(holder) and same_file:',
           'if same_file:',
           ('tests/test_files.py::test_a_lock_held_for_a_dead_owner_is_taken_over_with_a_note',)),
    Mutant('force-still-refused', 'dry runs refuse an arm over --gpu-memory unless --force',
           'megatron_moe/study/design.py', 'check_memory', 'if refusal and not force:',
           'if refusal:',
           ('tests/planner/test_cost.py::test_dry_runs_refuse_a_study_that_does_not_fit',)),
    Mutant('launch-layout-checked-on-study-nproc', "study launch checks each run's layout against the launch's world size (nodes x processes)",
           'megatron_moe/study/slurm.py', 'launch_study', 'validate(run.config, world)',
           'validate(run.config, cfg.study.nproc_per_node)',
           ('tests/study/test_slurm.py::test_layout_is_checked_against_the_launch_world_size',)),
    Mutant('count-suffix-case-sensitive', 'counts take k/M/B/T suffixes in either case (6.5B, 500m)',
           'megatron_moe/text.py', 'parse_count', 'suffix = s[-1:].lower() if s[-1:].isalpha() and s[-1:].lower() in _SUFFIXES else ""',
           'suffix = s[-1:] if s[-1:].isalpha() and s[-1:] in _SUFFIXES else ""',
           ('tests/planner/test_family.py::test_parse_count[6.5B-6500000000]',)),
    Mutant('train-flops-forward-only', "an arm's training FLOPs are its ledger's training FLOPs per token times its tokens",
           'megatron_moe/study/design.py', 'Arm.train_flops', 'self.ledger.flops_train_per_token',
           'self.ledger.flops_fwd_per_token',
           ('tests/planner/test_cost.py::test_the_arm_table_prices_every_run_and_the_study',)),
    Mutant("experts-not-ep-divisible", "expert counts in the cluster examples' families are multiples of the expert-parallel size (8)",
           "megatron_moe/planner/family.py", "_layouts", "            if e % expert:\n", "            if False:\n",
           ("tests/planner/test_cost.py::test_the_cluster_examples_pick_expert_counts_their_expert_parallelism_divides",)),
    Mutant("blend-unweighted-not-equal", "a blend without weights gives its datasets equal shares",
           "megatron_moe/data/source.py", "BlendedSource.__init__", "weights = list(cfg.blend_weights) or [1.0] * len(cfg.blend)",
           "weights = list(cfg.blend_weights) or [float(i + 1) for i in range(len(cfg.blend))]",
           ("tests/data/test_blended_source.py::test_a_blended_source_is_its_parts_interleaved_sample_by_sample",)),
    Mutant("moe-tp-without-sp-accepted", "MoE with tensor parallelism requires sequence parallelism (a megatron-core rule), refused in one line",
           "megatron_moe/config.py", "validate", "if cfg.model.is_moe and p.tensor > 1 and not p.sequence_parallel:",
           "if cfg.model.is_moe and p.tensor > 2 and not p.sequence_parallel:",
           ("tests/test_config.py::test_validation_spells_out_the_arithmetic",)),
    Mutant("split-by-position", "the validation split is per document, by a hash of its text (copies of a text share a side)",
           "megatron_moe/data/prepare.py", "_chunks", "text_split_value(doc.text, split_seed)",
           "text_split_value(str(produced), split_seed)",
           ("tests/data/test_data.py::test_copies_of_one_text_land_in_the_same_split_wherever_they_stand",)),
    Mutant("preempted-exits-1", "a trainer stopped by SIGTERM or SIGUSR1 saves a checkpoint and exits with code 75",
           "megatron_moe/cli/train.py", "train_main", "        return PREEMPTED_EXIT_CODE\n", "        return 1\n",
           ("tests/train/test_checkpoint.py::test_stop_signal_saves_exits_75_and_resumes",)),
)


def _copy(dest: Path) -> None:
    for name in ("megatron_moe", "tests", "examples"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")


def function_span(source: str, qualname: str) -> tuple[int, int] | None:
    """(start, end) character offsets of function `qualname` in module `source`, or None when it has none."""
    def find(body: list[ast.stmt], parts: list[str]) -> ast.AST | None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == parts[0]:
                return node if len(parts) == 1 else find(node.body, parts[1:])
        return None

    node = find(ast.parse(source).body, qualname.split("."))
    if node is None or isinstance(node, ast.ClassDef):
        return None
    lines = source.splitlines(keepends=True)
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return sum(map(len, lines[:first - 1])), sum(map(len, lines[:node.end_lineno]))


def mutate(source: str, mutant: Mutant) -> str:
    """`source` with the mutant planted; ValueError saying why when it does not apply."""
    span = function_span(source, mutant.function)
    if span is None:
        raise ValueError(f"no function {mutant.function} in {mutant.path}")
    body = source[span[0]:span[1]]
    if body.count(mutant.find) != 1:
        raise ValueError(f"{mutant.function} in {mutant.path} holds the text {body.count(mutant.find)} times")
    mutated = source[:span[0]] + body.replace(mutant.find, mutant.replace) + source[span[1]:]
    if ast.dump(ast.parse(mutated)) == ast.dump(ast.parse(source)):
        raise ValueError("the replacement changes nothing the interpreter sees (a no-op)")
    return mutated


def run(mutant: Mutant, work: Path) -> tuple[bool, str]:
    """(caught, detail) for one mutant, applied to a fresh copy under `work`."""
    copy = work / mutant.name
    _copy(copy)
    target = copy / mutant.path
    try:
        target.write_text(mutate(target.read_text(), mutant))
    except (ValueError, SyntaxError) as exc:
        shutil.rmtree(copy, ignore_errors=True)
        return False, f"does not apply: {exc}"
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "", *mutant.tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    shutil.rmtree(copy, ignore_errors=True)
    if proc.returncode == 1:  # tests ran and failed: caught
        return True, "caught"
    if proc.returncode == 0:
        return False, "SURVIVED: the tests passed with the bug in place"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["?"]
    return False, f"tests did not run (pytest exit {proc.returncode}: {tail[0]})"


CLAIMS = REPO / "tests" / "CLAIMS.md"


def claims_problems(text: str | None = None) -> list[str]:
    """Where tests/CLAIMS.md and MUTANTS disagree: a row naming no known mutant, a mutant without a row, a row whose
    tests are not its mutant's (empty when they agree)."""
    text = CLAIMS.read_text() if text is None else text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`"):
            rows[cells[3].strip("`")] = tuple(t.strip("`") for t in cells[2].split("<br>"))
    known = {m.name: m for m in MUTANTS}
    problems = [f"{CLAIMS.name}: row names no known mutant: {name}" for name in rows if name not in known]
    problems += [f"{CLAIMS.name}: no row for mutant {name}" for name in known if name not in rows]
    problems += [f"{CLAIMS.name}: the row of {name} names other tests than its mutant"
                 for name, tests in rows.items() if name in known and tests != known[name].tests]
    return problems


def main(argv: list[str]) -> int:
    problems = claims_problems()
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    chosen = [m for m in MUTANTS if not argv or any(a in m.name for a in argv)]
    if not chosen:
        print(f"no mutant matches {argv}; names: {', '.join(m.name for m in MUTANTS)}", file=sys.stderr)
        return 2
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        for i, m in enumerate(chosen, 1):
            t0 = time.perf_counter()
            caught, detail = run(m, Path(tmp))
            failed += not caught
            rows.append((m.name, ", ".join(t.split("::")[-1] for t in m.tests), detail, time.perf_counter() - t0))
            print(f"[{i}/{len(chosen)}] {m.name}: {detail} ({rows[-1][3]:.0f} s)", flush=True)
    print("\n| mutant | claim | tests | result |\n|---|---|---|---|")
    for m, (name, tests, detail, _) in zip(chosen, rows):
        print(f"| {name} | {m.claim} | {tests} | {detail} |")
    print(f"\n{len(chosen) - failed} of {len(chosen)} mutants caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
