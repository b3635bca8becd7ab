"""The training loop of one run on megatron-core: DDP, optimizer, LR schedule, forward-backward schedules.

`Trainer` builds this process's share of a run (data, model, optimizer, scheduler, the resumed checkpoint);
`Trainer.fit` is the loop, `train(cfg)` the whole run. The loop's side work (metrics file, throughput,
expert load, MoE losses, printed lines) is in `monitors`, checkpoint files in `checkpoint`.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from megatron_moe import directories
from megatron_moe.config import ConfigError, RunConfig, resolved_precision, validate
from megatron_moe.schema import save_toml
from megatron_moe.planner.ledger import ledger
from megatron_moe.planner.memory import estimate_memory
from megatron_moe.data.source import with_data_vocabulary
from megatron_moe.train.upcycle import source_run, upcycle
from megatron_moe.text import human_bytes
from megatron_moe.train.checkpoint import (
    Checkpointable, ShardedStates, TrainState, check_checkpoint_writer, find_checkpoint, latest_checkpoint,
    load_checkpoint, save_checkpoint, step_of,
)
from megatron_moe.train.monitors import (
    ExpertLoadMonitor,
    Metrics,
    MoELossReader,
    ThroughputMeter,
    check_sinks,
    device_peak_flops,
    eval_line,
    gpu_memory,
    open_sinks,
    progress_line,
    run_line,
)
from megatron_moe.train.rundir import (
    StartPlan, claim_output_dir, describe_changes, plan_start, record_config_change, release_unused_output_dir
)
from megatron_moe.train.result import RunResult, write_result
from megatron_moe.train.stop import Preempted, StopFlag, TrainingError, clear_preempted, mark_preempted


def _quiet_megatron_warnings() -> None:
    # megatron-core warns at import that apex/TE are missing; that is expected here and said in README.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex).*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def resolve_precision(precision: str, on_gpu: bool) -> tuple[torch.dtype, bool]:
    """(params dtype, fp8) for the configured precision."""
    precision = resolved_precision(precision, on_gpu)
    if precision in ("bf16", "fp8") and not on_gpu:
        raise ConfigError(f"train.precision = {precision!r} needs a GPU; on CPU use 'fp32' or 'auto'")
    if precision == "fp8":
        from megatron_moe.model import have_transformer_engine

        if not have_transformer_engine():
            raise ConfigError("train.precision = 'fp8' needs Transformer Engine; allowed here: 'bf16', 'fp32'")
    return (torch.float32 if precision == "fp32" else torch.bfloat16), precision == "fp8"


def lr_scheduler(optimizer, cfg: RunConfig):
    """megatron-core's OptimizerParamScheduler, counted in optimizer steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[t.lr_schedule]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr if t.lr_schedule != "constant" else t.lr,
        lr_warmup_steps=t.lr_warmup_steps,
        lr_decay_steps=t.train_steps,
        lr_decay_style=style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_steps,
        wd_incr_style="constant",
        wsd_decay_steps=int(t.train_steps * t.wsd_decay_fraction) if t.lr_schedule == "wsd" else None,
        lr_wsd_decay_style="cosine" if t.lr_schedule == "wsd" else None,
    )


def _micro_batches(batch: np.ndarray, dp_rank: int, dp: int, micro_batch_size: int, device) -> list[dict]:
    """This data-parallel rank's share of a global batch [B, S+1], cut into micro-batches."""
    per_rank = batch.shape[0] // dp
    mine = torch.from_numpy(np.ascontiguousarray(batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]))
    seq = mine.shape[1] - 1
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(micro_batch_size, -1)
    out = []
    for start in range(0, per_rank, micro_batch_size):
        chunk = mine[start : start + micro_batch_size].to(device)
        out.append(
            dict(
                tokens=chunk[:, :-1].contiguous(),
                labels=chunk[:, 1:].contiguous(),
                loss_mask=torch.ones(chunk.shape[0], seq, device=device),
                position_ids=positions,
            )
        )
    return out


def _first_error_of_any_rank(error: Any) -> Any:
    """The error of the lowest rank that has one (None when no rank has): every rank takes the same decision."""
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    losses = output.float()
    loss_sum = (losses * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


class Trainer:
    """Owns the model, optimizer, scheduler, data and train state of one run on this process."""

    def __init__(self, cfg: RunConfig, *, quiet: bool = False):
        from megatron_moe.parallel import initialize_parallel
        from megatron_moe.platform import setup_platform

        _quiet_megatron_warnings()
        cfg = with_data_vocabulary(cfg)
        self.cfg = cfg
        self.quiet = quiet
        self.device = setup_platform()
        params_dtype, fp8 = resolve_precision(cfg.train.precision, self.device.type == "cuda")
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        check_sinks(cfg.train)
        check_checkpoint_writer()
        upcycle_from = source_run(cfg) if cfg.train.init_from else None  # refused before the run directory is claimed
        self.par = initialize_parallel(cfg.parallel, self.device)
        t = cfg.train
        self.out_dir = Path(t.output_dir)
        self.checkpoint_dir = self.out_dir / directories.CHECKPOINTS
        start = self._claim_run_dir()
        if self.par.is_logging_rank:
            clear_preempted(self.out_dir)  # a marker from an earlier attempt must not outlive this one's failure
        self.num_micro_batches = t.micro_batches(self.par.data)
        self.tokens_per_step = t.global_batch_size * cfg.model.seq_length
        self.data = self._build_data()
        chunks = self._build_model(params_dtype, fp8)
        notes = list(start.notes)
        if upcycle_from is not None and start.checkpoint is None:  # a resumed run has its own weights
            notes.append(upcycle(chunks[0], cfg, *upcycle_from))  # one chunk: check_upcycling refuses more
        self._build_optimizer(chunks, params_dtype)
        for note in notes:
            self.log(note)
        self.resumed_from = start.checkpoint
        self.state = TrainState()
        if self.resumed_from is not None:
            self.state = self._resume()
        self.metrics = self._open_metrics(start)

    def _build_data(self):
        """This run's data source, refused (one line, on every rank) when it does not fit the run.

        A cold data cache (the synthetic corpus) is built once per machine: local rank 0 first, then the other ranks
        read what it wrote. Its error (a bad data.path) reaches every rank, so all of them stop with the same one
        line instead of the others failing on a closed connection.
        """
        from megatron_moe.data.source import build_data_source

        cfg, t = self.cfg, self.cfg.train
        builds_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        data, error = None, None
        if builds_first:
            try:
                data = build_data_source(cfg.data, cfg.model.seq_length, t.global_batch_size, t.train_steps)
            except (ConfigError, TrainingError) as exc:
                error = exc
        error = _first_error_of_any_rank(error)
        if error is not None:
            raise error
        if not builds_first:
            data = build_data_source(cfg.data, cfg.model.seq_length, t.global_batch_size, t.train_steps)
        if data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({data.vocab_size}); set model.vocab_size >= {data.vocab_size}"
            )
        data.valid_batch_count(t.global_batch_size, t.eval_iters)  # refused now, not at the first evaluation
        return data

    def _build_model(self, params_dtype: torch.dtype, fp8: bool) -> list:
        """This rank's model chunks (one, or one per virtual pipeline stage), seeded, with the monitors that read
        them and the throughput figures of their size."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        from megatron_moe.model import build_model_chunks, local_parameter_counts, recompute_options
        from megatron_moe.platform import seed_everything

        cfg, t = self.cfg, self.cfg.train
        # megatron-core's aux-loss tracker is a process global sized by the first model that used it.
        get_moe_layer_wise_logging_tracker().clear()
        seed_everything(t.seed, self.par.tp_rank, self.par.ep_rank)
        chunks = build_model_chunks(cfg.model, cfg.parallel, seed=t.seed, params_dtype=params_dtype, fp8=fp8,
                                    recompute=recompute_options(t))
        model = torch.nn.ModuleList(chunks)
        self.param_counts = local_parameter_counts(model)
        self.load_monitor = self.moe_losses = None
        if cfg.model.is_moe:
            moe = cfg.model.moe
            self.load_monitor = ExpertLoadMonitor(model, cfg.model.num_layers, moe.num_experts, moe.top_k,
                                                 expert_bias=moe.expert_bias_update_rate > 0, device=self.device)
            self.moe_losses = MoELossReader(cfg.model, self.par.tensor, self.par.data, self.num_micro_batches)
        self.flops_per_token = ledger(cfg.model, cfg.parallel.tensor).flops_train_per_token
        self.device_name, self.peak_flops = device_peak_flops(fp8)
        return chunks

    def _build_optimizer(self, chunks: list, params_dtype: torch.dtype) -> None:
        """megatron-core's DDP wrapper (one per model chunk), optimizer, LR scheduler and forward-backward schedule
        (interleaved over virtual pipeline stages when there are several chunks)."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.module import Float16Module

        t = self.cfg.train
        tcfg = chunks[0].config  # the schedule reads the first chunk's config
        if params_dtype != torch.float32:
            chunks = [Float16Module(c.config, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=t.overlap_grad_reduce,
            overlap_param_gather=t.overlap_param_gather,
            use_distributed_optimizer=t.distributed_optimizer,
        )
        # Later chunks in one bucket each, as Megatron-LM does: their gradients are ready in another order.
        self.chunks = [DistributedDataParallel(c.config, ddp_config, c, disable_bucketing=i > 0)
                       for i, c in enumerate(chunks)]
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            adam_eps=t.adam_eps,
            clip_grad=t.clip_grad,
            bf16=params_dtype == torch.bfloat16,
            params_dtype=params_dtype,
            use_distributed_optimizer=t.distributed_optimizer,
            overlap_param_gather=t.overlap_param_gather,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.chunks)
        self.scheduler = lr_scheduler(self.optimizer, self.cfg)
        no_sync = [c.no_sync for c in self.chunks]
        tcfg.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()

    def _open_metrics(self, start: StartPlan) -> Metrics:
        """The run directory's files for this attempt (config, config changes, no stale result) and the metrics sink,
        continued from the resumed step."""
        cfg = self.cfg
        metrics_path = None
        if self.par.is_logging_rank:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_toml(cfg, self.out_dir / directories.CONFIG)
            if self.resumed_from is None:
                (self.out_dir / directories.RESULT).unlink(missing_ok=True)  # from an earlier attempt, now redone
            if start.changes:
                record_config_change(self.out_dir, self.step, start.changes)
                self.log(f"continuing from step {self.step} with a changed config (train.allow_config_change = true, "
                         f"recorded in config_changes.jsonl): {describe_changes(start.changes)}")
            metrics_path = self.out_dir / directories.METRICS
        resumed_step = None if self.resumed_from is None else self.step
        sinks = open_sinks(cfg, resumed_step) if self.par.is_logging_rank else []
        return Metrics.open(metrics_path, resumed_step=resumed_step, sinks=sinks)

    def _claim_run_dir(self) -> StartPlan:
        """Lock the output directory, pick the checkpoint to resume and check the config against the run's
        (global rank 0, so every rank gets one verdict), before any data or model is built."""
        verdict: StartPlan | Exception | None = None
        if dist.get_rank() == 0:
            try:
                taken_over = claim_output_dir(self.out_dir)
                verdict = plan_start(self.cfg)
                verdict.notes[:0] = taken_over
            except (ConfigError, TrainingError) as exc:
                verdict = exc
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def _resume(self) -> TrainState:
        """Load `resumed_from`; a checkpoint that verified but does not load (a crafted or truncated shard its
        manifest cannot show) is skipped like a damaged one, for the newest older one that verifies. Every rank
        takes the same decision; the error of the last candidate is the run's when none loads."""
        while True:
            try:
                state, error = load_checkpoint(self.checkpointable(), self.resumed_from), None
            except TrainingError as exc:
                state, error = None, str(exc)
            error = _first_error_of_any_rank(error)
            if error is None:
                return state
            older: Path | None = None
            if dist.get_rank() == 0:
                try:
                    older, _ = find_checkpoint(self.checkpoint_dir, below=step_of(self.resumed_from.name))
                except TrainingError:
                    older = None
            box = [older]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                raise TrainingError(error)
            self.log(f"{error}; trying {box[0].name}")
            self.resumed_from = box[0]

    @property
    def step(self) -> int:
        """Optimizer steps taken (resumed runs included)."""
        return self.state.step

    # ------------------------------------------------------------ one step

    def micro_batches(self, batch: np.ndarray) -> list[dict]:
        """This rank's micro-batches of a global batch [B, S+1], on the training device."""
        return _micro_batches(batch, self.par.dp_rank, self.par.data, self.cfg.train.micro_batch_size, self.device)

    def _forward_backward(self, micro: list[dict], forward_only: bool) -> list[dict]:
        """Forward (and backward) over one global batch's micro-batches; megatron-core's per-micro-batch losses, left
        on the device."""
        return self.forward_backward(
            forward_step_func=_forward_step,
            # Each chunk reads every micro-batch: the first for the tokens, the last for the labels.
            data_iterator=[iter(micro) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro),
            model=self.chunks,
            num_microbatches=len(micro),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def _run_schedule(self, batch: np.ndarray, forward_only: bool) -> tuple[float, float]:
        """Forward (and backward) over one global batch; returns (loss_sum, tokens) summed over ranks."""
        from megatron.core import parallel_state as ps

        losses = self._forward_backward(self.micro_batches(batch), forward_only)
        totals = torch.zeros(2, dtype=torch.float64)
        for item in losses:
            totals += item["lm"].double().cpu()
        if self.par.is_last_stage:
            group = ps.get_data_parallel_group(with_context_parallel=False)
            dist.all_reduce(totals, group=group)
        # Pipeline stages other than the last hold zeros: share the last stage's totals with everyone.
        if self.par.pipeline > 1:
            dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
        return float(totals[0]), float(totals[1])

    def _zero_grad(self) -> None:
        """Clear every chunk's gradient buffer and the optimizer's gradients before a step."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns its metrics row (without throughput fields)."""
        self._zero_grad()
        batch = self.data.train_batch(self.step)
        loss_sum, tokens = self._run_schedule(batch, forward_only=False)
        loss = loss_sum / tokens
        if not math.isfinite(loss):
            ckpt = latest_checkpoint(self.checkpoint_dir)
            kept = f"last good checkpoint {ckpt} is intact" if ckpt else "no checkpoint had been saved"
            raise TrainingError(f"loss is {loss} at step {self.step + 1}; stopping ({kept})")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        grad_norm = self._update()
        self.state.last_train_loss = loss
        row = {"step": self.step, "loss": loss, "tokens": tokens, "lr": lr}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.moe_losses is not None:
            row.update(self.moe_losses.read())
        return row

    def _update(self):
        """The optimizer and schedule step after a backward pass; returns megatron-core's gradient norm."""
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.state.step += 1
        return grad_norm

    def bare_step(self, micro: list[dict]) -> None:
        """The work of one training step on micro-batches already on the device (`micro_batches`), without its
        bookkeeping: no loss read back to the host, no finiteness check, no MoE loss readout. What the benchmark
        times; training uses `train_step`."""
        self._zero_grad()
        self._forward_backward(micro, forward_only=False)
        self._update()
        if self.moe_losses is not None:
            self.moe_losses.discard()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token), bits per byte and tokens evaluated over `train.eval_iters` batches (0 = the
        whole split), with the model in eval mode (no dropout)."""
        t = self.cfg.train
        loss_sum = tokens = 0.0
        for chunk in self.chunks:
            chunk.eval()
        try:
            for batch in self.data.valid_batches(t.global_batch_size, t.eval_iters):
                s, n = self._run_schedule(batch, forward_only=True)
                loss_sum += s
                tokens += n
        finally:
            for chunk in self.chunks:
                chunk.train()
        if self.moe_losses is not None:
            self.moe_losses.discard()
        loss = loss_sum / tokens
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.data.bytes_per_token, "val_tokens": int(tokens)}

    def checkpointable(self) -> Checkpointable:
        """What a checkpoint of this run holds, by owner."""
        return Checkpointable(
            sharded=ShardedStates(self.chunks, self.optimizer, self.scheduler, self.cfg.train.distributed_optimizer),
            train=self.state, config=self.cfg,
            parts={} if self.load_monitor is None else {"expert_load": self.load_monitor},
        )

    def save(self, elapsed_s: float) -> None:
        """Checkpoint this step; `elapsed_s`, the run's wall-clock time so far, goes into the train state."""
        self.state.elapsed_s = elapsed_s
        if self.cfg.train.overlap_param_gather:  # the last step's parameters are gathered at the next forward:
            for chunk in self.chunks:  # gather them now (what Megatron-LM does before it saves)
                chunk.disable_forward_pre_hook()
        save_checkpoint(self.checkpointable(), self.checkpoint_dir)
        if self.cfg.train.overlap_param_gather:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()

    # ------------------------------------------------------------ the loop

    def log(self, text: str) -> None:
        if self.par.is_logging_rank and not self.quiet:
            print(text, flush=True)

    def fit(self, stop: StopFlag | None = None) -> RunResult:
        """Train to `train.train_steps`; a stop signal (see `StopFlag`) saves and raises `Preempted`."""
        t = self.cfg.train
        stop = stop or StopFlag()
        self.log(run_line(self.cfg.model.is_moe, self.param_counts, self.par, t.train_steps, self.tokens_per_step))
        if note := self.data.repeats(t.train_steps):
            self.log(note)
        if self.resumed_from is not None:
            self.log(f"resumed from {self.resumed_from} at step {self.step}")
        meter = ThroughputMeter(
            tokens_per_step=self.tokens_per_step,
            flops_per_token=self.flops_per_token,
            world_size=self.par.world_size,
            peak_flops=self.peak_flops,
            first_step=self.step,
            elapsed_before=self.state.elapsed_s,
        )
        while self.step < t.train_steps:
            row = self.train_step()
            meter.step_done()
            at_end = self.step == t.train_steps
            if at_end or self.step % t.log_interval == 0:
                self._log_train(row, meter)
            with meter.paused():
                if self._eval_due(at_end):
                    self._evaluate_and_log()
                saved = self._save_due(at_end)
                if saved:
                    self.save(meter.elapsed())
                # A stop lands after this step's evaluation: a resumed run starts at the next step and would never
                # evaluate this one, so its eval rows and best validation loss would differ from an uninterrupted run's.
                if not at_end and stop.agreed():
                    self._stop(stop.signum, saved, meter)
        self.metrics.close()  # the sinks' last rows are out before result.json marks the run complete
        return self._write_result(meter)

    def _log_train(self, row: dict[str, Any], meter: ThroughputMeter) -> None:
        row.update(meter.report())
        if self.load_monitor is not None:
            row.update(self.load_monitor.collect())
        self.metrics.log({"kind": "train", **row})
        self.log(progress_line(row, self.cfg.train.train_steps, meter.eta(self.step, self.cfg.train.train_steps)))

    def _eval_due(self, at_end: bool) -> bool:
        interval = self.cfg.train.eval_interval
        return at_end or (bool(interval) and self.step % interval == 0)

    def _evaluate_and_log(self) -> None:
        ev = self.evaluate()
        self.state.record_eval(ev["val_loss"])
        self.metrics.log({"kind": "eval", "step": self.step, **ev})
        self.log(eval_line(self.step, ev))

    def _save_due(self, at_end: bool) -> bool:
        interval = self.cfg.train.save_interval
        return (bool(interval) and (self.step % interval == 0 or at_end)) or self.step in self.cfg.train.keep_checkpoints_at

    def _stop(self, signum: int, saved: bool, meter: ThroughputMeter) -> NoReturn:
        """Save (unless this step already did), leave the preemption marker, raise `Preempted`."""
        if not saved:
            self.save(meter.elapsed())
        if self.par.is_logging_rank:
            mark_preempted(self.out_dir, self.step, signum)
        raise Preempted(f"stopped by signal at step {self.step}; checkpoint saved, run again to resume")

    def _write_result(self, meter: ThroughputMeter) -> RunResult:
        result = RunResult(
            steps=self.step,
            final_train_loss=self.state.last_train_loss,
            best_val_loss=self.state.best_val_loss,
            best_val_step=self.state.best_val_step,
            train_time_s=meter.elapsed(),
            tokens_per_step=self.tokens_per_step,
            data=self.data.describe(),
            **gpu_memory(),
        )
        if self.par.is_logging_rank:
            write_result(self.out_dir, result)
        return result


def train(cfg: RunConfig, *, quiet: bool = False, stop: StopFlag | None = None) -> RunResult:
    """Train one run on this process (one rank of a torchrun job, or alone).

    The stop signals are caught from before start-up (data, model, checkpoint loading; from before torch's import
    when the caller passes its `stop`), so a signal that arrives then still ends in a checkpoint, after the first
    step.
    """
    stop = stop or StopFlag()
    out_dir = Path(cfg.train.output_dir)
    new_dir = not out_dir.exists()
    try:
        return Trainer(cfg, quiet=quiet).fit(stop)
    except BaseException as exc:
        if new_dir and int(os.environ.get("RANK", "0")) == 0:
            release_unused_output_dir(out_dir)
        if isinstance(exc, (MemoryError, RuntimeError)) and _out_of_memory(exc):
            raise TrainingError(_out_of_memory_message(cfg, exc)) from None
        raise


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "Cannot allocate memory" in text or "out of memory" in text.lower())


def _out_of_memory_message(cfg: RunConfig, exc: BaseException) -> str:
    """One line: what ran out, and how big the model is against it."""
    params = ledger(cfg.model, cfg.parallel.tensor).total_params
    world = int(os.environ.get("WORLD_SIZE", "1"))
    need = estimate_memory(cfg, world, precision=cfg.train.resolved_precision(torch.cuda.is_available())).per_gpu
    where = "GPU" if "CUDA" in str(exc) else "host"  # torch names CUDA in its GPU allocator's errors
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return (f"out of {where} memory ({first}); the model has {params:,} parameters, and `megatron-moe plan` estimates "
            f"{human_bytes(need.total)} per process on world size {world} ({human_bytes(need.weights + need.grads)} "
            f"weights and gradients, {human_bytes(need.optimizer)} optimizer, {human_bytes(need.activations)} "
            "activations): lower train.micro_batch_size, turn on train.recompute_granularity or "
            "train.distributed_optimizer, or spread it over more processes")
