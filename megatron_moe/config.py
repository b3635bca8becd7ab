"""Typed run configuration: dataclasses loaded from TOML with strict keys.

Every concern is one dataclass; a run is a `RunConfig`. Loading is strict: an unknown key, a wrong type
or an out-of-range value raises `ConfigError` naming the dotted path of the field and what is allowed.
Configs are pure data; translation to megatron-core objects happens in `megatron_moe.model`. The module holds
the whole schema (every field with its meaning, unit and role) and its checks; the strict loading and writing are
`megatron_moe.schema`'s.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_moe.schema import ConfigError, apply_overrides, from_dict, load_toml  # ConfigError: re-exported


ROLES = {
    "trains": "what is trained (model, data, optimizer, schedule): in the run hash, fixed on resume",
    "measures": "what an evaluation measures: in the run hash, fixed on resume",
    "schedule": "when evaluations happen: in the run hash, may change on resume",
    "layout": "how the work is done (split over processes, activations recomputed): the losses do not change; in the "
              "run hash, may change on resume",
    "bookkeeping": "where and how often a run writes, its metric sinks and start-up flags: outside the run hash, "
                   "may change on resume",
}
"""What a config field is for. Each field has one, `trains` unless it says otherwise (`_role`); the run hash, the
resume check derive their sets from it."""
HASHED_ROLES = frozenset(ROLES) - {"bookkeeping"}
RESUMABLE_ROLES = frozenset({"schedule", "layout", "bookkeeping"})


def _role(role: str, default: Any, *, added: bool = False) -> Any:
    """A field whose role is not `trains` (`added`: see `_added`)."""
    assert role in ROLES, role
    meta = {"role": role, "added": added}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _added(default: Any, role: str = "trains") -> Any:
    """A field added after run hashes were first recorded: left out of the hash while it holds its default, so the
    runs of a study made before it keep their directories (`RunConfig.hashed`)."""
    return _role(role, default, added=True)


@dataclass
class MoEConfig:
    """Mixture-of-Experts block. `num_experts = 0` means a dense model."""

    num_experts: int = 0
    """Routed experts per MoE layer (0 = dense model)."""
    top_k: int = 2
    """Routed experts each token is sent to."""
    expert_ffn_hidden_size: int = 0
    """Hidden size of each routed expert's FFN (0 = model.ffn_hidden_size)."""
    shared_expert_ffn_hidden_size: int = 0
    """Hidden size of the always-active shared expert (0 = none)."""
    first_k_dense: int = 0
    """The first k layers keep a dense FFN."""
    every_n: int = 1
    """After the first_k_dense layers, every n-th layer is MoE (1 = all of them)."""
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function."""
    topk_renormalize: bool = True
    """True: softmax over the selected top-k logits (weights sum to 1); False: softmax over all experts,
    then keep the top-k probabilities as they are (Switch/GShard style). Sigmoid scores with top_k > 1 are
    always renormalised (megatron-core), so False is refused there."""
    aux_loss_coeff: float = 0.01
    """Load-balancing loss coefficient (0 = off)."""
    aux_loss: Literal["micro_batch", "sequence", "global_batch"] = "micro_batch"
    """What the load-balancing loss balances: each micro-batch (Switch/GShard), each sequence (DeepSeek-V2/V3),
    or the whole global batch (expert counts summed over data-parallel ranks and accumulated over the step's
    micro-batches, as megatron-core does)."""
    expert_bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the routing scores for the top-k choice
    only, moves by this much after every step toward the less loaded experts (0 = off; DeepSeek-V3 uses 1e-3).
    megatron-core offers it with score_function = "sigmoid" only; it combines with any aux_loss."""
    z_loss_coeff: float = 0.001
    """Router z-loss coefficient (0 = off)."""
    capacity_factor: float = 0.0
    """Expert capacity factor; 0 = dropless (no token is dropped)."""
    token_dispatcher: Literal["allgather", "alltoall"] = "alltoall"
    """megatron-core token dispatcher."""
    grouped_gemm: bool = False
    """Use grouped GEMM for the experts (GPU)."""

    def is_moe_layer(self, layer: int) -> bool:
        """Whether 0-based `layer` holds an MoE block."""
        if self.num_experts == 0 or layer < self.first_k_dense:
            return False
        return (layer - self.first_k_dense) % self.every_n == 0


@dataclass
class ModelConfig:
    """A LLaMA-style GPT (RMSNorm, SwiGLU, RoPE by default)."""

    vocab_size: int = 4096
    """Vocabulary size (padded to a multiple of 128 x tensor parallel when built); 0 = the data's tokenizer's,
    read from the prepared dataset (or the built-in corpus's) when the config is loaded."""
    seq_length: int = 256
    """Training sequence length in tokens."""
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 128
    """Model width d_model."""
    num_attention_heads: int = 4
    """Attention heads."""
    num_query_groups: int = 0
    """Key/value heads for grouped-query attention (0 = num_attention_heads, i.e. MHA)."""
    ffn_hidden_size: int = 344
    """Hidden size of the dense FFN."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """FFN activation; swiglu is gated (three weight matrices)."""
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    """Position encoding."""
    rotary_base: int = 10000
    """RoPE base."""
    tie_embeddings: bool = False
    """Share input embedding and output layer weights."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norm layers."""
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0

    @property
    def expert_ffn(self) -> int:
        return self.moe.expert_ffn_hidden_size or self.ffn_hidden_size

    def moe_layer_pattern(self) -> list[int]:
        return [int(self.moe.is_moe_layer(i)) for i in range(self.num_layers)]


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel size = world size / (tensor x pipeline)."""

    tensor: int = _role("layout", 1)
    """Tensor-parallel size."""
    pipeline: int = _role("layout", 1)
    """Pipeline-parallel size."""
    expert: int = _role("layout", 1)
    """Expert-parallel size (must divide num_experts and the data x tensor ranks)."""
    sequence_parallel: bool = _role("layout", False)
    """Sequence parallelism (needs tensor > 1)."""
    context: int = _added(1, "layout")
    """Context-parallel size (Megatron-LM's --context-parallel-size): 1 only, see `validate`."""
    virtual_pipeline: int = _added(1, "layout")
    """Model chunks per pipeline rank, run by megatron-core's interleaved 1F1B schedule (Megatron-LM's
    --num-virtual-stages-per-pipeline-rank): a smaller pipeline bubble for more communication. > 1 needs
    parallel.pipeline > 1, model.num_layers divisible by pipeline x virtual_pipeline and at least `pipeline`
    micro-batches per step."""

    def chunk_layers(self, num_layers: int) -> int:
        """Layers in one model chunk: a pipeline stage's layers, split over its virtual stages (validate checks
        divisibility)."""
        return num_layers // (self.pipeline * self.virtual_pipeline)

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas in a world of `world_size` processes (validate checks divisibility)."""
        return world_size // (self.tensor * self.pipeline)


@dataclass
class DataConfig:
    """Where tokens come from, and the data-reuse schedule (see `megatron_moe.data`)."""

    path: str = ""
    """Prepared dataset directory (`megatron-moe data prepare`); empty = the built-in corpus `data.corpus`."""
    corpus: Literal["synthetic", "tinystories"] = "synthetic"
    """Built-in corpus used when data.path is empty: real TinyStories text, or templated synthetic stories."""
    corpus_vocab_size: int = 0
    """Byte-level BPE vocabulary (tokens) trained for the built-in corpus (0 = 512 synthetic, 4096 tinystories)."""
    seed: int = 1234
    """Data order seed (budget selection and per-epoch shuffles). In a study, the same for every arm of one seed and
    offset by that seed (data.seed + seed) unless study.data_order = "shared"."""
    synthetic_documents: int = 2000
    """Documents generated for the built-in synthetic corpus (train + validation)."""
    unique_tokens: int = 0
    """Unique-token budget in tokens: whole training documents in a seeded order up to this many (0 = all)."""
    epochs: float = 0.0
    """Passes over the unique tokens, fractional allowed (0 = repeat as long as training asks)."""
    consumed_tokens: int = 0
    """Alternative to epochs: total training tokens the schedule provides (0 = unset)."""
    start_batch: int = _added(0)
    """The first global batch of the data stream this run trains on (0 = the start): a run upcycled from a dense run's
    checkpoint at step k continues that run's stream at batch k."""
    blend: list[str] = _added([])
    """Prepared dataset directories blended into one stream, in place of data.path (Megatron-LM's `--data-path W1 P1
    W2 P2`): each has its own schedule (data.unique_tokens and data.consumed_tokens split by weight, data.epochs
    for each), their samples interleaved in the proportions of data.blend_weights; all share one tokenizer."""
    blend_weights: list[float] = _added([])
    """Relative weights of data.blend's datasets in the training and validation streams (empty = equal)."""

    def datasets(self) -> list[str]:
        """The prepared dataset directories this config reads (none for the built-in corpus)."""
        return list(self.blend) if self.blend else [self.path] if self.path else []

    def validate(self) -> None:
        """Check ranges; raises ConfigError naming the dotted field."""
        for name in ("unique_tokens", "epochs", "consumed_tokens", "start_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name} = {getattr(self, name)} must be >= 0")
        if self.epochs > 0 and self.consumed_tokens > 0:
            raise ConfigError(
                f"data.epochs = {self.epochs} and data.consumed_tokens = {self.consumed_tokens} are both set; set one"
            )
        if self.synthetic_documents < 21:  # 20 stories hold no validation document (data.corpora.synthetic_dataset)
            raise ConfigError(f"data.synthetic_documents = {self.synthetic_documents} must be >= 21")
        if self.corpus_vocab_size and not 260 <= self.corpus_vocab_size <= 65000:
            raise ConfigError(f"data.corpus_vocab_size = {self.corpus_vocab_size} must be 0 or in [260, 65000]")
        if self.blend and self.path:
            raise ConfigError(f"data.blend and data.path = {self.path!r} are both set; give the dataset in data.blend "
                              "or leave data.blend empty")
        if len(self.blend) == 1:
            raise ConfigError(f"data.blend = {self.blend} names one dataset; give data.path for one, data.blend for two "
                              "or more")
        if self.blend_weights and len(self.blend_weights) != len(self.blend):
            raise ConfigError(f"data.blend_weights = {self.blend_weights} has {len(self.blend_weights)} weights for "
                              f"{len(self.blend)} datasets in data.blend; give one per dataset, or none for equal")
        if any(not w > 0 for w in self.blend_weights):
            raise ConfigError(f"data.blend_weights = {self.blend_weights}: every weight must be > 0")


@dataclass
class TrainConfig:
    """Optimisation and run length."""

    train_steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step (all ranks, all micro-batches)."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Final learning rate of the decay."""
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    lr_warmup_steps: int = 20
    """Linear warm-up steps."""
    wsd_decay_fraction: float = 0.2
    """Fraction of steps spent decaying in the warm-up-stable-decay schedule."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.95
    """AdamW's second-moment decay."""
    adam_eps: float = 1e-8
    """AdamW's epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    seed: int = 42
    """Model-init seed."""
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    """auto = fp32 on CPU, bf16 on GPU; fp8 needs Transformer Engine on Hopper."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks."""
    overlap_grad_reduce: bool = _added(False, "layout")
    """Reduce each gradient bucket while the backward pass goes on (Megatron-LM's --overlap-grad-reduce)."""
    overlap_param_gather: bool = _added(False, "layout")
    """With the distributed optimizer: gather the updated parameters bucket by bucket during the next forward pass
    (Megatron-LM's --overlap-param-gather)."""
    init_from: str = _added("")
    """Upcycle: start this MoE from the newest checkpoint of this dense run directory, or from one of its checkpoints
    (RUN/checkpoints/step_NNNNNNN) (same trunk; every expert a
    copy of the dense FFN, or a slice of it when the expert width divides the dense width; the router fresh). Empty =
    start from random weights."""
    recompute_granularity: Literal["", "selective", "full"] = _added("", "layout")
    """Activation recomputation (Megatron-LM's --recompute-granularity): "" = none; "full" recomputes whole
    transformer layers in the backward pass, keeping only each layer's input; "selective" recomputes the
    recompute_modules only."""
    recompute_modules: list[str] = _added(["core_attn"], "layout")
    """What "selective" recomputes (Megatron-LM's --recompute-modules): any of core_attn, layernorm, mlp, moe,
    shared_experts, moe_act (moe_act needs grouped GEMM)."""
    recompute_num_layers: int = _added(1, "layout")
    """With "full": layers per recomputed unit (Megatron-LM's --recompute-num-layers, --recompute-method uniform)."""
    log_interval: int = _role("bookkeeping", 10)
    """Steps between progress lines."""
    eval_interval: int = _role("schedule", 0)
    """Steps between validation passes (0 = only at the end)."""
    eval_iters: int = _role("measures", 0)
    """Validation batches (of train.global_batch_size sequences) per pass; 0 = every complete batch of the
    validation split, the same tokens for every arm."""
    save_interval: int = _role("bookkeeping", 0)
    """Steps between checkpoints (0 = none)."""
    keep_checkpoints_at: list[int] = _role("bookkeeping", [])
    """Steps at which a checkpoint is also saved and never deleted (a study's upcycled arm starts from one)."""
    output_dir: str = _role("bookkeeping", "runs/default")
    """Run directory: metrics.jsonl, result.json, checkpoints. One `train` at a time (it holds a lock on it)."""
    allow_config_change: bool = _role("bookkeeping", False)
    """Resume a run whose config differs from the one it was started with in a field that changes the trained
    model or its schedule (refused otherwise, naming the fields; output_dir, the intervals, metric sinks and the
    parallel layout may always change). The new values apply from the resumed step, and the change is appended
    to config_changes.jsonl in the run directory."""
    overwrite_output_dir: bool = _role("bookkeeping", False)
    """Start over in an output_dir holding another run's metrics.jsonl (a different config.toml) and no
    checkpoint, replacing its files (refused otherwise)."""
    tensorboard_dir: str = _role("bookkeeping", "")
    """TensorBoard event directory that also gets the metrics rows (empty = off; needs the tensorboard extra)."""
    wandb_project: str = _role("bookkeeping", "")
    """Weights & Biases project that also gets the metrics rows (empty = off; needs the wandb extra)."""
    wandb_entity: str = _role("bookkeeping", "")
    """W&B team or user owning the project (empty = your default entity)."""
    wandb_run_name: str = _role("bookkeeping", "")
    """W&B run name (empty = one W&B makes up; `study run` sets <study>/<arm>-s<seed>)."""

    @property
    def min_train_steps(self) -> int:
        """The fewest steps a run may take: one more than its warm-up (the warm-up rule; every check reads it here)."""
        return self.lr_warmup_steps + 1

    def resolved_precision(self, on_gpu: bool) -> str:
        """precision with "auto" decided (`resolved_precision`)."""
        return resolved_precision(self.precision, on_gpu)

    def micro_batches(self, data_parallel: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch_size // (self.micro_batch_size * data_parallel)


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts", "moe_act")
"""What train.recompute_granularity = "selective" may recompute (megatron-core's names; MLA's is not offered)."""


def resolved_precision(precision: str, on_gpu: bool) -> str:
    """A train.precision with "auto" decided: bf16 on GPU, fp32 on CPU."""
    return ("bf16" if on_gpu else "fp32") if precision == "auto" else precision


@dataclass
class RunConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def without(self, roles: frozenset[str] | set[str]) -> dict[str, Any]:
        """`to_dict()` less the fields whose role is in `roles`."""
        d = self.to_dict()
        for name, role in field_roles().items():
            if role in roles:
                del _parent(d, name)[name.rpartition(".")[2]]
        return d

    def hashed(self) -> dict[str, Any]:
        """What a run hash covers: `to_dict()` less the bookkeeping fields and the fields added later that hold their
        defaults (`_added`)."""
        d = self.without({"bookkeeping"})
        for name, default in added_defaults().items():
            node, last = _parent(d, name), name.rpartition(".")[2]
            if node.get(last) == default:
                del node[last]
        return d

    def with_model(self, model: ModelConfig) -> RunConfig:
        """This run with another model; a dense model gets parallel.expert = 1 (it has no experts)."""
        parallel = self.parallel if model.is_moe else dataclasses.replace(self.parallel, expert=1)
        return dataclasses.replace(self, model=model, parallel=parallel)


# ---------------------------------------------------------------- loading


def _parent(d: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The dict of nested dict `d` that holds the last key of `dotted`."""
    for key in dotted.split(".")[:-1]:
        d = d[key]
    return d


def _leaf_fields(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every field of dataclass `cls` that is not itself a config, by dotted name; nested configs recurse."""
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_leaf_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def field_roles(cls: type = None) -> dict[str, str]:
    """Every field of `cls` (default RunConfig), by dotted name, with its role (see ROLES)."""
    return {name: f.metadata.get("role", "trains") for name, f in _leaf_fields(cls or RunConfig).items()}


def added_defaults(cls: type = None) -> dict[str, Any]:
    """The fields marked `_added`, by dotted name, with their defaults."""
    return {name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for name, f in _leaf_fields(cls or RunConfig).items() if f.metadata.get("added")}


def load_run_config(path: str | Path | None, overrides: list[str] = (), world_size: int | None = None) -> RunConfig:
    """Load, override and validate a run config (path None = all defaults)."""
    data = load_toml(path) if path else {}
    cfg = from_dict(RunConfig, apply_overrides(data, list(overrides)))
    validate(cfg, world_size)
    return cfg


# ---------------------------------------------------------------- validation


def _positive(value: int | float, path: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{path} = {value} must be {'>= 0' if allow_zero else '> 0'}")


def validate_model(m: ModelConfig, tensor: int = 1, expert: int = 1, pipeline: int = 1) -> None:
    _positive(m.vocab_size, "model.vocab_size", allow_zero=True)  # 0: from the data (data.source.with_data_vocabulary)
    for name in ("seq_length", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        _positive(getattr(m, name), f"model.{name}")
    _positive(m.num_query_groups, "model.num_query_groups", allow_zero=True)
    for name in ("init_method_std", "norm_epsilon"):
        _positive(getattr(m, name), f"model.{name}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size = {m.hidden_size} is not divisible by model.num_attention_heads = "
            f"{m.num_attention_heads}"
        )
    if m.position_embedding == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(
            f"model.hidden_size / model.num_attention_heads = {m.hidden_size // m.num_attention_heads} is odd; "
            "rotary position embeddings need an even head dimension"
        )
    if m.num_attention_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_attention_heads = {m.num_attention_heads} is not divisible by "
            f"model.num_query_groups = {m.kv_heads}"
        )
    if m.num_attention_heads % tensor:
        raise ConfigError(
            f"model.num_attention_heads = {m.num_attention_heads} is not divisible by parallel.tensor = {tensor}"
        )
    if m.kv_heads % tensor:
        raise ConfigError(f"model.num_query_groups = {m.kv_heads} is not divisible by parallel.tensor = {tensor}")
    if m.ffn_hidden_size % tensor:
        raise ConfigError(f"model.ffn_hidden_size = {m.ffn_hidden_size} is not divisible by parallel.tensor = {tensor}")
    if m.num_layers % pipeline:
        raise ConfigError(f"model.num_layers = {m.num_layers} is not divisible by parallel.pipeline = {pipeline}")
    e = m.moe
    for name in ("num_experts", "expert_ffn_hidden_size", "shared_expert_ffn_hidden_size", "first_k_dense"):
        _positive(getattr(e, name), f"model.moe.{name}", allow_zero=True)
    for name in ("aux_loss_coeff", "z_loss_coeff", "capacity_factor", "expert_bias_update_rate"):
        _positive(getattr(e, name), f"model.moe.{name}", allow_zero=True)
    if e.num_experts == 0:
        if expert != 1:
            raise ConfigError(f"parallel.expert = {expert} needs an MoE model (model.moe.num_experts > 0)")
        return
    _positive(e.top_k, "model.moe.top_k")
    _positive(e.every_n, "model.moe.every_n")
    if e.top_k > e.num_experts:
        raise ConfigError(f"model.moe.top_k = {e.top_k} exceeds model.moe.num_experts = {e.num_experts}")
    if e.top_k == 1 and e.topk_renormalize and e.score_function == "softmax":
        raise ConfigError(
            "model.moe.topk_renormalize = true with model.moe.top_k = 1 gives every token weight 1 and the router "
            "no gradient; set model.moe.topk_renormalize = false"
        )
    if e.score_function == "sigmoid" and not e.topk_renormalize and e.top_k > 1:
        raise ConfigError(
            "model.moe.topk_renormalize = false has no effect with model.moe.score_function = 'sigmoid' (megatron-core "
            "renormalises sigmoid top-k weights); set model.moe.topk_renormalize = true"
        )
    if e.expert_bias_update_rate and e.score_function != "sigmoid":
        raise ConfigError(
            f"model.moe.expert_bias_update_rate = {e.expert_bias_update_rate:g} (aux-loss-free balancing) needs "
            f"model.moe.score_function = 'sigmoid', not {e.score_function!r} (megatron-core's expert bias is "
            "sigmoid-only)"
        )
    if e.aux_loss != "micro_batch" and not e.aux_loss_coeff:
        raise ConfigError(f"model.moe.aux_loss = {e.aux_loss!r} has no effect with model.moe.aux_loss_coeff = 0; set "
                          "a coefficient (e.g. 0.01) or leave aux_loss at 'micro_batch'")
    if e.num_experts % expert:
        raise ConfigError(f"model.moe.num_experts = {e.num_experts} is not divisible by parallel.expert = {expert}")
    if e.first_k_dense >= m.num_layers:
        raise ConfigError(
            f"model.moe.first_k_dense = {e.first_k_dense} leaves no MoE layer in model.num_layers = {m.num_layers}"
        )
    if m.expert_ffn % tensor:
        raise ConfigError(f"model.moe.expert_ffn_hidden_size = {m.expert_ffn} is not divisible by parallel.tensor = {tensor}")
    if e.shared_expert_ffn_hidden_size % tensor:
        raise ConfigError(
            f"model.moe.shared_expert_ffn_hidden_size = {e.shared_expert_ffn_hidden_size} is not divisible by "
            f"parallel.tensor = {tensor}"
        )


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Check a run config; with `world_size`, also the parallel arithmetic."""
    p, t = cfg.parallel, cfg.train
    for name in ("tensor", "pipeline", "expert"):
        _positive(getattr(p, name), f"parallel.{name}")
    validate_model(cfg.model, p.tensor, p.expert, p.pipeline)
    cfg.data.validate()
    if p.context != 1:
        raise ConfigError(f"parallel.context = {p.context}: context parallelism is not offered (it needs Transformer "
                          "Engine's attention and every sequence split over ranks on the data path, which megatron-moe "
                          "does not do); for long sequences use parallel.tensor with parallel.sequence_parallel and "
                          "train.recompute_granularity")
    _positive(p.virtual_pipeline, "parallel.virtual_pipeline")
    if p.virtual_pipeline > 1 and p.pipeline == 1:
        raise ConfigError(f"parallel.virtual_pipeline = {p.virtual_pipeline} needs parallel.pipeline > 1 (it splits "
                          "each pipeline rank's layers into chunks)")
    if cfg.model.num_layers % (p.pipeline * p.virtual_pipeline):
        raise ConfigError(f"model.num_layers = {cfg.model.num_layers} is not divisible by parallel.pipeline x "
                          f"parallel.virtual_pipeline = {p.pipeline} x {p.virtual_pipeline}")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel = true needs parallel.tensor > 1")
    if cfg.model.is_moe and p.tensor > 1 and not p.sequence_parallel:
        raise ConfigError(
            f"parallel.tensor = {p.tensor} with an MoE model needs parallel.sequence_parallel = true "
            "(megatron-core requires it for MoE layers)"
        )
    if p.sequence_parallel and cfg.model.seq_length % p.tensor:
        raise ConfigError(
            f"model.seq_length = {cfg.model.seq_length} is not divisible by parallel.tensor = {p.tensor} "
            "(needed by sequence parallelism)"
        )
    _positive(t.eval_iters, "train.eval_iters", allow_zero=True)
    for name in ("train_steps", "micro_batch_size", "global_batch_size"):
        _positive(getattr(t, name), f"train.{name}")
    for name in ("lr_warmup_steps", "log_interval", "eval_interval", "save_interval", "min_lr", "weight_decay", "clip_grad"):
        _positive(getattr(t, name), f"train.{name}", allow_zero=True)
    _positive(t.lr, "train.lr")
    _positive(t.adam_eps, "train.adam_eps")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"train.{name} = {getattr(t, name)} must be in [0, 1)")
    if t.train_steps < t.min_train_steps:
        raise ConfigError(
            f"train.lr_warmup_steps = {t.lr_warmup_steps} must be below train.train_steps = {t.train_steps}"
        )
    if t.overlap_param_gather and not t.distributed_optimizer:
        raise ConfigError("train.overlap_param_gather = true needs train.distributed_optimizer = true (it overlaps the "
                          "distributed optimizer's parameter all-gather)")
    if t.recompute_granularity == "selective":
        bad = [x for x in t.recompute_modules if x not in RECOMPUTE_MODULES]
        if bad or not t.recompute_modules:
            raise ConfigError(f"train.recompute_modules = {t.recompute_modules} must name some of "
                              f"{', '.join(RECOMPUTE_MODULES)}")
        if "moe_act" in t.recompute_modules and not cfg.model.moe.grouped_gemm:
            raise ConfigError("train.recompute_modules 'moe_act' needs model.moe.grouped_gemm = true (megatron-core "
                              "recomputes the expert activation of grouped GEMM only)")
    chunk_layers = p.chunk_layers(cfg.model.num_layers)
    if t.recompute_granularity == "full" and not 1 <= t.recompute_num_layers <= chunk_layers:
        unit = "pipeline stage" if p.virtual_pipeline == 1 else "model chunk"
        raise ConfigError(f"train.recompute_num_layers = {t.recompute_num_layers} must be in [1, {chunk_layers}] (the "
                          f"layers of one {unit})")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr = {t.min_lr} exceeds train.lr = {t.lr}")
    if not 0 <= t.wsd_decay_fraction <= 1:
        raise ConfigError(f"train.wsd_decay_fraction = {t.wsd_decay_fraction} must be in [0, 1]")
    if world_size is None:
        return
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
            f"{p.tensor} x {p.pipeline} = {model_parallel}"
        )
    dp = p.data_parallel_size(world_size)
    if (dp * p.tensor) % p.expert:
        raise ConfigError(
            f"parallel.expert = {p.expert} does not divide data x tensor = {dp} x {p.tensor} = {dp * p.tensor} "
            f"(world size {world_size})"
        )
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size} is not divisible by train.micro_batch_size x data "
            f"parallel = {t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}"
        )
    if p.virtual_pipeline > 1 and t.micro_batches(dp) < p.pipeline:
        raise ConfigError(
            f"parallel.virtual_pipeline = {p.virtual_pipeline} needs at least parallel.pipeline = {p.pipeline} "
            f"micro-batches per step; train.global_batch_size / (micro_batch_size x data parallel) = "
            f"{t.global_batch_size} / ({t.micro_batch_size} x {dp}) = {t.micro_batches(dp)}")
