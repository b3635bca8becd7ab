"""The training engine: megatron-core's DDP, optimizer, LR scheduler and forward-backward schedules.

`train(cfg)` reads top to bottom: set up the platform and process groups, build the data source and the
model, wrap them in megatron-core's machinery, then loop: fetch this rank's micro-batches, run the
forward-backward schedule, step the optimizer, log. MoE auxiliary losses reach the gradients through
megatron-core's `MoEAuxLossAutoScaler` and are logged separately: the reported LM loss never includes them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_moe.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_moe.config import ConfigError, RunConfig, load_run_config, save_toml, validate
from megatron_moe.planner import ledger
from megatron_moe.utils import atomic_write_json, atomic_write_text, read_jsonl


_AUX_NAMES = {"load_balancing_loss": "lb", "z_loss": "z"}


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); the message is one line."""


class Preempted(RuntimeError):
    """A stop signal arrived; a checkpoint was saved and running the same command again resumes."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM sends before a time limit or preemption


class StopFlag:
    """Set by SIGTERM/SIGUSR1; checked between steps so a stop always lands on a step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled (ranks may receive the signal at different steps)."""
        flag = torch.tensor([float(self.signum)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class Metrics:
    """Appends one JSON object per line to `metrics.jsonl` (logging rank only)."""

    path: Path | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _quiet_megatron_warnings() -> None:
    # megatron-core warns at import that apex/TE are missing; that is expected here and said in README.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex).*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


class ExpertLoadMonitor:
    """Counts the tokens each router sends to each expert (after any capacity drop) during training.

    A forward hook on each megatron-core router reads its routing map; nothing in the model changes.
    Counts accumulate between `collect()` calls and are summed over all ranks there.
    """

    def __init__(self, model, num_layers: int, num_experts: int, top_k: int):
        from megatron.core.transformer.moe.router import Router

        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.routed = torch.zeros(num_layers, dtype=torch.float64)  # tokens x top_k offered per layer
        self.top_k = top_k
        for module in model.modules():
            if isinstance(module, Router):
                module.register_forward_hook(self._hook)

    def _hook(self, router, inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return  # evaluation passes are not training load
        routing_map = output[1]
        layer = router.layer_number - 1
        self.counts[layer] += routing_map.sum(dim=0).detach().double().cpu()
        self.routed[layer] += routing_map.shape[0] * self.top_k

    def collect(self) -> dict[str, Any]:
        """Per-layer load fractions, mean max/mean imbalance and dropped fraction since the last call."""
        both = torch.cat([self.counts.flatten(), self.routed])
        dist.all_reduce(both)
        counts = both[: self.counts.numel()].view_as(self.counts)
        routed = both[self.counts.numel() :]
        self.counts.zero_()
        self.routed.zero_()
        layers = routed > 0
        if not layers.any():
            return {}
        counts, routed = counts[layers], routed[layers]
        load = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)
        return {
            "expert_load": [[round(x, 5) for x in row] for row in load.tolist()],
            "load_imbalance": float(imbalance.mean()),
            "dropped_fraction": float(1 - counts.sum() / routed.sum()),
        }


# Dense bf16 tensor-core peaks (datasheet, SXM) used for MFU; FP8 peaks are twice these.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def device_peak_flops(fp8: bool) -> tuple[str, float | None]:
    """(device name, peak FLOP/s) of this GPU, or (name, None) when unknown or on CPU."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return name, peak * (2 if fp8 else 1)
    return name, None


def resolve_precision(precision: str, on_gpu: bool) -> tuple[torch.dtype, bool]:
    """(params dtype, fp8) for the configured precision."""
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
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
    """Owns the model, optimizer, scheduler and data for one run on this process."""

    def __init__(self, cfg: RunConfig, *, quiet: bool = False):
        _quiet_megatron_warnings()
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.module import Float16Module

        from megatron_moe.data import build_data_source
        from megatron_moe.model import build_model, local_parameter_counts
        from megatron_moe.parallel import initialize_parallel
        from megatron_moe.platform import seed_everything, setup_platform

        self.cfg = cfg
        self.quiet = quiet
        self.device = setup_platform()
        on_gpu = self.device.type == "cuda"
        params_dtype, fp8 = resolve_precision(cfg.train.precision, on_gpu)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world)
        self.par = initialize_parallel(cfg.parallel, self.device)
        t = cfg.train
        self.num_micro_batches = t.global_batch_size // (t.micro_batch_size * self.par.data)

        # A cold data cache (the synthetic corpus) is built once per machine: local rank 0 first, then the
        # other ranks read what it wrote (one barrier, passed by every rank once).
        builds_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if not builds_first:
            dist.barrier()
        self.data = build_data_source(cfg.data, cfg.model.seq_length, t.global_batch_size, t.train_steps)
        if builds_first:
            dist.barrier()
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({self.data.vocab_size}); set model.vocab_size >= {self.data.vocab_size}"
            )
        self.data.check_valid_size(t.global_batch_size, t.eval_iters)  # refused now, not at the first evaluation

        # megatron-core's aux-loss tracker is a process global sized by the first model that used it.
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
        seed_everything(t.seed, self.par.tp_rank, self.par.ep_rank)
        model = build_model(cfg.model, cfg.parallel, seed=t.seed, params_dtype=params_dtype, fp8=fp8)
        self.param_counts = local_parameter_counts(model)
        self.load_monitor = (
            ExpertLoadMonitor(model, cfg.model.num_layers, cfg.model.moe.num_experts, cfg.model.moe.top_k)
            if cfg.model.is_moe
            else None
        )
        self.flops_per_token = ledger(cfg.model, cfg.parallel.tensor).flops_train_per_token
        self.device_name, self.peak_flops = device_peak_flops(fp8)
        tcfg = model.config
        if params_dtype != torch.float32:
            model = Float16Module(tcfg, model)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=t.distributed_optimizer,
        )
        self.model = DistributedDataParallel(tcfg, ddp_config, model)
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
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.scheduler = lr_scheduler(self.optimizer, cfg)
        tcfg.no_sync_func = self.model.no_sync
        tcfg.finalize_model_grads_func = finalize_model_grads
        tcfg.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()
        self.step = 0

        out = Path(t.output_dir)
        self.out_dir = out
        self.checkpoint_dir = out / "checkpoints"
        self.resumed_from = latest_checkpoint(self.checkpoint_dir)
        if self.resumed_from is not None:
            load_checkpoint(self, self.resumed_from)
        metrics_path = None
        kept: list[dict[str, Any]] = []
        if self.par.is_logging_rank:
            out.mkdir(parents=True, exist_ok=True)
            metrics_path = out / "metrics.jsonl"
            if self.resumed_from is not None and metrics_path.exists():
                # Rows logged after the checkpoint are redone by this run: drop them.
                kept = [r for r in read_jsonl(metrics_path) if r["step"] <= self.step]
                atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
            elif metrics_path.exists():
                metrics_path.unlink()
            save_toml(cfg, out / "config.toml")
        self.metrics = Metrics(metrics_path, kept)

    # ------------------------------------------------------------ one step

    def _run_schedule(self, batch: np.ndarray, forward_only: bool) -> tuple[float, float]:
        """Forward (and backward) over one global batch; returns (loss_sum, tokens) summed over ranks."""
        from megatron.core import parallel_state as ps

        micro = _micro_batches(
            batch, self.par.dp_rank, self.par.data, self.cfg.train.micro_batch_size, self.device
        )
        losses = self.forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter(micro),
            model=[self.model],
            num_microbatches=len(micro),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )
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

    def _moe_losses(self) -> dict[str, float]:
        """Mean over MoE layers and micro-batches of the load-balancing and z losses (coefficient-free)."""
        if not self.cfg.model.is_moe:
            return {}
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        tracker = get_moe_layer_wise_logging_tracker()
        out = {}
        moe_layers = sum(self.cfg.model.moe_layer_pattern())
        # Each layer's value lives on one pipeline stage (a stage without MoE layers has no entry, but
        # must join the collective). Within a stage the z-loss is a per-rank mean; the load-balancing
        # loss is a partial sum over the tensor-parallel ranks (MoE with tensor parallelism always uses
        # sequence parallelism, so each rank routes its own tokens). Sum over the world, divide by replicas.
        e = self.cfg.model.moe
        coeffs = {"load_balancing_loss": e.aux_loss_coeff, "z_loss": e.z_loss_coeff}
        for name, coeff in coeffs.items():
            if not coeff:
                continue
            values = torch.zeros(self.cfg.model.num_layers)
            if name in tracker:
                values += tracker[name]["values"].detach().float().cpu()
            dist.all_reduce(values)
            partial_over = self.par.tensor if name == "load_balancing_loss" else 1
            replicas = self.par.world_size // self.par.pipeline // partial_over
            out[name] = float(values.sum()) / replicas / moe_layers / self.num_micro_batches
        clear_aux_losses_tracker()
        return out

    def train_step(self) -> dict[str, Any]:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        batch = self.data.train_batch(self.step)
        loss_sum, tokens = self._run_schedule(batch, forward_only=False)
        loss = loss_sum / tokens
        if not math.isfinite(loss):
            ckpt = latest_checkpoint(self.checkpoint_dir)
            kept = f"last good checkpoint {ckpt} is intact" if ckpt else "no checkpoint had been saved"
            raise TrainingError(f"loss is {loss} at step {self.step + 1}; stopping ({kept})")
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        row = {"step": self.step, "loss": loss, "tokens": tokens, "lr": lr}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        row.update(self._moe_losses())
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        loss_sum = tokens = 0.0
        for batch in self.data.valid_batches(t.global_batch_size, t.eval_iters):
            s, n = self._run_schedule(batch, forward_only=True)
            loss_sum += s
            tokens += n
        if self.cfg.model.is_moe:
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()
        loss = loss_sum / tokens
        return {"val_loss": loss, "val_bpb": loss / math.log(2) / self.data.bytes_per_token}

    # ------------------------------------------------------------ the loop

    def log(self, text: str) -> None:
        if self.par.is_logging_rank and not self.quiet:
            print(text, flush=True)

    def fit(self, stop: StopFlag | None = None) -> dict[str, Any]:
        """Train to `train.train_steps`; a stop signal (see `StopFlag`) saves and raises `Preempted`."""
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * self.cfg.model.seq_length
        self.log(
            f"training {'MoE' if self.cfg.model.is_moe else 'dense'} model: "
            + ", ".join(f"{k} {v:,}" for k, v in self.param_counts.items() if v)
            + f" (rank-local) | world {self.par.world_size} = tp {self.par.tensor} x pp {self.par.pipeline}"
            f" x dp {self.par.data} (ep {self.par.expert}) | {t.train_steps} steps x {tokens_per_step:,} tokens"
        )
        if self.resumed_from is not None:
            self.log(f"resumed from {self.resumed_from} at step {self.step}")
        best = {"val_loss": math.inf, "step": 0}
        for row in self.metrics.rows:
            if row["kind"] == "eval" and row["val_loss"] < best["val_loss"]:
                best = {"val_loss": row["val_loss"], "step": row["step"]}
        last: dict[str, Any] = next((r for r in reversed(self.metrics.rows) if r["kind"] == "train"), {})
        start = time.perf_counter() - last.get("elapsed_s", 0.0)
        stop = stop or StopFlag()
        run_start, run_first_step = time.perf_counter(), self.step
        window_start, window_steps = run_start, 0
        while self.step < t.train_steps:
            row = self.train_step()
            window_steps += 1
            last = row
            if self.step % t.log_interval == 0 or self.step == t.train_steps:
                now = time.perf_counter()
                row["tokens_per_s"] = window_steps * tokens_per_step / (now - window_start)
                row["elapsed_s"] = now - start
                # Model FLOPs (the planner's training FLOPs/token) per second per process.
                row["tflops_per_device"] = row["tokens_per_s"] * self.flops_per_token / self.par.world_size / 1e12
                if self.peak_flops:
                    row["mfu"] = row["tflops_per_device"] * 1e12 / self.peak_flops
                if self.load_monitor is not None:
                    row.update(self.load_monitor.collect())
                window_start, window_steps = now, 0
                self.metrics.log({"kind": "train", **row})
                eta = (now - run_start) / (self.step - run_first_step) * (t.train_steps - self.step)
                extra = "".join(f" | {short} {row[k]:.4f}" for k, short in _AUX_NAMES.items() if k in row)
                self.log(
                    f"step {self.step:>{len(str(t.train_steps))}}/{t.train_steps} | loss {row['loss']:.4f}{extra}"
                    f" | lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s"
                    + (f" | {row['tflops_per_device']:.1f} TFLOP/s | MFU {row['mfu']:.1%}" if "mfu" in row else "")
                    + (f" | imbalance {row['load_imbalance']:.2f}" if "load_imbalance" in row else "")
                    + f" | eta {eta:,.0f}s"
                )
            at_end = self.step == t.train_steps
            paused = time.perf_counter()  # evaluation and saving stay out of the throughput window
            if at_end or (t.eval_interval and self.step % t.eval_interval == 0):
                ev = self.evaluate()
                self.metrics.log({"kind": "eval", "step": self.step, **ev})
                if ev["val_loss"] < best["val_loss"]:
                    best = {"val_loss": ev["val_loss"], "step": self.step}
                self.log(f"eval at step {self.step}: val loss {ev['val_loss']:.4f} | {ev['val_bpb']:.4f} bits/byte")
            saved = bool(t.save_interval) and (self.step % t.save_interval == 0 or at_end)
            if saved:
                save_checkpoint(self, self.checkpoint_dir)
            # A stop lands after this step's evaluation: a resumed run starts at the next step and would never
            # evaluate this one, so its eval rows and best validation loss would differ from an uninterrupted run's.
            if not at_end and stop.agreed():
                if not saved:
                    save_checkpoint(self, self.checkpoint_dir)
                raise Preempted(f"stopped by signal at step {self.step}; checkpoint saved, run again to resume")
            window_start += time.perf_counter() - paused
        result = {
            "steps": self.step,
            "final_train_loss": last.get("loss"),
            "best_val_loss": best["val_loss"],
            "best_val_step": best["step"],
            "train_time_s": time.perf_counter() - start,
            "tokens_per_step": tokens_per_step,
            "data": self.data.describe(),
        }
        if self.par.is_logging_rank:
            atomic_write_json(self.out_dir / "result.json", result)
        return result


def train(cfg: RunConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Train one run on this process (one rank of a torchrun job, or alone).

    The stop signals are caught from before start-up (data, model, checkpoint loading), so a signal that
    arrives then also ends in a checkpoint after the first step (before, it went unanswered).
    """
    stop = StopFlag()
    return Trainer(cfg, quiet=quiet).fit(stop)


def train_main(config_path: str | None, overrides: list[str]) -> int:
    """Entry point of `megatron-moe train`."""
    cfg = load_run_config(config_path, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    try:
        train(cfg)
    except TrainingError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"megatron-moe: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    finally:
        from megatron_moe.parallel import destroy_parallel

        destroy_parallel()
    return 0
