"""Memory a run needs per GPU, before it runs: the one table of bytes per parameter, and the estimate of weights,
gradients, optimizer state and activations for a run config on a parallel layout.

Weights, gradients and optimizer state are counted exactly for the model `megatron_moe.model.build_model` builds
(tested against the tensors of a built model and optimizer across layouts, to within the few elements of padding
megatron-core's buffers add):
    - each pipeline stage holds its layers (stage k: layers k L/P .. (k+1) L/P - 1; with V virtual stages, chunks
      of c = L/(P V) layers, chunk v of stage k layers (v P + k) c .. (v P + k + 1) c - 1); the first stage also the
      embedding, the last the final norm and the output layer (with tied embeddings and P > 1, the last stage holds
      a copy of the embedding: megatron-core keeps it in step with the first);
    - attention, dense and shared-expert FFNs, the embedding and the output layer are split over the T tensor-
      parallel ranks; norms and routers are whole on every rank; routed experts are split over the E_p expert-
      parallel ranks (E / E_p experts each, never tensor-split: expert-tensor parallel is 1);
    - gradients are one fp32 buffer of every local parameter (megatron-core reduces in fp32);
    - Adam's two fp32 moments, plus fp32 main weights when the model is bf16; the distributed optimizer splits them
      over the data-parallel ranks (routed experts over the expert-data-parallel ranks, world / (E_p x P)).

Activations are an estimate (formula after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", for the blocks built here), per token of a micro-batch, in the training precision's bytes p:
    - attention block: the norm's input and output (2 d), Q, K and V (d + 2 d_kv, d_kv = query groups x head
      dim), the attention output (d) and 4-byte softmax statistics per head (flash attention: no S x S scores);
    - dense FFN: the norm's input and output (2 d), the up projection's output (2 F gated, F otherwise) and the
      activation's (F);
    - MoE FFN: the norm's input and output (2 d), fp32 router logits and probabilities (2 x 4 bytes x E), and per
      routed copy (K of them, the average load of a balanced router) the dispatched input and combined output
      (2 d) with the expert's up projection and activation (3 D_e gated, 2 D_e otherwise); a shared expert as a
      dense FFN of its width;
    - everything split over T with sequence parallelism; without it the norms' tensors (and the router's) stay
      whole on each tensor rank;
    - "full" recomputation keeps only each recomputed unit's input (d per token, and p x d for each layer of
      a unit it recomputes at once); "selective" leaves out the recomputed modules' saved tensors;
    - the first pipeline stage holds P micro-batches in flight under the 1F1B schedule (stage k: P - k, at most
      the micro-batches per step); with V virtual stages, stage k holds 2 (P - k - 1) + (V - 1) P + 1 chunk
      micro-batches (megatron-core's interleaved warm-up, at most V x the micro-batches), each 1/V of its layers'
      activations: the first stage's P (1 + (P - 1) / (P V)) micro-batches of Korthikanti et al.; the last stage
      adds the logits' fp32 softmax (4 x vocabulary / T bytes per token);
    - megatron-core's workspace, the CUDA context, allocator fragmentation and communication buffers are not
      counted (typically a few GB per GPU: leave headroom).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megatron_moe.config import RunConfig
from megatron_moe.planner.ledger import padded_vocab_size

PARAM_BYTES = {
    "fp32": {"weights": 4, "main_weights": 0, "grads": 4, "adam": 8},
    "bf16": {"weights": 2, "main_weights": 4, "grads": 4, "adam": 8},
}
"""Per parameter, by training precision (fp8 trains bf16 weights): the model's weights; the fp32 main weights the
optimizer updates when those are bf16; the gradient buffer (megatron-core reduces gradients in fp32); Adam's two
fp32 moments."""

TRAINING_STATE = ("weights", "main_weights", "grads", "adam")
"""What training holds per parameter, before activations and sharding."""
CHECKPOINT_STATE = ("weights", "main_weights", "adam")
"""What a checkpoint holds per parameter (gradients are not saved)."""
OPTIMIZER_STATE = ("main_weights", "adam")
"""What the optimizer holds per parameter (the part the distributed optimizer splits)."""


def _table(precision: str) -> dict[str, int]:
    return PARAM_BYTES["fp32" if precision == "fp32" else "bf16"]


def state_bytes(params: int, precision: str, parts: tuple[str, ...] = TRAINING_STATE) -> int:
    """Bytes of `parts` of the state for `params` parameters trained in `precision` (fp32, bf16 or fp8)."""
    table = _table(precision)
    return params * sum(table[p] for p in parts)


PARTS = ("weights", "grads", "optimizer", "activations")


@dataclass(frozen=True)
class StageMemory:
    """What one GPU of a pipeline stage holds, in bytes."""

    stage: int
    params: int
    """Parameters on one GPU of the stage (its local experts only)."""
    expert_params: int
    """Of which routed-expert parameters."""
    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def parts(self) -> dict[str, int]:
        return {**{p: getattr(self, p) for p in PARTS}, "total": self.total}


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory per GPU of a run config on `world_size` GPUs, stage by stage; `per_gpu` is the fullest stage."""

    world_size: int
    data_parallel: int
    expert_data_parallel: int
    precision: str
    recompute: str
    micro_batches_in_flight: float
    """On the first stage, in micro-batches of all its layers (a fraction with virtual stages)."""
    stages: tuple[StageMemory, ...]

    @property
    def per_gpu(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_gpu_bytes": self.per_gpu.parts(),
            "stage": self.per_gpu.stage,
            "world_size": self.world_size,
            "data_parallel": self.data_parallel,
            "expert_data_parallel": self.expert_data_parallel,
            "precision": self.precision,
            "recompute": self.recompute,
            "stages": [{**dataclasses.asdict(s), "total": s.total} for s in self.stages],
        }


def minimum_world_size(cfg: RunConfig) -> int:
    """The fewest GPUs the layout runs on: tensor x pipeline x the data-parallel ranks expert parallelism needs."""
    p = cfg.parallel
    dp = 1
    while (dp * p.tensor) % p.expert:
        dp += 1
    return p.tensor * p.pipeline * dp


def stage_layers(cfg: RunConfig, stage: int) -> list[int]:
    """The layers (0-based) one GPU of pipeline stage `stage` holds, chunk by chunk."""
    p = cfg.parallel
    c = p.chunk_layers(cfg.model.num_layers)
    return [(v * p.pipeline + stage) * c + i for v in range(p.virtual_pipeline) for i in range(c)]


def chunks_in_flight(cfg: RunConfig, stage: int, micro_batches: int) -> int:
    """Chunk micro-batches (one micro-batch through one chunk of the stage's layers) whose activations stage `stage`
    holds at the peak of the schedule: 1F1B's warm-up plus the one in its steady state."""
    p = cfg.parallel
    if p.virtual_pipeline == 1:
        return max(1, min(p.pipeline, micro_batches) - stage)
    warmup = 2 * (p.pipeline - stage - 1) + (p.virtual_pipeline - 1) * p.pipeline
    return min(micro_batches * p.virtual_pipeline, warmup + 1)


def _stage_params(cfg: RunConfig, stage: int) -> tuple[int, int]:
    """(parameters, of which routed-expert parameters) on one GPU of pipeline stage `stage`."""
    m, p = cfg.model, cfg.parallel
    t, d = p.tensor, m.hidden_size
    head_dim = d // m.num_attention_heads
    mats = 3 if m.activation == "swiglu" else 2
    norm = (2 if m.normalization == "LayerNorm" else 1) * d
    vocab = padded_vocab_size(m, t)
    params = experts = 0
    for layer in stage_layers(cfg, stage):
        params += d * (m.num_attention_heads + 2 * m.kv_heads) * head_dim // t + m.num_attention_heads * head_dim * d // t
        params += 2 * norm
        if m.moe.is_moe_layer(layer):
            params += m.moe.num_experts * d + mats * d * m.moe.shared_expert_ffn_hidden_size // t
            experts += m.moe.num_experts // p.expert * mats * d * m.expert_ffn
        else:
            params += mats * d * m.ffn_hidden_size // t
    if stage == 0:
        params += vocab * d // t + (m.seq_length * d if m.position_embedding == "learned_absolute" else 0)
    if stage == p.pipeline - 1:
        params += norm
        if not m.tie_embeddings or p.pipeline > 1:
            params += vocab * d // t
    return params + experts, experts


def _activation_bytes_per_token(cfg: RunConfig, layer: int, precision_bytes: int) -> float:
    """Bytes one token of a micro-batch leaves saved for the backward pass in `layer` (no recomputation)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp = p.tensor
    split = tp if p.sequence_parallel else 1  # the norms' tensors: whole on each tensor rank without SP
    selective = t.recompute_modules if t.recompute_granularity == "selective" else []
    d = m.hidden_size
    head_dim = d // m.num_attention_heads
    gated = m.activation == "swiglu"
    norm_io = 0 if "layernorm" in selective else 2 * d  # the norm's input and output
    total = (norm_io * precision_bytes) / split
    if "core_attn" not in selective:
        total += 4 * m.num_attention_heads / tp  # softmax statistics, fp32
    total += ((m.num_attention_heads + 2 * m.kv_heads) * head_dim + d) * precision_bytes / tp  # Q, K, V, output
    total += norm_io * precision_bytes / split  # the pre-FFN norm
    if not m.moe.is_moe_layer(layer):
        if "mlp" not in selective:
            total += (3 if gated else 2) * m.ffn_hidden_size * precision_bytes / tp
        return total
    e = m.moe
    if "moe" in selective:
        return total
    total += 2 * 4 * e.num_experts / split  # router logits and probabilities
    per_copy = 2 * d + ((2 if "moe_act" in selective else 3) if gated else 2) * m.expert_ffn
    total += e.top_k * per_copy * precision_bytes / split  # tokens are spread over expert ranks as over tensor ranks
    if e.shared_expert_ffn_hidden_size and "shared_experts" not in selective:
        total += (3 if gated else 2) * e.shared_expert_ffn_hidden_size * precision_bytes / tp
    return total


def _stage_activations(cfg: RunConfig, stage: int, in_flight: int, precision_bytes: int) -> int:
    """Activation bytes of stage `stage` holding `in_flight` chunk micro-batches (`chunks_in_flight`)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tokens = t.micro_batch_size * m.seq_length
    chunk = p.chunk_layers(m.num_layers)
    split = p.tensor if p.sequence_parallel else 1
    per_layer = [_activation_bytes_per_token(cfg, i, precision_bytes) for i in stage_layers(cfg, stage)]
    if t.recompute_granularity == "full":
        units = -(-chunk // t.recompute_num_layers)  # per chunk
        kept = units * m.hidden_size * precision_bytes / split  # each unit's input
        # the backward pass recomputes one unit at a time: its layers' activations, for one micro-batch
        starts = [v * chunk + i for v in range(p.virtual_pipeline) for i in range(0, chunk, t.recompute_num_layers)]
        recomputed = max(sum(per_layer[i:min(i + t.recompute_num_layers, i - i % chunk + chunk)]) for i in starts)
        held = in_flight * kept * tokens + recomputed * tokens
    else:  # a chunk micro-batch holds 1/V of the stage's layers (their average, when chunks mix dense and MoE)
        held = in_flight * sum(per_layer) / p.virtual_pipeline * tokens
    if stage == p.pipeline - 1:
        held += 4 * padded_vocab_size(m, p.tensor) / p.tensor * tokens  # fp32 softmax of the logits
    return int(held)


def estimate_memory(cfg: RunConfig, world_size: int | None = None, *, precision: str | None = None) -> MemoryEstimate:
    """Memory per GPU of run config `cfg` on `world_size` GPUs (default: the fewest its layout allows), trained in
    `precision` (default: the config's, "auto" counting as bf16, what it means on a GPU)."""
    p, t = cfg.parallel, cfg.train
    world = world_size or minimum_world_size(cfg)
    precision = precision or t.resolved_precision(on_gpu=True)
    table = _table(precision)
    dp = world // (p.tensor * p.pipeline)
    edp = world // (p.expert * p.pipeline)
    micro = t.micro_batches(dp)
    stages = []
    for stage in range(p.pipeline):
        params, experts = _stage_params(cfg, stage)
        optimizer = sum(table[x] for x in OPTIMIZER_STATE)
        if t.distributed_optimizer:
            opt = -(-(params - experts) * optimizer // dp) + -(-experts * optimizer // edp)
        else:
            opt = params * optimizer
        stages.append(StageMemory(
            stage=stage, params=params, expert_params=experts, weights=params * table["weights"],
            grads=params * table["grads"], optimizer=opt,
            activations=_stage_activations(cfg, stage, chunks_in_flight(cfg, stage, micro), table["weights"])))
    first = chunks_in_flight(cfg, 0, micro) / p.virtual_pipeline
    return MemoryEstimate(world, dp, edp, precision, t.recompute_granularity or "none", first, tuple(stages))
