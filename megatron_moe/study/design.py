"""The arms and runs a study spec derives (pure: the planner only, no torch, nothing written).

Arms are never written by hand: `moe` is the base model; a variant (`[study.variants.<name>]`) is the base with
other routing and balancing; `dense_<contract>` is `planner.match_dense(base,
contract)`, the base with moe.num_experts = 0 and its FFN resized at fixed depth (`study.match.resize = "ffn"`, the
default: every arm keeps the base's trunk; "ffn+hidden" resizes the hidden size too); `equal_resources` expands into
`er_dense` and `er_moe_ra<r>` with equal non-embedding parameters N, training compute C and unique tokens D.
Every arm of a study gets the identical data config (same documents, same order, so the same data
fingerprint); equal-resources arms share one data.unique_tokens with an unbounded reuse schedule and differ
only in train.train_steps = the planner's consumed tokens / tokens per step (strict reuse: unique tokens D, the
dense baseline sees D once, each MoE arm `repeats` times; fresh reuse: a pool of the largest arm's tokens, of
which every arm reads a prefix once).

A run (arm, seed) sets train.seed = seed and, unless study.data_order = "shared", data.seed = the study's
data.seed + seed (`run_data_seed`): the arms of one seed share one data stream (their gaps are paired), and
different seeds see different document orders (and budget selections), so the spread over seeds includes
data-order noise. The data check (`study.datacheck`) therefore describes the data per seed, and arms are compared
within a seed.

Each (arm, seed) is a run in `<study>/runs/<arm>-s<seed>-<hash>`. The hash covers the whole resolved run config
except its bookkeeping fields (`config.ROLES`), which cannot change the trained model, so a changed study spec gets
new run directories and an unchanged one finds its finished runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from megatron_moe import directories
from megatron_moe.config import ConfigError, DataConfig, ModelConfig, RunConfig, validate
from megatron_moe.planner.cost import ASSUMED_GPU, ASSUMED_MFU, PEAK_BF16_FLOPS, gpu_hours
from megatron_moe.planner.memory import MemoryEstimate, estimate_memory
from megatron_moe.schema import changed_fields, get_dotted
from megatron_moe.study.records import ArmRecord, PairRecord
from megatron_moe.study.spec import DENSE_ARMS, UPCYCLED_ARM, StudyConfig, variant_moe
from megatron_moe.text import human, human_bytes, table


@dataclass(frozen=True)
class Arm:
    """One arm: a model derived from the base by the planner, with its run length."""

    name: str
    """moe, dense_active, ..., er_dense, er_moe_ra0.20."""
    contract: str
    """What the arm holds equal to its reference: 'base', 'active', 'total', 'flops', 'equal_resources', or
    'variant' (the base MoE with other routing and balancing)."""
    config: RunConfig
    """The arm's run config; train.seed, data.seed and train.output_dir are set per run."""
    ledger: Any
    """planner.Ledger of the arm's model."""
    changed_fields: tuple[str, ...]
    """Dotted model.* / parallel.* fields that differ from the base config (steps and data are shown apart)."""
    match: dict[str, Any]
    """Matched quantity, target, achieved and residual_pct (empty for the base MoE)."""

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.config)

    @property
    def planned_tokens(self) -> int:
        """Training tokens of one run, an upcycled arm's dense steps included."""
        return (self.config.train.train_steps + self.config.data.start_batch) * self.tokens_per_step

    @property
    def train_flops(self) -> float:
        """Training FLOPs of one run of this arm (the exact convention: steps x tokens x FLOPs per token), an upcycled
        arm's dense steps included at the dense model's FLOPs per token."""
        own = self.config.train.train_steps * self.tokens_per_step * self.ledger.flops_train_per_token
        return own + self.match.get("pretrained_flops", 0)

    @property
    def gpu_hours(self) -> float:
        """GPU-hours of one run at the planner's assumed device and utilisation (`planner.cost`)."""
        return gpu_hours(self.train_flops, fp8=self.config.train.precision == "fp8")

    def memory(self, world_size: int, on_gpu: bool) -> MemoryEstimate:
        """Memory per process of one run on `world_size` processes, on GPUs or on CPUs (`planner.memory`)."""
        return estimate_memory(self.config, world_size, precision=self.config.train.resolved_precision(on_gpu))

    def record(self) -> ArmRecord:
        """The arm as study.json records it."""
        led = self.ledger
        t = self.config.train
        return ArmRecord(
            name=self.name,
            contract=self.contract,
            is_moe=self.config.model.is_moe,
            changed_fields=list(self.changed_fields),
            changes={f: get_dotted(self.config, f) for f in self.changed_fields},
            match=self.match,
            train_steps=t.train_steps,
            tokens_per_step=self.tokens_per_step,
            planned_tokens=self.planned_tokens,
            total_params=led.total_params,
            active_params=led.active_params,
            nonembedding_params=led.nonembedding_params,
            nonembedding_active_params=led.nonembedding_active_params,
            r_a=led.r_a,
            flops_train_per_token=led.flops_train_per_token,
            flops_er_per_token=led.flops_er_per_token,
            model=dataclasses.asdict(self.config.model),
        )


@dataclass(frozen=True)
class Run:
    """One (arm, seed): a resolved run config and its directory."""

    arm: str
    seed: int
    config: RunConfig
    hash: str
    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name


@dataclass(frozen=True)
class Design:
    """Everything `study run` will do, derived from the study config without training anything."""

    study: StudyConfig
    out_dir: Path
    arms: tuple[Arm, ...]
    runs: tuple[Run, ...]
    pairs: tuple[PairRecord, ...]
    """Paired comparisons: name, baseline arm, moe arm (gap = loss(baseline) - loss(moe))."""
    family: dict[str, Any] | None
    """The equal-resources family's N, D, C (None for matched arms)."""

    @property
    def warnings(self) -> list[str]:
        """What makes this design's answer weak before anything trains: arms trained on fewer tokens than they have
        parameters, and arms whose optimizer step counts differ by more than MAX_STEP_RATIO."""
        out = []
        thin = [(a.name, a.planned_tokens / a.ledger.total_params) for a in self.arms]
        thin = [(name, tpp) for name, tpp in thin if tpp < MIN_TOKENS_PER_PARAM]
        if thin:
            out.append(f"{len(thin)} of {len(self.arms)} arms train on fewer tokens than they have parameters ("
                       + ", ".join(f"{name} {tpp:.2g}" for name, tpp in thin) + " tokens per parameter; compute-"
                       "optimal training is about 20): the arms are far from converged, so the comparison speaks for "
                       "this budget, not for the architectures")
        steps = {a.name: a.config.train.train_steps for a in self.arms}
        few, many = min(steps, key=steps.get), max(steps, key=steps.get)
        if steps[many] > MAX_STEP_RATIO * steps[few]:
            out.append(f"the arms' optimizer steps differ by {steps[many] / steps[few]:.1f}x ({few} {steps[few]}, "
                       f"{many} {steps[many]}; more than {MAX_STEP_RATIO:g}x): each runs its own LR schedule over "
                       "its own length, so schedule length is confounded with the architecture")
        return out


MIN_TOKENS_PER_PARAM = 1.0
"""Below this many training tokens per (total) parameter an arm gets a design warning."""
MAX_STEP_RATIO = 2.0
"""Arms whose optimizer step counts differ by more than this factor get a design warning."""


def tokens_per_step(cfg: RunConfig) -> int:
    return cfg.train.global_batch_size * cfg.model.seq_length


def _changed(base: RunConfig, arm: RunConfig) -> tuple[str, ...]:
    """Model and parallel fields an arm changes in the base run config (its steps and data are columns of
    their own)."""
    return changed_fields(base.model, arm.model, "model") + changed_fields(base.parallel, arm.parallel, "parallel")


def run_hash(cfg: RunConfig) -> str:
    """12 hex of sha256 over the resolved run config less its bookkeeping fields (`config.ROLES`) and the fields added
    since hashes were first recorded while they hold their defaults (`RunConfig.hashed`)."""
    d = cfg.hashed()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _arm_config(base: RunConfig, model: ModelConfig, train_steps: int, data: DataConfig | None = None) -> RunConfig:
    arm = base.with_model(model)
    return dataclasses.replace(
        arm, data=data or base.data, train=dataclasses.replace(base.train, train_steps=train_steps, output_dir=""),
    )


def _steps_for(cfg: StudyConfig, flops_per_token: int, what: str) -> int:
    s, t = cfg.study, cfg.train
    per_step = tokens_per_step(cfg)
    if s.budget_flops:
        steps = int(s.budget_flops // (flops_per_token * per_step))
        source = f"study.budget_flops = {s.budget_flops:g} / ({flops_per_token:,} FLOPs/token x {per_step:,} tokens/step)"
    elif s.budget_tokens:
        steps = s.budget_tokens // per_step
        source = f"study.budget_tokens = {s.budget_tokens:,} / {per_step:,} tokens/step"
    else:
        return t.train_steps
    if steps < t.min_train_steps:
        raise ConfigError(f"{what}: {source} = {steps} steps, not above train.lr_warmup_steps = {t.lr_warmup_steps}")
    return steps


def _equal_resources_arms(cfg: StudyConfig) -> tuple[list[Arm], list[dict[str, str]], dict[str, Any]]:
    """The equal-resources family as arms: `er_dense` and `er_moe_ra<r>`, each training its consumed tokens.

    Every arm gets one data config, so the arms of a seed share one token stream (one fingerprint). Strict
    reuse: data.unique_tokens = D, an unbounded reuse schedule, and each arm trains C / its FLOPs per token, so
    the dense baseline reads D once and an MoE arm `repeats` times. Fresh reuse: data.unique_tokens = the
    largest arm's consumed tokens (the pool); every arm reads a prefix of the pool's first epoch, so its unique
    tokens are its consumed tokens, each read once (the pool is whole documents, so it may fall short of the
    budget by less than one document, which the largest arm then reads twice; the report counts it).
    """
    from megatron_moe.planner.family import equal_resources_family, explicit_dense

    s, base = cfg.study, cfg.base()
    er, m = s.equal_resources, s.match
    dense = explicit_dense(cfg.model, er.dense_layers, er.dense_hidden, er.dense_ffn)
    dense_cfg, dense_resize = dense if dense is not None else (None, er.dense_resize)
    fam = equal_resources_family(
        cfg.model, tuple(er.r_a), total_params=er.total_params or None, dense_cfg=dense_cfg,
        dense_resize=dense_resize, unique_tokens=er.unique_tokens or None, tokens_per_param=er.tokens_per_param,
        top_k_choices=tuple(er.top_k), max_experts=er.max_experts, tensor=cfg.parallel.tensor,
        expert=cfg.parallel.expert, multiple_of=er.multiple_of, flops=er.flops, causal_attention=m.causal_attention,
        r_a_rel_tolerance=er.r_a_rel_tolerance, tolerance_pct=m.tolerance_pct, granularity=er.granularity,
        expert_ffn_hidden_size=er.expert_ffn_hidden_size or None, reuse=er.reuse,
    )
    members = (fam.dense, *fam.members)
    pool = fam.unique_tokens if er.reuse == "strict" else max(x.consumed_tokens for x in members)
    data = dataclasses.replace(cfg.data, unique_tokens=pool, epochs=0.0, consumed_tokens=0)
    per_step = tokens_per_step(cfg)
    family_info = {
        "total_params": fam.total_params, "unique_tokens": fam.unique_tokens, "compute": fam.compute,
        "flops": fam.flops, "tokens_per_step": per_step, "reuse": fam.reuse, "granularity": fam.granularity,
        "data_unique_tokens": pool, "r_a_grid": list(er.r_a),
    }
    arms, pairs = [], []
    for member in members:
        steps = member.consumed_tokens // per_step
        if steps < cfg.train.min_train_steps:
            raise ConfigError(
                f"equal-resources arm {member.name}: {member.consumed_tokens:,} tokens / {per_step:,} "
                f"tokens/step = {steps} steps, not above train.lr_warmup_steps = {cfg.train.lr_warmup_steps}; "
                "raise study.equal_resources.unique_tokens"
            )
        name = f"er_{member.name}"
        arm_cfg = _arm_config(base, member.config, steps, data)
        arms.append(Arm(
            name=name, contract="equal_resources", config=arm_cfg, ledger=member.ledger,
            changed_fields=_changed(base, arm_cfg),
            match={
                "quantity": "non-embedding parameters N (and compute C, unique tokens D)",
                "target": fam.total_params, "achieved": member.ledger.nonembedding_params,
                "residual_pct": member.params_residual_pct, "target_r_a": member.target_r_a,
                "flops_per_token": member.flops_per_token, "consumed_tokens": member.consumed_tokens,
                "unique_tokens": member.unique_tokens, "repeats": member.repeats,
                "compute": member.consumed_tokens * member.flops_per_token, "granularity": member.granularity(),
                "reuse": fam.reuse,
            },
        ))
        if member is not fam.dense:
            pairs.append(PairRecord(name=f"er-{member.name[4:]}", baseline="er_dense", moe=name,
                                    description=f"equal N, C, D: dense baseline vs MoE at r_a {member.r_a:.3f}"))
    return arms, pairs, family_info


def derive_arms(
    cfg: StudyConfig, *, check_world: bool = True
) -> tuple[list[Arm], list[dict[str, str]], dict[str, Any] | None]:
    """The study's arms (planner only: no torch, no data), its paired comparisons and the ER family summary."""
    from megatron_moe.planner.ledger import ledger
    from megatron_moe.planner.match import match_dense

    s, base = cfg.study, cfg.base()
    tensor = cfg.parallel.tensor
    m = s.match

    arms: list[Arm] = []
    pairs: list[PairRecord] = []
    family_info = None
    if s.arms == ["equal_resources"]:
        arms, pairs, family_info = _equal_resources_arms(cfg)
    else:
        for arm in s.arms:
            if arm == UPCYCLED_ARM:
                arms, upcycled = _upcycled_arm(cfg, arms)
                arms.append(upcycled)
                continue
            if arm == "moe" or arm in s.variants:
                model = cfg.model if arm == "moe" else dataclasses.replace(cfg.model, moe=variant_moe(cfg, arm))
                led = ledger(model, tensor, causal_attention=m.causal_attention)
                match = {}
                contract = "base" if arm == "moe" else "variant"
            else:
                contract = DENSE_ARMS[arm]
                mt = match_dense(cfg.model, contract, tensor, multiple_of=m.multiple_of, resize=m.resize,
                                 count=m.count, flops=m.flops, causal_attention=m.causal_attention,
                                 tolerance_pct=m.tolerance_pct)
                led, model = mt.ledger, mt.config
                match = {"quantity": mt.quantity, "target": mt.target, "achieved": mt.achieved,
                         "residual_pct": mt.residual_pct}
            steps = _steps_for(cfg, led.train_flops(m.flops), f"arm {arm}")
            arm_cfg = _arm_config(base, model, steps)
            arms.append(Arm(
                name=arm, contract=contract, config=arm_cfg, ledger=led,
                changed_fields=_changed(base, arm_cfg),
                match=match,
            ))
        moes = [a for a in s.arms if a == "moe" or a in s.variants]
        for moe in moes:
            prefix = "" if moe == "moe" else f"{moe}-"
            for arm in arms:
                if arm.name in DENSE_ARMS:
                    pairs.append(PairRecord(name=f"{prefix}matched-{arm.contract}", baseline=arm.name, moe=moe,
                                            description=f"dense matched to the MoE's {arm.match['quantity']}"))
            if moe != "moe" and "moe" in moes:
                pairs.append(PairRecord(name=f"{moe}-vs-moe", baseline="moe", moe=moe,
                                        description=f"the base MoE against {moe}, which differs only in routing "
                                                    "and balancing"))
        if UPCYCLED_ARM in s.arms:
            upcycled = next(a for a in arms if a.name == UPCYCLED_ARM)
            k = upcycled.match["dense_steps"]
            pairs.append(PairRecord(name="upcycled-vs-dense_active", baseline="dense_active", moe=UPCYCLED_ARM,
                                    description=f"dense_active against the MoE upcycled from it at step {k}, on the "
                                                "same tokens"))
            if "moe" in s.arms:
                pairs.append(PairRecord(name="upcycled-vs-moe", baseline="moe", moe=UPCYCLED_ARM,
                                        description=f"the MoE trained from scratch against the MoE upcycled at step {k}"))
    for a in arms:
        validate(a.config, s.nproc_per_node if check_world else None)
    return arms, pairs, family_info


def _upcycled_arm(cfg: StudyConfig, arms: list[Arm]) -> tuple[list[Arm], Arm]:
    """The moe_upcycled arm, and the arms before it with dense_active told to keep the checkpoint it starts from.

    dense_active trains S steps; at step k = upcycle_at x S its checkpoint (kept: train.keep_checkpoints_at, a
    bookkeeping field, so dense_active's runs are the same runs) becomes the base MoE (`train.init_from`), which trains
    the remaining S - k steps on the rest of the same data stream (data.start_batch = k). Its tokens are the dense
    run's k steps plus its own, the budget of every other arm."""
    from megatron_moe.planner.ledger import ledger
    from megatron_moe.train.upcycle import check_upcycling

    s, base = cfg.study, cfg.base()
    dense = next(a for a in arms if a.name == "dense_active")
    total = dense.config.train.train_steps
    k = max(1, round(s.upcycle_at * total))
    if total - k < cfg.train.min_train_steps:
        raise ConfigError(f"arm {UPCYCLED_ARM}: {total} dense_active steps x (1 - study.upcycle_at = {s.upcycle_at}) "
                          f"= {total - k} steps left, not above train.lr_warmup_steps = {cfg.train.lr_warmup_steps}")
    arm_cfg = _arm_config(base, cfg.model, total - k, dataclasses.replace(cfg.data, start_batch=k))
    try:
        check_upcycling(arm_cfg, dense.config.model, "dense_active")
    except ConfigError as exc:
        raise ConfigError(f"arm {UPCYCLED_ARM}: {exc}") from None
    kept = dataclasses.replace(dense.config, train=dataclasses.replace(dense.config.train, keep_checkpoints_at=[k]))
    arms = [dataclasses.replace(a, config=kept) if a is dense else a for a in arms]
    upcycled = Arm(
        name=UPCYCLED_ARM, contract="upcycled", config=arm_cfg,
        ledger=ledger(cfg.model, cfg.parallel.tensor, causal_attention=s.match.causal_attention),
        changed_fields=_changed(base, arm_cfg),
        match={"quantity": "training tokens, the dense_active run's first steps included", "dense_steps": k,
               "pretrained_tokens": k * tokens_per_step(cfg), "upcycle_at": s.upcycle_at,
               "pretrained_flops": k * tokens_per_step(cfg) * dense.ledger.flops_train_per_token},
    )
    return arms, upcycled


def run_data_seed(cfg: StudyConfig, seed: int) -> int:
    """data.seed of the runs of `seed`: the study's data.seed + seed, or the study's data.seed when
    study.data_order = "shared"."""
    return cfg.data.seed if cfg.study.data_order == "shared" else cfg.data.seed + seed


def design_study(cfg: StudyConfig, out_dir: str | Path | None = None, *, check_world: bool = True) -> Design:
    """Arms and runs of a study; run directories are `out_dir/runs/<arm>-s<seed>-<hash>`."""
    out = Path(out_dir or cfg.study.output_dir or Path("runs") / "study" / cfg.study.name).resolve()
    arms, pairs, family = derive_arms(cfg, check_world=check_world)
    runs: list[Run] = []
    for arm in arms:
        for seed in cfg.study.seeds:
            rc = dataclasses.replace(arm.config, train=dataclasses.replace(arm.config.train, seed=seed),
                                     data=dataclasses.replace(arm.config.data, seed=run_data_seed(cfg, seed)))
            source = None
            if arm.name == UPCYCLED_ARM:  # the dense_active run of this seed, at step k; hashed relative to runs/
                dense = next(r for r in runs if r.arm == "dense_active" and r.seed == seed)
                source = f"{dense.name}/{directories.CHECKPOINTS}/{directories.checkpoint_name(arm.match['dense_steps'])}"
                rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, init_from=source))
            h = run_hash(rc)
            run_dir = out / directories.RUNS / f"{arm.name}-s{seed}-{h}"
            init = {"init_from": str(out / directories.RUNS / source)} if source else {}
            rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, output_dir=str(run_dir), **init,
                                                                   **_sink_names(rc, cfg.study.name, arm.name, seed)))
            runs.append(Run(arm=arm.name, seed=seed, config=rc, hash=h, dir=run_dir))
    return Design(study=cfg, out_dir=out, arms=tuple(arms), runs=tuple(runs), pairs=tuple(pairs), family=family)


def _sink_names(cfg: RunConfig, study: str, arm: str, seed: int) -> dict[str, str]:
    """Where a run goes in the metric sinks the study turns on: <study>/<arm>-s<seed>, as a TensorBoard
    subdirectory (absolute: SLURM jobs run in another directory) and as the W&B run name."""
    name = f"{study}/{arm}-s{seed}"
    out = {}
    if cfg.train.tensorboard_dir:
        out["tensorboard_dir"] = str(Path(cfg.train.tensorboard_dir).resolve() / name)
    if cfg.train.wandb_project:
        out["wandb_run_name"] = name
    return out


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 100 else f"{h:.2g}"


def format_arms(design: Design, world_size: int, on_gpu: bool) -> str:
    """The arm table: size, granularity (E, K, D_e, D_se), FLOPs, steps, tokens, planned epochs, cost, memory per
    process on `world_size` processes, matched residual and what differs from the base; then a legend and the cost.
    Columns are as wide as their widest cell."""
    header = ["arm", "params", "active", "N (non-emb)", "r_a", "E", "K", "D_e", "D_se", "FLOPs/tok", "steps",
              "tokens", "unique", "epochs", "train FLOPs", "GPU-h", "mem/GPU" if on_gpu else "mem/proc", "resid %",
              "changed vs base"]
    rows = []
    for a in design.arms:
        led, m = a.ledger, a.config.model
        resid = f"{a.match['residual_pct']:+.3f}" if "residual_pct" in a.match else "-"
        # planned unique tokens and epochs of an equal-resources arm; the data check reports the rest
        unique = human(a.match["unique_tokens"]) if "unique_tokens" in a.match else "-"
        repeats = f"{a.match['repeats']:.2f}" if "repeats" in a.match else "-"
        gran = [m.moe.num_experts, m.moe.top_k, m.expert_ffn, m.moe.shared_expert_ffn_hidden_size] if m.is_moe else [0] * 4
        changes = ", ".join(f"{f.removeprefix('model.')}={get_dotted(a.config, f)}" for f in a.changed_fields)
        rows.append([a.name, human(led.total_params), human(led.active_params), human(led.nonembedding_params),
                     f"{led.r_a:.3f}", *map(str, gran), human(led.flops_train_per_token),
                     str(a.config.train.train_steps), human(a.planned_tokens), unique,
                     repeats, f"{a.train_flops:.3g}", _hours(a.gpu_hours),
                     human_bytes(a.memory(world_size, on_gpu).per_gpu.total), resid, changes or "-"])
    runs = len(design.study.study.seeds)
    total = sum(a.train_flops for a in design.arms) * runs
    hours = sum(a.gpu_hours for a in design.arms) * runs
    cost = (f"cost: {total:.3g} training FLOPs for the {runs * len(design.arms)} runs, about {_hours(hours)} GPU-hours "
            f"at {ASSUMED_MFU:.0%} MFU on an {ASSUMED_GPU} ({PEAK_BF16_FLOPS[ASSUMED_GPU] / 1e12:g} TFLOP/s bf16, "
            "twice that in fp8; GPU-h: per run; an assumption: `megatron-moe bench` measures a model's MFU)")
    shared = any(a.config.model.moe.shared_expert_ffn_hidden_size for a in design.arms if a.config.model.is_moe)
    legend = ("columns: params/active = total/active parameters; N = non-embedding parameters; r_a = active share of "
              "N; E = routed experts, K = top-k, D_e = expert FFN width, D_se = shared-expert FFN width"
              + (" (a shared expert is present)" if shared else " (0 = no shared expert)")
              + "; FLOPs/tok = training FLOPs per token; steps and tokens per run; unique tokens and epochs of the "
              "data plan (an upcycled arm's tokens and FLOPs include the dense steps it starts after); train FLOPs "
              "and GPU-h per run; mem = estimated peak per "
              + ("GPU" if on_gpu else "process") + f" on world size {world_size} (`megatron-moe plan` itemises it); "
              "resid = residual of the match")
    return "\n".join([*table(header, rows, "l" + "r" * (len(header) - 2) + "l"), legend, cost])


def family_line(design: Design) -> str | None:
    """The equal-resources family's N, D and C in one line (None for matched arms)."""
    f = design.family
    if not f:
        return None
    return (f"equal resources: N = {f['total_params']:,}, D = {f['unique_tokens']:,} unique tokens, "
            f"C = {f['compute']:.4g} FLOPs ({f['flops']})")


def check_memory(design: Design, world_size: int, on_gpu: bool, limit: tuple[int | None, str], force: bool,
                 echo: Callable[[str], None]) -> None:
    """Refuse (ConfigError) a design an arm of which would not fit in `limit` = (bytes, where that figure came from),
    or with `force` warn and go on; no limit, no check."""
    refusal = memory_refusal(design, world_size, on_gpu, *limit) if limit[0] else None
    if refusal and not force:
        raise ConfigError(refusal)
    if refusal:
        echo(f"warning: {refusal.removesuffix(', or pass --force')} (going on: --force)")


def memory_refusal(design: Design, world_size: int, on_gpu: bool, limit: int, source: str) -> str | None:
    """The one-line refusal when an arm's estimated memory per process exceeds `limit` bytes (`source` says where
    the limit came from), or None when every arm fits."""
    needs = {a.name: a.memory(world_size, on_gpu).per_gpu for a in design.arms}
    over = {name: need for name, need in needs.items() if need.total > limit}
    if not over:
        return None
    name, need = max(over.items(), key=lambda x: x[1].total)
    return (f"arm {name} needs about {human_bytes(need.total)} per {'GPU' if on_gpu else 'process'} on world size "
            f"{world_size} (weights {human_bytes(need.weights)}, gradients {human_bytes(need.grads)}, optimizer "
            f"{human_bytes(need.optimizer)}, activations {human_bytes(need.activations)}), more than {source}"
            + (f"; {len(over) - 1} more arms too" if len(over) > 1 else "") + ": lower train.micro_batch_size, set "
            "train.recompute_granularity or train.distributed_optimizer, add parallelism or processes, or pass --force")
