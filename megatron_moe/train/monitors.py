"""The training loop's side work, each a small object or function the loop calls.

- `Metrics`: the `metrics.jsonl` sink (the source of truth), handing each row on to the optional sinks
  `TensorBoardSink` and `WandbSink` (`open_sinks`) under namespaced keys (`sink_scalars`).
- `ThroughputMeter`: tokens/s, elapsed time, TFLOP/s per device, MFU and ETA.
- `ExpertLoadMonitor`: tokens per expert, read from megatron-core's routers, and the aux-loss-free expert biases.
- `MoELossReader`: the MoE auxiliary losses from megatron-core's tracker.
- `run_line`, `progress_line`, `eval_line`: what the logging rank prints.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_moe.config import ConfigError
from megatron_moe.files import atomic_write_text, read_jsonl
from megatron_moe.model import BALANCING
from megatron_moe.planner.cost import peak_flops


@dataclass
class Metrics:
    """Appends one JSON object per line to `metrics.jsonl`; `path` is None off the logging rank.

    Each row also goes to `sinks` (TensorBoard, W&B: what `open_sinks` made), as `sink_scalars` names it.
    """

    path: Path | None
    sinks: list[Any] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path | None, resumed_step: int | None, sinks: Iterable[Any] = ()) -> Metrics:
        """The sink for a run starting fresh (`resumed_step` None: old rows go) or resuming at `resumed_step`.

        A resumed run redoes the steps after its checkpoint, so rows logged after that step are dropped.
        """
        if path is not None and path.exists():
            if resumed_step is None:
                path.unlink()
            else:
                kept = [r for r in read_jsonl(path, allow_damaged=True) if r["step"] <= resumed_step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        return cls(path, list(sinks))

    def log(self, row: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.sinks:
            scalars = sink_scalars(row)
            for sink in self.sinks:
                sink.log(row["step"], scalars)

    def close(self) -> None:
        """Finish the optional sinks (the metrics file needs nothing)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


# Metrics-row fields and their names in TensorBoard and W&B, grouped by namespace. Per-expert loads and
# per-pass token counts stay in metrics.jsonl only: hundreds of series for a large MoE, or constants.
SINK_KEYS = {
    "loss": "loss/lm",
    "grad_norm": "loss/grad_norm",
    "lr": "loss/lr",
    "tokens_per_s": "perf/tokens_per_s",
    "tflops_per_device": "perf/tflops_per_device",
    "mfu": "perf/mfu",
    "elapsed_s": "perf/elapsed_s",
    "gpu_mem_allocated_peak_gib": "perf/gpu_mem_allocated_peak_gib",
    "gpu_mem_reserved_peak_gib": "perf/gpu_mem_reserved_peak_gib",
    **{b.tracked: f"moe/{b.short.replace(' ', '_')}" for b in BALANCING.values()},
    "expert_bias_spread": "moe/expert_bias_spread",
    "z_loss": "moe/z",
    "load_imbalance": "moe/load_imbalance",
    "dropped_fraction": "moe/dropped_fraction",
    "val_loss": "eval/val_loss",
    "val_bpb": "eval/val_bpb",
}

# TrainConfig field that turns a sink on -> the package it imports, which is also the extra that installs it.
SINK_PACKAGES = {"tensorboard_dir": "tensorboard", "wandb_project": "wandb"}


def sink_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's fields the optional sinks get, under their namespaced names; per MoE layer, its load imbalance
    (moe/layer<i>/load_imbalance, i counted from 1 over the MoE layers) and each expert's share of the routed
    tokens (moe/layer<i>/expert<j>_load)."""
    out = {name: float(row[key]) for key, name in SINK_KEYS.items() if key in row}
    for i, imbalance in enumerate(row.get("layer_imbalance") or [], 1):
        out[f"moe/layer{i}/load_imbalance"] = float(imbalance)
    for i, loads in enumerate(row.get("expert_load") or [], 1):
        out.update({f"moe/layer{i}/expert{j}_load": float(x) for j, x in enumerate(loads)})
    return out


def check_sinks(train_cfg) -> None:
    """A ConfigError naming the extra to install when a sink is turned on and its package does not import.

    Called by every rank at start-up, before anything is built, although only the logging rank writes.
    """
    for name, package in SINK_PACKAGES.items():
        if getattr(train_cfg, name):
            try:
                __import__(package)
            except ImportError:
                raise ConfigError(
                    f"train.{name} = {getattr(train_cfg, name)!r} needs the {package} package; install it with "
                    f"pip install 'megatron-moe[{package}]' (or set train.{name} = \"\" to turn it off)"
                ) from None


def open_sinks(cfg, resumed_step: int | None) -> list[Any]:
    """The optional sinks a run config turns on (call on the logging rank only)."""
    t = cfg.train
    sinks: list[Any] = []
    if t.tensorboard_dir:
        sinks.append(TensorBoardSink(Path(t.tensorboard_dir), resumed_step))
    if t.wandb_project:
        sinks.append(WandbSink(cfg, Path(t.output_dir), resumed_step))
    return sinks


class TensorBoardSink:
    """Scalars in TensorBoard event files under `log_dir` (one run per directory)."""

    def __init__(self, log_dir: Path, resumed_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the events of earlier files in this directory from purge_step on: all of them for a
        # fresh start, those after the checkpoint for a resumed run (it logs those steps again).
        self.writer = SummaryWriter(str(log_dir), purge_step=(resumed_step or 0) + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        # Flushed row by row: a run killed mid-way keeps what it logged, as metrics.jsonl does.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars in a Weights & Biases run, with the resolved run config as its config.

    A resumed run continues the W&B run of its earlier attempts (its id is kept in `output_dir/wandb-run-id`);
    a fresh start begins a new one. W&B's files go under `output_dir` unless WANDB_DIR says otherwise.
    """

    ID_FILE = "wandb-run-id"

    def __init__(self, cfg, out_dir: Path, resumed_step: int | None):
        import wandb

        t = cfg.train
        id_file = out_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if resumed_step is not None and id_file.is_file() else ""
        run_id = run_id or secrets.token_hex(6)
        atomic_write_text(id_file, run_id + "\n")
        try:
            self.run = wandb.init(
                project=t.wandb_project, entity=t.wandb_entity or None, name=t.wandb_run_name or None,
                id=run_id, resume="allow", config=cfg.to_dict(),
                dir=None if os.environ.get("WANDB_DIR") else str(out_dir),
            )
        except wandb.errors.Error as exc:  # e.g. no API key on a compute node
            raise ConfigError(f"train.wandb_project = {t.wandb_project!r}: W&B did not start: "
                              f"{' '.join(str(exc).split())}") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class ThroughputMeter:
    """Wall-clock accounting of one training process.

    Tokens/s is measured over the steps since the last `report`, leaving out time spent inside `paused()`
    (evaluation, checkpointing), so it is the training rate alone. `elapsed()` counts everything, including
    the elapsed time of earlier attempts of a resumed run (`elapsed_before`).
    """

    def __init__(self, *, tokens_per_step: int, flops_per_token: float, world_size: int,
                 peak_flops: float | None, first_step: int, elapsed_before: float = 0.0):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_flops = peak_flops
        now = time.perf_counter()
        self.start = now - elapsed_before
        self.run_start, self.run_first_step = now, first_step
        self.window_start, self.window_steps = now, 0

    def step_done(self) -> None:
        self.window_steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in this block stays out of the tokens/s window."""
        began = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - began

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def report(self) -> dict[str, float]:
        """Metrics-row fields for the steps since the last report; starts the next window."""
        now = time.perf_counter()
        out = {"tokens_per_s": self.window_steps * self.tokens_per_step / (now - self.window_start)}
        out["elapsed_s"] = now - self.start
        # Model FLOPs (the planner's training FLOPs/token) per second per process.
        out["tflops_per_device"] = out["tokens_per_s"] * self.flops_per_token / self.world_size / 1e12
        if self.peak_flops:
            out["mfu"] = out["tflops_per_device"] * 1e12 / self.peak_flops
        out.update(gpu_memory())
        self.window_start, self.window_steps = now, 0
        return out

    def eta(self, step: int, last_step: int) -> float:
        """Seconds to `last_step` at this attempt's mean step time so far (evaluation included)."""
        return (time.perf_counter() - self.run_start) / (step - self.run_first_step) * (last_step - step)


class ExpertLoadMonitor:
    """Counts the tokens each router sends to each expert (after any capacity drop) during training, and reads
    the aux-loss-free expert biases when the model has them.

    A forward hook on each megatron-core router reads its routing map; nothing in the model changes.
    Counts accumulate on the model's device between `collect()` calls (no host sync per router call) and are
    brought to the host and summed over all ranks there.
    """

    def __init__(self, model, num_layers: int, num_experts: int, top_k: int, expert_bias: bool = False,
                 device: torch.device | str = "cpu"):
        from megatron.core.transformer.moe.router import Router

        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        self.routed = torch.zeros(num_layers, dtype=torch.float64)  # tokens x top_k offered per layer (host ints)
        self.top_k = top_k
        self.routers = [m for m in model.modules() if isinstance(m, Router)]
        self.expert_bias = expert_bias
        for router in self.routers:
            router.register_forward_hook(self._hook)

    def _hook(self, router, inputs, output) -> None:
        if not (router.training and torch.is_grad_enabled()):
            return  # evaluation passes are not training load
        routing_map = output[1]
        layer = router.layer_number - 1
        self.counts[layer] += routing_map.sum(dim=0).detach().double()
        self.routed[layer] += routing_map.shape[0] * self.top_k

    def collect(self) -> dict[str, Any]:
        """Per-layer load fractions, mean max/mean imbalance and dropped fraction since the last call, and the
        expert biases when the model has them; one collective."""
        experts = self.counts.shape[1]
        columns = [self.counts.cpu(), self.routed[:, None]]
        if self.expert_bias:
            columns += self._local_bias()
        summed = torch.cat(columns, dim=1)  # one row per layer: counts, routed[, bias sums, holders]
        dist.all_reduce(summed)
        counts, routed = summed[:, :experts], summed[:, experts]
        self.counts.zero_()
        self.routed.zero_()
        layers = routed > 0
        if not layers.any():
            return {}
        counts, routed = counts[layers], routed[layers]
        load = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)
        out = {
            "expert_load": [[round(x, 5) for x in row] for row in load.tolist()],
            "layer_imbalance": [round(x, 4) for x in imbalance.tolist()],
            "load_imbalance": float(imbalance.mean()),
            "dropped_fraction": float(1 - counts.sum() / routed.sum()),
        }
        if self.expert_bias:
            held = summed[:, 2 * experts + 1]
            bias = (summed[:, experts + 1 : 2 * experts + 1] / held.clamp(min=1)[:, None])[held > 0]
            out["expert_bias"] = [[round(x, 6) for x in row] for row in bias.tolist()]
            out["expert_bias_spread"] = float((bias.max(dim=1).values - bias.min(dim=1).values).mean())
        return out

    def state_dict(self) -> dict[str, list]:
        """The counters of the logging window in progress, summed over ranks (a collective: every rank calls it).

        They are counts of whole tokens in float64, so the sum is exact and a resumed run logs the same imbalance.
        """
        both = torch.cat([self.counts.flatten().cpu(), self.routed])
        dist.all_reduce(both)
        n = self.counts.numel()
        return {"counts": both[:n].view_as(self.counts).tolist(), "routed": both[n:].tolist()}

    def load_state_dict(self, saved: Any) -> None:
        """Put a saved window's counters on global rank 0 (`collect` sums over every rank); a missing or malformed
        one (another model's, or none saved) starts an empty window."""
        self.counts.zero_()
        self.routed.zero_()
        if not isinstance(saved, dict) or dist.get_rank() != 0:
            return
        try:
            counts = torch.tensor(saved["counts"], dtype=self.counts.dtype)
            routed = torch.tensor(saved["routed"], dtype=self.routed.dtype)
        except (KeyError, TypeError, ValueError, RuntimeError):
            return
        if counts.shape == self.counts.shape and routed.shape == self.routed.shape:
            self.counts.copy_(counts)
            self.routed.copy_(routed)

    def _local_bias(self) -> list[torch.Tensor]:
        """This rank's expert biases summed per layer, and how many of its routers hold each layer: every replica
        of a layer holds the same bias, so the world's sums over the holders' count is that bias."""
        bias = torch.zeros(self.counts.shape, dtype=torch.float64)
        held = torch.zeros(self.counts.shape[0], 1, dtype=torch.float64)
        for router in self.routers:
            bias[router.layer_number - 1] += router.expert_bias.detach().double().cpu()
            held[router.layer_number - 1] += 1
        return [bias, held]




class MoELossReader:
    """The load-balancing and z losses of one optimizer step, from megatron-core's aux-loss tracker.

    Values are coefficient-free means over MoE layers and micro-batches. They reach the gradients through
    megatron-core's `MoEAuxLossAutoScaler`; the reported LM loss never includes them.
    """

    def __init__(self, model_cfg, tensor: int, data_parallel: int, micro_batches: int):
        self.num_layers = model_cfg.num_layers
        self.moe_layers = sum(model_cfg.moe_layer_pattern())
        e = model_cfg.moe
        self.coeffs = {BALANCING[e.aux_loss].tracked: e.aux_loss_coeff, "z_loss": e.z_loss_coeff}
        self.tensor = tensor
        self.data_parallel = data_parallel
        self.micro_batches = micro_batches

    def read(self) -> dict[str, float]:
        """The step's losses (a collective: every rank calls it), then clears the tracker."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker()
        out = {}
        # Each layer's value lives on one pipeline stage (a stage without MoE layers has no entry, but
        # must join the collective). Within a stage the z-loss is a per-rank mean; the micro-batch and
        # sequence balancing losses are partial sums over the tensor-parallel ranks (MoE with tensor
        # parallelism always uses sequence parallelism, so each rank routes its own tokens), the global-batch
        # one over the tensor- and data-parallel ranks. Sum over the world, divide by replicas.
        for name, coeff in self.coeffs.items():
            if not coeff:
                continue
            values = torch.zeros(self.num_layers)
            if name in tracker:
                values += tracker[name]["values"].detach().float().cpu()
            dist.all_reduce(values)
            replicas = {"z_loss": self.data_parallel * self.tensor, "global_load_balancing_loss": 1}.get(
                name, self.data_parallel)
            out[name] = float(values.sum()) / replicas / self.moe_layers / self.micro_batches
        self.discard()
        return out

    @staticmethod
    def discard() -> None:
        """Drop what the tracker holds (evaluation passes record aux losses too)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        clear_aux_losses_tracker()


def device_peak_flops(fp8: bool) -> tuple[str, float | None]:
    """(device name, peak FLOP/s) of this GPU, or (name, None) when unknown or on CPU."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, peak_flops(name, fp8)


def gpu_memory() -> dict[str, float]:
    """Peak GPU memory this process has allocated (tensors) and reserved (the caching allocator's pool), in GiB;
    nothing on CPU."""
    if not torch.cuda.is_available():
        return {}
    return {"gpu_mem_allocated_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "gpu_mem_reserved_peak_gib": torch.cuda.max_memory_reserved() / 2**30}


_AUX_NAMES = {**{b.tracked: b.short for b in BALANCING.values()}, "z_loss": "z", "expert_bias_spread": "bias spread"}


def run_line(is_moe: bool, param_counts: dict[str, int], par, train_steps: int, tokens_per_step: int) -> str:
    """The first line of a run: model, parameters, parallel layout and length."""
    return (
        f"training {'MoE' if is_moe else 'dense'} model: "
        + ", ".join(f"{k} {v:,}" for k, v in param_counts.items() if v)
        + f" (rank-local) | world {par.world_size} = tp {par.tensor} x pp {par.pipeline}"
        f" x dp {par.data} (ep {par.expert}) | {train_steps} steps x {tokens_per_step:,} tokens"
    )


def progress_line(row: dict[str, Any], train_steps: int, eta_s: float) -> str:
    """One logged training step (a metrics row with its throughput fields)."""
    extra = "".join(f" | {short} {row[k]:.4f}" for k, short in _AUX_NAMES.items() if k in row)
    return (
        f"step {row['step']:>{len(str(train_steps))}}/{train_steps} | loss {row['loss']:.4f}{extra}"
        f" | lr {row['lr']:.2e} | {row['tokens_per_s']:,.0f} tok/s"
        + (f" | {row['tflops_per_device']:.1f} TFLOP/s | MFU {row['mfu']:.1%}" if "mfu" in row else "")
        + (f" | imbalance {row['load_imbalance']:.2f}" if "load_imbalance" in row else "")
        + (f" | GPU mem {row['gpu_mem_allocated_peak_gib']:.1f} GiB" if "gpu_mem_allocated_peak_gib" in row else "")
        + f" | eta {eta_s:,.0f}s"
    )


def eval_line(step: int, ev: dict[str, float]) -> str:
    return (f"eval at step {step}: val loss {ev['val_loss']:.4f} | {ev['val_bpb']:.4f} bits/byte"
            f" | {ev['val_tokens']:,} tokens")
