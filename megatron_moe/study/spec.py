"""The study file: a run config for the base MoE model plus a [study] table, loaded and checked.

The run config ([model], [model.moe], [parallel], [data], [train]: optimizer, LR schedule, evaluation and
data-reuse schedule) is shared by every arm; [study] says what is compared::

    [study]
    name = "tiny_three_arm"
    arms = ["dense_active", "moe", "dense_total"]  # moe | dense_active | dense_total | dense_flops
                                                  # | equal_resources (the activation-rate family)
    seeds = [1, 2, 3]        # run seeds: train.seed = seed; data.seed = the study's data.seed + seed
    data_order = "per_seed"  # "shared": every run keeps the study's data.seed (one data order for all seeds)
    budget_tokens = 0        # training tokens per run (0 = train.train_steps steps for every arm)
    budget_flops = 0.0       # or training FLOPs per run: each arm trains floor(C / (FLOPs/token x tokens/step))
    [study.match]            # how dense arms are matched (planner.match_dense)
    [study.equal_resources]  # the family (planner.equal_resources_family)

Seeds: the run of (arm, seed) trains with train.seed = seed (model init) and, by default (data_order =
"per_seed"), data.seed = <the study's data.seed> + seed (which documents a token budget selects and their
order). All arms of one seed then see one data stream, so each seed's gaps stay paired, while the spread over
seeds measures data-order noise as well as init noise. data_order = "shared" gives every run the study's
data.seed: the spread over seeds is init noise only.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_moe.config import ConfigError, MoEConfig, RunConfig, validate
from megatron_moe.data.source import with_data_vocabulary
from megatron_moe.schema import apply_overrides, from_dict, load_toml
from megatron_moe.planner.family import DEFAULT_R_A_GRID, Granularity, Reuse
from megatron_moe.planner.match import CONTRACTS
from megatron_moe.text import parse_count

DataOrder = Literal["per_seed", "shared"]
DATA_ORDERS: tuple[str, ...] = typing.get_args(DataOrder)
DENSE_ARMS = {f"dense_{contract}": contract for contract in CONTRACTS}
"""The dense arms by name, each matched to the base MoE under its contract (`planner.match.CONTRACTS`)."""
MATCHED_ARMS = ("moe", *DENSE_ARMS)
UPCYCLED_ARM = "moe_upcycled"
"""The base MoE upcycled from the dense_active run of its seed partway through, for the rest of that run's tokens."""
ARM_CHOICES = (*MATCHED_ARMS, UPCYCLED_ARM, "equal_resources")
VARIANT_FIELDS = ("score_function", "topk_renormalize", "aux_loss", "aux_loss_coeff", "z_loss_coeff",
                  "expert_bias_update_rate")
"""[model.moe] fields a study variant may change: routing and balancing only, which change no parameter count,
so the dense arms matched to the base MoE are matched to every variant."""


@dataclass
class MatchSpec:
    """How the dense arms are matched to the base MoE (see `planner.match_dense`)."""

    resize: Literal["ffn", "ffn+hidden"] = "ffn"
    """Widths resized at fixed depth: ffn_hidden_size only, or hidden_size and ffn_hidden_size together."""
    count: Literal["non_embedding", "all"] = "non_embedding"
    """Parameters the active/total contracts compare."""
    multiple_of: int = 8
    """Resized widths are multiples of this."""
    flops: Literal["exact", "equal_resources"] = "exact"
    """FLOP convention of the flops contract and of study.budget_flops."""
    causal_attention: bool = False
    """Count (S + 1) / 2 keys per query in attention FLOPs instead of S."""
    tolerance_pct: float = 0.5
    """Largest residual (percent) accepted when the target is below the smallest legal width."""


@dataclass
class EqualResourcesSpec:
    """The equal-resources family (see `planner.equal_resources_family`): equal N, C and unique tokens D."""

    r_a: list[float] = field(default_factory=lambda: list(DEFAULT_R_A_GRID))
    """Target activation rates N_a / N of the MoE arms."""
    total_params: int = 0
    """N, non-embedding parameters (0 = the explicit dense baseline's when dense_ffn is set, else the base
    model's). A string such as "6.5B", or a whole float such as 6.5e9, is read as that count."""
    unique_tokens: int = 0
    """D, the dense baseline's training tokens (0 = tokens_per_param x N); a string such as "130B" is read as
    that count."""
    tokens_per_param: float = 20.0
    """D / N when unique_tokens is 0."""
    reuse: Reuse = "strict"
    """strict: every arm's unique tokens are D, MoE arms repeat them; fresh: each arm reads fresh tokens up to
    its budget (unique tokens = consumed tokens, one epoch)."""
    granularity: Granularity = "free"
    """free: K, E and D_e all chosen per arm, the widest reach in r_a, but the gate's scale at init (about K / E)
    then varies across arms with r_a; hold_top_k: K = the one top_k value for every arm, E and D_e chosen, so the
    gate's top-K structure is the same in every arm; hold_expert_size: D_e = expert_ffn_hidden_size for every arm,
    K and E chosen (at fixed N that fixes E + K, so r_a can only move with K: a narrow reach)."""
    expert_ffn_hidden_size: int = 0
    """D_e held by granularity = "hold_expert_size" (0 = the base model's expert size)."""
    top_k: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    """Top-k choices the planner may use (one value with granularity = "hold_top_k")."""
    max_experts: int = 256
    """Largest routed-expert count the planner may use."""
    dense_layers: int = 0
    """Depth of the dense baseline (0 = the base model's)."""
    dense_hidden: int = 0
    """Width of the dense baseline, at the base model's head dimension (0 = the base model's)."""
    dense_ffn: int = 0
    """FFN size of the dense baseline, used exactly (0 = resized to N). With all three dense_* at 0 the MoE
    backbone is widened (dense_resize)."""
    dense_resize: Literal["ffn", "ffn+hidden"] = "ffn+hidden"
    """How the dense baseline is resized to N when no dense_* shape is given."""
    multiple_of: int = 8
    """Expert and dense widths are multiples of this."""
    flops: Literal["exact", "equal_resources"] = "equal_resources"
    """FLOP convention of C: 6 N_a + 12 D_m S L (the study's) or the exact count."""
    r_a_rel_tolerance: float = 0.1
    """A target r_a further than this fraction from every reachable one is an error."""


COUNT_FIELDS = ("total_params", "unique_tokens")
"""[study.equal_resources] fields that may be written as "6.5B" or 6.5e9: read by `planner.format.parse_count`."""


@dataclass
class StudySpec:
    """What a study compares: arms, seeds, budget. Everything else comes from the base run config."""

    name: str = ""
    """Study name (default: the study file's stem)."""
    arms: list[str] = field(default_factory=lambda: ["dense_active", "moe", "dense_total"])
    """Arms by contract: moe, dense_active, dense_total, dense_flops, moe_upcycled (after dense_active), or
    equal_resources (alone)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Run seeds: train.seed = seed; data.seed = the study's data.seed + seed unless data_order = "shared"."""
    data_order: DataOrder = "per_seed"
    """per_seed: each seed its own data order, shared by the seed's arms; shared: one data.seed for every run."""
    budget_tokens: int = 0
    """Training tokens per run, equal across arms (0 = train.train_steps steps)."""
    budget_flops: float = 0.0
    """Training FLOPs per run, equal across arms (0 = off); each arm's steps = C / (FLOPs/token x tokens/step)."""
    output_dir: str = ""
    """Study directory (default runs/study/<name>)."""
    nproc_per_node: int = 1
    """Processes per run (> 1: each run under torch.distributed.run)."""
    keep_checkpoints: bool = True
    """Keep a run's checkpoints/ once it is complete (false: delete them; metrics and result stay)."""
    upcycle_at: float = 0.5
    """moe_upcycled: the share of dense_active's steps after which the MoE takes over from that run's checkpoint; it
    then trains the rest of dense_active's tokens, continuing its data stream (the dense steps count in its tokens)."""
    variants: dict[str, dict] = field(default_factory=dict)
    """More MoE arms, by name: [study.variants.<name>] holds the [model.moe] routing and balancing fields
    (VARIANT_FIELDS) in which the arm differs from the base MoE; list the name in arms."""
    match: MatchSpec = field(default_factory=MatchSpec)
    equal_resources: EqualResourcesSpec = field(default_factory=EqualResourcesSpec)


@dataclass
class StudyConfig(RunConfig):
    """A study file: the base MoE run config plus [study]."""

    study: StudySpec = field(default_factory=StudySpec)

    def base(self) -> RunConfig:
        return RunConfig(model=self.model, parallel=self.parallel, data=self.data, train=self.train)


def load_study(path: str | Path, overrides: list[str] = (), *, check_world: bool = True) -> StudyConfig:
    """Load a study file with dotted overrides (e.g. study.seeds=[1], train.train_steps=20) and check it.

    `check_world=False` leaves out the checks against the world size of `study run` (study.nproc_per_node), for
    callers that run elsewhere: `study launch` checks its own world size, `bench` runs on one device.
    """
    data = apply_overrides(load_toml(path), list(overrides))
    er = (data.get("study") or {}).get("equal_resources")
    if isinstance(er, dict):
        for name in COUNT_FIELDS:
            if isinstance(er.get(name), (str, float)):  # "6.5B", or 6.5e9 (a TOML float)
                er[name] = parse_count(er[name], f"study.equal_resources.{name}")
        if er.get("reuse") == "loose":
            raise ConfigError("study.equal_resources.reuse = 'loose' is now called 'fresh' (each arm reads fresh "
                              "tokens up to its budget, one epoch); the published 2-epoch scheme is not offered")
    cfg = with_data_vocabulary(from_dict(StudyConfig, data))
    if not cfg.study.name:
        cfg.study.name = Path(path).stem
    validate_study(cfg, check_world=check_world)
    return cfg


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
"""Study and variant names become directory names, SLURM job names and report labels: letters, digits, '_', '.',
'-', starting with a letter or digit (so never a path like '..', an option or a shell word break)."""


def check_name(field: str, name: str) -> None:
    if not SAFE_NAME.match(name):
        raise ConfigError(f"{field} = {name!r} is not allowed; use 1-100 letters, digits, '_', '.' or '-', starting "
                          "with a letter or digit")


def validate_study(cfg: StudyConfig, *, check_world: bool = True) -> None:
    """Check the [study] table and the base run config; raises ConfigError naming the field."""
    s = cfg.study
    check_name("study.name", s.name)
    for name in s.variants:
        check_name(f"study.variants.{name}", name)
    if s.nproc_per_node < 1:
        raise ConfigError(f"study.nproc_per_node = {s.nproc_per_node} must be >= 1")
    base = cfg.base()
    if s.budget_tokens or s.budget_flops or "equal_resources" in s.arms:
        # train.train_steps is not used: each arm's steps come from the budget (arms are validated when derived)
        t = base.train
        base = dataclasses.replace(base, train=dataclasses.replace(t, train_steps=max(t.train_steps, t.min_train_steps)))
    validate(base, s.nproc_per_node if check_world else None)
    if not cfg.model.is_moe:
        raise ConfigError("model.moe.num_experts = 0: a study's base model must be the MoE (the planner derives the dense arms)")
    if not s.arms:
        raise ConfigError(f"study.arms is empty; choose from {', '.join(ARM_CHOICES)}")
    for arm in s.arms:
        if arm not in ARM_CHOICES and arm not in s.variants:
            raise ConfigError(f"study.arms: {arm!r} is not allowed; expected one of {', '.join(ARM_CHOICES)}, or a "
                              "name defined in [study.variants]")
    for name in s.variants:
        model = dataclasses.replace(base.model, moe=variant_moe(cfg, name))
        try:
            validate(dataclasses.replace(base, model=model), s.nproc_per_node if check_world else None)
        except ConfigError as exc:
            raise ConfigError(f"study.variants.{name}: {exc}") from None
    if len(set(s.arms)) != len(s.arms):
        raise ConfigError(f"study.arms = {s.arms} lists an arm twice")
    if "equal_resources" in s.arms and len(s.arms) > 1:
        raise ConfigError(
            "study.arms: equal_resources expands into its own dense baseline and MoE arms with a different data "
            "budget; put it alone in a study"
        )
    if UPCYCLED_ARM in s.arms:
        if "dense_active" not in s.arms or s.arms.index("dense_active") > s.arms.index(UPCYCLED_ARM):
            raise ConfigError(f"study.arms = {s.arms}: {UPCYCLED_ARM} starts from the dense_active run of its seed; list "
                              "dense_active before it")
        if not s.keep_checkpoints:
            raise ConfigError(f"study.keep_checkpoints = false deletes the dense_active checkpoints {UPCYCLED_ARM} "
                              "starts from; keep them")
        if not 0 < s.upcycle_at < 1:
            raise ConfigError(f"study.upcycle_at = {s.upcycle_at} must be in (0, 1): the share of dense_active's steps "
                              "before the MoE takes over")
    if not s.seeds or len(set(s.seeds)) != len(s.seeds):
        raise ConfigError(f"study.seeds = {s.seeds} must be a non-empty list of distinct seeds")
    if s.data_order not in DATA_ORDERS:  # the loader checks this too; a StudyConfig built in code is not loaded
        raise ConfigError(f"study.data_order = {s.data_order!r} is not allowed; expected one of "
                          f"{', '.join(repr(o) for o in DATA_ORDERS)}")
    for name, value in (("match.tolerance_pct", s.match.tolerance_pct),
                        ("equal_resources.r_a_rel_tolerance", s.equal_resources.r_a_rel_tolerance)):
        if value <= 0:
            raise ConfigError(f"study.{name} = {value} must be > 0")
    if s.budget_tokens < 0 or s.budget_flops < 0:
        raise ConfigError("study.budget_tokens and study.budget_flops must be >= 0")
    if s.budget_tokens and s.budget_flops:
        raise ConfigError(
            f"study.budget_tokens = {s.budget_tokens} and study.budget_flops = {s.budget_flops:g} are both set; set one"
        )
    if s.arms == ["equal_resources"]:
        d = cfg.data
        if d.unique_tokens or d.epochs or d.consumed_tokens:
            raise ConfigError(
                "data.unique_tokens / data.epochs / data.consumed_tokens must stay 0 in an equal-resources study: "
                "set D with study.equal_resources.unique_tokens (the planner gives each arm its tokens)"
            )
        if s.budget_tokens or s.budget_flops:
            raise ConfigError(
                "study.budget_tokens / study.budget_flops do not apply to equal_resources: the family's compute "
                "is the dense baseline's FLOPs over D = study.equal_resources.unique_tokens"
            )
        er = s.equal_resources
        if not er.r_a or any(not 0 < r < 1 for r in er.r_a):
            raise ConfigError(f"study.equal_resources.r_a = {er.r_a} must be activation rates in (0, 1)")
        if len({f"{r:.2f}" for r in er.r_a}) != len(er.r_a):
            raise ConfigError(f"study.equal_resources.r_a = {er.r_a} lists rates that agree to two decimals; arms are "
                              "named by the rate to two decimals, so give distinct ones")
        for name in ("dense_layers", "dense_hidden", "dense_ffn", "expert_ffn_hidden_size"):
            if getattr(er, name) < 0:
                raise ConfigError(f"study.equal_resources.{name} = {getattr(er, name)} must be >= 0 (0 = default)")
        if er.granularity == "hold_top_k" and len(set(er.top_k)) != 1:
            raise ConfigError(f"study.equal_resources.top_k = {er.top_k}: granularity = 'hold_top_k' keeps K fixed "
                              "across r_a, so give one value, e.g. top_k = [2]")
        if er.expert_ffn_hidden_size and er.granularity != "hold_expert_size":
            raise ConfigError(f"study.equal_resources.expert_ffn_hidden_size = {er.expert_ffn_hidden_size} holds D_e "
                              "only with granularity = 'hold_expert_size'")


def variant_moe(cfg: StudyConfig, name: str) -> MoEConfig:
    """The [model.moe] of variant arm `name`: the base MoE's with the variant's fields; ConfigError (one line) for
    a field outside VARIANT_FIELDS or a name that is not an arm or clashes with one (`validate_study` checks the
    variant's model)."""
    fields = cfg.study.variants[name]
    where = f"study.variants.{name}"
    if name in ARM_CHOICES:
        raise ConfigError(f"{where}: {name!r} is a built-in arm; give the variant another name")
    if name not in cfg.study.arms:
        raise ConfigError(f"{where} is defined but not listed in study.arms = {cfg.study.arms}")
    if not isinstance(fields, dict) or not fields:
        raise ConfigError(f"{where} must be a table of [model.moe] fields, e.g. expert_bias_update_rate = 1e-3")
    for key in fields:
        if key not in VARIANT_FIELDS:
            raise ConfigError(f"{where}.{key}: a variant may change only {', '.join(VARIANT_FIELDS)} (routing and "
                              "balancing, so every dense arm stays matched)")
    return from_dict(MoEConfig, {**dataclasses.asdict(cfg.model.moe), **fields}, where)
