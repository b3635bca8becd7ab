"""Studies: a TOML spec names a base MoE model, the arms by contract, seeds and a budget; the planner derives
the arms, and `study run` trains every (arm, seed) in a fresh process, idempotently.

A study file is a run config for the base MoE model ([model], [model.moe], [parallel], [data], [train]:
optimizer, LR schedule, evaluation and data-reuse schedule shared by every arm) plus a [study] table::

    [study]
    name = "tiny_three_arm"
    arms = ["dense_active", "moe", "dense_total"]  # moe | dense_active | dense_total | dense_flops
                                                  # | equal_resources (the activation-rate family)
    seeds = [1, 2, 3]        # model-init seeds (train.seed); the data seed (data.seed) is fixed per study
    budget_tokens = 0        # training tokens per run (0 = train.train_steps steps for every arm)
    budget_flops = 0.0       # or training FLOPs per run: each arm trains floor(C / (FLOPs/token x tokens/step))
    [study.match]            # how dense arms are matched (planner.match_dense)
    [study.equal_resources]  # the family (planner.equal_resources_family)

Arms are never written by hand: `moe` is the base model; `dense_<contract>` is `planner.match_dense(base,
contract)`, the base with moe.num_experts = 0 and width resized at fixed depth; `equal_resources` expands into
`er_dense` and `er_moe_ra<r>` with equal non-embedding parameters N, training compute C and unique tokens D.
Every arm of a study gets the identical data config (same documents, same order, so the same data
fingerprint); equal-resources arms share data.unique_tokens = D with an unbounded reuse schedule and differ
only in train.train_steps = the planner's consumed tokens / tokens per step (strict reuse: the dense baseline
sees D once, each MoE arm `repeats` times).

A study directory::

    study.toml            the study file as loaded (with overrides)
    study.json            manifest: spec, base config, arms (changed fields, matched quantity, target,
                          residual, ledger, steps), pairs, runs, planned data fingerprints, versions, git
    log.jsonl             one line per runner event: start, resume, skip, done, failed, interrupted
    runs/<arm>-s<seed>-<hash>/
        run.toml          the resolved run config the trainer is given
        run.json          arm, seed, hash, and per attempt: time, exit code, versions, git commit
        train.log         the trainer's output, all attempts
        config.toml, metrics.jsonl, checkpoints/, result.json   written by the trainer (result.json = complete)

The hash covers the whole resolved run config except bookkeeping that cannot change the trained model
(train.output_dir, train.log_interval, train.save_interval), so a changed study spec gets new run
directories and an unchanged one finds its finished runs. The code version (git commit) is recorded, not
hashed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from megatron_moe.config import (
    ConfigError, DataConfig, ModelConfig, RunConfig, apply_overrides, from_dict,
    load_toml, save_toml, to_toml, validate,
)
from megatron_moe.utils import atomic_write_json, atomic_write_text

MATCHED_ARMS = ("moe", "dense_active", "dense_total", "dense_flops")
ARM_CHOICES = (*MATCHED_ARMS, "equal_resources")
PREEMPTED_EXIT_CODE = 75
"""The trainer's exit code after a stop signal (checkpoint saved; megatron_moe.training.PREEMPTED_EXIT_CODE)."""
BOOKKEEPING_FIELDS = ("output_dir", "log_interval", "save_interval")
"""train.* fields left out of the run hash: they cannot change the trained model."""


# ================================================================ the spec


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

    r_a: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    """Target activation rates N_a / N of the MoE arms."""
    total_params: int = 0
    """N, non-embedding parameters (0 = the base model's)."""
    unique_tokens: int = 0
    """D, unique training tokens, = the dense baseline's consumed tokens (0 = tokens_per_param x N)."""
    tokens_per_param: float = 20.0
    """D / N when unique_tokens is 0."""
    top_k: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    """Top-k choices the planner may use."""
    max_experts: int = 256
    """Largest routed-expert count the planner may use."""
    dense_resize: Literal["ffn", "ffn+hidden"] = "ffn+hidden"
    """How the dense baseline is resized to N."""
    multiple_of: int = 8
    """Expert and dense widths are multiples of this."""
    flops: Literal["exact", "equal_resources"] = "equal_resources"
    """FLOP convention of C: 6 N_a + 12 D_m S L (the study's) or the exact count."""
    r_a_rel_tolerance: float = 0.1
    """A target r_a further than this fraction from every reachable one is an error."""


@dataclass
class StudySpec:
    """What a study compares: arms, seeds, budget. Everything else comes from the base run config."""

    name: str = ""
    """Study name (default: the study file's stem)."""
    arms: list[str] = field(default_factory=lambda: ["dense_active", "moe", "dense_total"])
    """Arms by contract: moe, dense_active, dense_total, dense_flops, or equal_resources (alone)."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Model-init seeds (train.seed); data.seed stays fixed across arms and seeds."""
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
    cfg = from_dict(StudyConfig, apply_overrides(load_toml(path), list(overrides)))
    if not cfg.study.name:
        cfg.study.name = Path(path).stem
    validate_study(cfg, check_world=check_world)
    return cfg


def validate_study(cfg: StudyConfig, *, check_world: bool = True) -> None:
    """Check the [study] table and the base run config; raises ConfigError naming the field."""
    s = cfg.study
    if s.nproc_per_node < 1:
        raise ConfigError(f"study.nproc_per_node = {s.nproc_per_node} must be >= 1")
    base = cfg.base()
    if s.budget_tokens or s.budget_flops or "equal_resources" in s.arms:
        # train.train_steps is not used: each arm's steps come from the budget (arms are validated when derived)
        t = base.train
        base = dataclasses.replace(base, train=dataclasses.replace(t, train_steps=max(t.train_steps, t.lr_warmup_steps + 1)))
    validate(base, s.nproc_per_node if check_world else None)
    if not cfg.model.is_moe:
        raise ConfigError("model.moe.num_experts = 0: a study's base model must be the MoE (the planner derives the dense arms)")
    if not s.arms:
        raise ConfigError(f"study.arms is empty; choose from {', '.join(ARM_CHOICES)}")
    for arm in s.arms:
        if arm not in ARM_CHOICES:
            raise ConfigError(f"study.arms: {arm!r} is not allowed; expected one of {', '.join(ARM_CHOICES)}")
    if len(set(s.arms)) != len(s.arms):
        raise ConfigError(f"study.arms = {s.arms} lists an arm twice")
    if "equal_resources" in s.arms and len(s.arms) > 1:
        raise ConfigError(
            "study.arms: equal_resources expands into its own dense baseline and MoE arms with a different data "
            "budget; put it alone in a study"
        )
    if not s.seeds or len(set(s.seeds)) != len(s.seeds):
        raise ConfigError(f"study.seeds = {s.seeds} must be a non-empty list of distinct seeds")
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


# ================================================================ arms and runs


@dataclass(frozen=True)
class Arm:
    """One arm: a model derived from the base by the planner, with its run length."""

    name: str
    """moe, dense_active, ..., er_dense, er_moe_ra0.20."""
    contract: str
    """What the arm holds equal to its reference: 'base', 'active', 'total', 'flops', 'equal_resources'."""
    config: RunConfig
    """The arm's run config; train.seed and train.output_dir are set per run."""
    ledger: Any
    """planner.Ledger of the arm's model."""
    changed_fields: tuple[str, ...]
    """Dotted model.* / parallel.* fields that differ from the base config (steps and data are shown apart)."""
    match: dict[str, Any]
    """Matched quantity, target, achieved and residual_pct (empty for the base MoE)."""

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.global_batch_size * self.config.model.seq_length

    def to_dict(self) -> dict[str, Any]:
        led = self.ledger
        t = self.config.train
        return {
            "name": self.name,
            "contract": self.contract,
            "is_moe": self.config.model.is_moe,
            "changed_fields": list(self.changed_fields),
            "changes": {f: _get_dotted(self.config, f) for f in self.changed_fields},
            "match": self.match,
            "train_steps": t.train_steps,
            "tokens_per_step": self.tokens_per_step,
            "planned_tokens": t.train_steps * self.tokens_per_step,
            "total_params": led.total_params,
            "active_params": led.active_params,
            "nonembedding_params": led.nonembedding_params,
            "nonembedding_active_params": led.nonembedding_active_params,
            "r_a": led.r_a,
            "flops_train_per_token": led.flops_train_per_token,
            "flops_er_per_token": led.flops_er_per_token,
            "model": dataclasses.asdict(self.config.model),
        }


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
class Plan:
    """Everything `study run` will do, derived from the study config without training anything."""

    study: StudyConfig
    out_dir: Path
    arms: tuple[Arm, ...]
    runs: tuple[Run, ...]
    pairs: tuple[dict[str, str], ...]
    """Paired comparisons: name, baseline arm, moe arm (gap = loss(baseline) - loss(moe))."""
    family: dict[str, Any] | None
    """The equal-resources family's N, D, C (None for matched arms)."""


def _get_dotted(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted fields in which two dataclass configs differ."""
    out: list[str] = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(x):
            out.extend(_diff(x, y, name))
        elif x != y:
            out.append(name)
    return out


def _changed(base: RunConfig, arm: RunConfig) -> tuple[str, ...]:
    """Model and parallel fields an arm changes in the base run config (its steps and data are columns of
    their own)."""
    return tuple(_diff(base.model, arm.model, "model") + _diff(base.parallel, arm.parallel, "parallel"))


def _fmt(x: float) -> str:
    """Short human number: 1.23M, 4.5G."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def run_hash(cfg: RunConfig) -> str:
    """12 hex of sha256 over the resolved run config minus bookkeeping (BOOKKEEPING_FIELDS)."""
    d = cfg.to_dict()
    for name in BOOKKEEPING_FIELDS:
        d["train"].pop(name)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _arm_config(base: RunConfig, model: ModelConfig, train_steps: int, data: DataConfig | None = None) -> RunConfig:
    parallel = base.parallel if model.is_moe else dataclasses.replace(base.parallel, expert=1)
    return dataclasses.replace(
        base, model=model, parallel=parallel, data=data or base.data,
        train=dataclasses.replace(base.train, train_steps=train_steps, output_dir=""),
    )


def _steps_for(cfg: StudyConfig, flops_per_token: int, what: str) -> int:
    s, t = cfg.study, cfg.train
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    if s.budget_flops:
        steps = int(s.budget_flops // (flops_per_token * tokens_per_step))
        source = f"study.budget_flops = {s.budget_flops:g} / ({flops_per_token:,} FLOPs/token x {tokens_per_step:,} tokens/step)"
    elif s.budget_tokens:
        steps = s.budget_tokens // tokens_per_step
        source = f"study.budget_tokens = {s.budget_tokens:,} / {tokens_per_step:,} tokens/step"
    else:
        return t.train_steps
    if steps <= t.lr_warmup_steps:
        raise ConfigError(f"{what}: {source} = {steps} steps, not above train.lr_warmup_steps = {t.lr_warmup_steps}")
    return steps


def derive_arms(
    cfg: StudyConfig, *, check_world: bool = True
) -> tuple[list[Arm], list[dict[str, str]], dict[str, Any] | None]:
    """The study's arms (planner only: no torch, no data), its paired comparisons and the ER family summary."""
    from megatron_moe.planner import equal_resources_family, ledger, match_dense

    s, base = cfg.study, cfg.base()
    tensor = cfg.parallel.tensor
    m = s.match

    def flops_of(led: Any, convention: str) -> int:
        return led.flops_train_per_token if convention == "exact" else led.flops_er_per_token

    arms: list[Arm] = []
    pairs: list[dict[str, str]] = []
    family_info = None
    if s.arms == ["equal_resources"]:
        er = s.equal_resources
        fam = equal_resources_family(
            cfg.model, tuple(er.r_a), total_params=er.total_params or None, dense_resize=er.dense_resize,
            unique_tokens=er.unique_tokens or None, tokens_per_param=er.tokens_per_param,
            top_k_choices=tuple(er.top_k), max_experts=er.max_experts, tensor=tensor, expert=cfg.parallel.expert,
            multiple_of=er.multiple_of, flops=er.flops, causal_attention=m.causal_attention,
            r_a_rel_tolerance=er.r_a_rel_tolerance, tolerance_pct=m.tolerance_pct,
        )
        data = dataclasses.replace(cfg.data, unique_tokens=fam.unique_tokens, epochs=0.0, consumed_tokens=0)
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        family_info = {
            "total_params": fam.total_params, "unique_tokens": fam.unique_tokens, "compute": fam.compute,
            "flops": fam.flops, "tokens_per_step": tokens_per_step,
        }
        for member in (fam.dense, *fam.members):
            steps = member.consumed_tokens // tokens_per_step
            if steps <= cfg.train.lr_warmup_steps:
                raise ConfigError(
                    f"equal-resources arm {member.name}: {member.consumed_tokens:,} tokens / {tokens_per_step:,} "
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
                    "repeats": member.repeats, "compute": member.consumed_tokens * member.flops_per_token,
                },
            ))
            if member is not fam.dense:
                pairs.append({"name": f"er-{member.name[4:]}", "baseline": "er_dense", "moe": name,
                              "description": f"equal N, C, D: dense baseline vs MoE at r_a {member.r_a:.3f}"})
    else:
        for arm in s.arms:
            if arm == "moe":
                led = ledger(cfg.model, tensor, causal_attention=m.causal_attention)
                model, match = cfg.model, {}
                contract = "base"
            else:
                contract = arm.removeprefix("dense_")
                mt = match_dense(cfg.model, contract, tensor, multiple_of=m.multiple_of, resize=m.resize,
                                 count=m.count, flops=m.flops, causal_attention=m.causal_attention,
                                 tolerance_pct=m.tolerance_pct)
                led, model = mt.ledger, mt.config
                match = {"quantity": mt.quantity, "target": mt.target, "achieved": mt.achieved,
                         "residual_pct": mt.residual_pct}
            steps = _steps_for(cfg, flops_of(led, m.flops), f"arm {arm}")
            arm_cfg = _arm_config(base, model, steps)
            arms.append(Arm(
                name=arm, contract=contract, config=arm_cfg, ledger=led,
                changed_fields=_changed(base, arm_cfg),
                match=match,
            ))
        if "moe" in s.arms:
            for arm in arms:
                if arm.name.startswith("dense_"):
                    pairs.append({"name": f"matched-{arm.contract}", "baseline": arm.name, "moe": "moe",
                                  "description": f"dense matched to the MoE's {arm.match['quantity']}"})
    for a in arms:
        validate(a.config, s.nproc_per_node if check_world else None)
    return arms, pairs, family_info


def plan_study(cfg: StudyConfig, out_dir: str | Path | None = None, *, check_world: bool = True) -> Plan:
    """Arms and runs of a study; run directories are `out_dir/runs/<arm>-s<seed>-<hash>`."""
    out = Path(out_dir or cfg.study.output_dir or Path("runs") / "study" / cfg.study.name).resolve()
    arms, pairs, family = derive_arms(cfg, check_world=check_world)
    runs = []
    for arm in arms:
        for seed in cfg.study.seeds:
            rc = dataclasses.replace(arm.config, train=dataclasses.replace(arm.config.train, seed=seed))
            h = run_hash(rc)
            run_dir = out / "runs" / f"{arm.name}-s{seed}-{h}"
            rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, output_dir=str(run_dir)))
            runs.append(Run(arm=arm.name, seed=seed, config=rc, hash=h, dir=run_dir))
    return Plan(study=cfg, out_dir=out, arms=tuple(arms), runs=tuple(runs), pairs=tuple(pairs), family=family)


# ================================================================ provenance


def environment() -> dict[str, str | None]:
    """Versions of python, torch, megatron-core, numpy and this package (without importing torch)."""
    from importlib import metadata

    import megatron_moe

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "megatron-core": version("megatron-core"),
        "numpy": version("numpy"),
        "megatron-moe": megatron_moe.__version__,
        "platform": platform.platform(),
    }


def _package_root() -> Path:
    import megatron_moe

    return Path(megatron_moe.__file__).resolve().parent.parent


def git_state() -> dict[str, Any] | None:
    """The commit of the checkout this package runs from and whether tracked files are modified."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(_package_root()), *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ================================================================ status and manifest


def run_status(run: Run) -> str:
    """'done' (result.json exists), 'partial' (started, not finished) or 'new'."""
    if (run.dir / "result.json").is_file():
        return "done"
    if (run.dir / "run.json").is_file() or (run.dir / "metrics.jsonl").is_file():
        return "partial"
    return "new"


def data_check(plan: Plan) -> dict[str, dict[str, Any]]:
    """Build each arm's data source once (no training) and describe it: catches a schedule too short for an
    arm's steps, or a dataset too small for the budget, before any compute is spent. Keyed by arm."""
    from megatron_moe.data import build_data_source

    out: dict[str, dict[str, Any]] = {}
    cache: dict[str, Any] = {}
    for arm in plan.arms:
        c = arm.config
        key = json.dumps([dataclasses.asdict(c.data), c.model.seq_length, c.train.global_batch_size])
        if key not in cache:
            cache[key] = build_data_source(c.data, c.model.seq_length, c.train.global_batch_size)
        ds = cache[key]
        if ds.num_steps is not None and c.train.train_steps > ds.num_steps:
            raise ConfigError(
                f"arm {arm.name}: train.train_steps = {c.train.train_steps} exceeds the {ds.num_steps} steps the data "
                "schedule provides"
            )
        if ds.vocab_size > c.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {c.model.vocab_size} is smaller than the tokenizer's vocabulary ({ds.vocab_size})"
            )
        d = ds.describe(c.train.train_steps)
        out[arm.name] = {k: d[k] for k in ("source", "unique_tokens", "consumed_tokens", "epochs", "fingerprint")}
    return out


def manifest(plan: Plan, study_file: str | None, data: dict[str, Any] | None) -> dict[str, Any]:
    """The study-level record written to study.json."""
    cfg = plan.study
    prints = {d["fingerprint"] for d in (data or {}).values()}
    return {
        "name": cfg.study.name,
        "study_file": study_file,
        "updated": _now(),
        "spec": dataclasses.asdict(cfg.study),
        "base": cfg.base().to_dict(),
        "seeds": list(cfg.study.seeds),
        "data_seed": cfg.data.seed,
        "seed_policy": "train.seed = the run's seed (model init); data.seed fixed for the whole study",
        "gap_sign": "gap = best val loss(baseline) - best val loss(MoE); positive = the MoE is better",
        "arms": [a.to_dict() for a in plan.arms],
        "pairs": list(plan.pairs),
        "family": plan.family,
        "data": data,
        "data_fingerprints_equal": None if data is None else len(prints) == 1,
        "runs": [{"arm": r.arm, "seed": r.seed, "hash": r.hash, "dir": f"runs/{r.name}"} for r in plan.runs],
        "environment": environment(),
        "git": git_state(),
    }


def format_plan(plan: Plan) -> str:
    """The arm table (what differs, matched quantity and residual, size, FLOPs, steps) and run statuses."""
    rows = [f"{'arm':<16}{'params':>10}{'active':>10}{'N (non-emb)':>12}{'r_a':>7}{'FLOPs/tok':>11}"
            f"{'steps':>7}{'tokens':>11}{'epochs':>7}{'resid %':>9}  changed vs base"]
    for a in plan.arms:
        led = a.ledger
        resid = f"{a.match['residual_pct']:+.3f}" if a.match else "-"
        repeats = f"{a.match['repeats']:.2f}" if "repeats" in a.match else "-"  # planned; the data check has the rest
        changes = ", ".join(f"{f.removeprefix('model.')}={_get_dotted(a.config, f)}" for f in a.changed_fields)
        rows.append(
            f"{a.name:<16}{_fmt(led.total_params):>10}{_fmt(led.active_params):>10}{_fmt(led.nonembedding_params):>12}"
            f"{led.r_a:>7.3f}{_fmt(led.flops_train_per_token):>11}{a.config.train.train_steps:>7}"
            f"{_fmt(a.config.train.train_steps * a.tokens_per_step):>11}{repeats:>7}{resid:>9}  {changes or '-'}"
        )
    return "\n".join(rows)


# ================================================================ the runner


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
"""Signals that stop `study run` (and, handed on as SIGTERM, its trainer) with a checkpoint."""


class _Stop(Exception):
    """SIGTERM/SIGINT/SIGHUP/SIGUSR1 reached the runner: stop the current run (the trainer checkpoints on SIGTERM)
    and exit with PREEMPTED_EXIT_CODE; the same command resumes."""


def _log_event(out: Path, event: str, **fields: Any) -> None:
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps({"time": _now(), "event": event, **fields}) + "\n")


def _train_command(run: Run, nproc: int) -> list[str]:
    cli = ["-m", "megatron_moe.cli", "train", str(run.dir / "run.toml")]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]


def _train_subprocess(run: Run, nproc: int, echo: Callable[[str], None], prefix: str) -> int:
    """Run the trainer in a fresh process, tee its output to run_dir/train.log; returns its exit code.

    The trainer gets a session of its own, so a terminal's Ctrl-C reaches the runner only, which hands it on as
    SIGTERM (checkpoint, then exit). A trainer that saved and stopped on a signal of its own returns
    PREEMPTED_EXIT_CODE, also under torchrun, which reports a failed worker as 1.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_package_root()), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with (run.dir / "train.log").open("a") as log:
        log.write(f"==== {_now()} {' '.join(_train_command(run, nproc))}\n")
        log.flush()
        proc = subprocess.Popen(_train_command(run, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, env=env, start_new_session=True)
        preempted = False
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo(f"{prefix} {line.rstrip()}")
                preempted = preempted or "megatron-moe: stopped by signal at step" in line
            rc = proc.wait()
            return PREEMPTED_EXIT_CODE if rc and preempted else rc
        except BaseException:
            proc.terminate()  # the trainer saves a checkpoint on SIGTERM and exits
            # A second signal must not cut this wait short: the study's lock would go while the trainer still saves.
            # A second signal must not cut this wait short (the study's lock would go while the trainer still
            # saves): the runner is stopping already, so it is ignored.
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
            try:
                try:
                    rest = proc.communicate(timeout=120)[0]
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rest = proc.communicate()[0]
                log.write(rest or "")  # what it said while stopping
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
            raise


def _record_attempt(run: Run, attempt: dict[str, Any]) -> None:
    path = run.dir / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {
        "arm": run.arm, "seed": run.seed, "hash": run.hash, "attempts": [],
    }
    attempts = [a for a in info["attempts"] if a.get("started") != attempt["started"]] + [attempt]
    info.update(attempts=attempts, versions=attempt["versions"], git=attempt["git"])
    atomic_write_json(path, info)


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path | None = None,
    *,
    study_file: str | None = None,
    keep_going: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Train every (arm, seed) not yet complete, one after another; 0 when all runs are complete."""
    plan = plan_study(cfg, out_dir)
    out = plan.out_dir
    s = cfg.study
    statuses = {r.name: run_status(r) for r in plan.runs}
    n_done = sum(v == "done" for v in statuses.values())
    echo(f"study {s.name}: {len(plan.arms)} arms x {len(s.seeds)} seeds = {len(plan.runs)} runs in {out} "
         f"({n_done} complete, {sum(v == 'partial' for v in statuses.values())} partial)")
    echo(format_plan(plan))
    if plan.family:
        f = plan.family
        echo(f"equal resources: N = {f['total_params']:,}, D = {f['unique_tokens']:,} unique tokens, "
             f"C = {f['compute']:.4g} FLOPs ({f['flops']})")
    data = data_check(plan)
    prints = {d["fingerprint"] for d in data.values()}
    if len(prints) != 1:  # cannot happen by construction; refuse rather than train an unfair study
        raise ConfigError(f"arms would see different data (fingerprints {sorted(prints)}); every arm needs the same data config")
    d0 = next(iter(data.values()))
    echo(f"data: {d0['source']}, {d0['unique_tokens']:,} unique tokens, fingerprint {d0['fingerprint']} (all arms)")
    if dry_run:
        for r in plan.runs:
            echo(f"  {statuses[r.name]:<8}{r.name}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    lock = (out / ".lock").open("w")
    try:  # two runners on one study directory would train the same runs twice
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ConfigError(f"another `study run` is using {out} (lock {out / '.lock'})") from None
    try:
        return _run_locked(plan, data, study_file, keep_going=keep_going, quiet=quiet, echo=echo)
    finally:
        lock.close()


def _run_locked(plan: Plan, data: dict[str, Any], study_file: str | None, *, keep_going: bool, quiet: bool,
                echo: Callable[[str], None]) -> int:
    """The runner proper, under the study directory's lock: manifest, then every run not yet complete."""
    from megatron_moe.launch import live_job

    cfg, s, out = plan.study, plan.study.study, plan.out_dir
    statuses = {r.name: run_status(r) for r in plan.runs}
    atomic_write_text(out / "study.toml", to_toml(dataclasses.asdict(cfg)))
    atomic_write_json(out / "study.json", manifest(plan, study_file, data))
    known = {r.name for r in plan.runs}
    stray = [p.name for p in (out / "runs").glob("*") if p.is_dir() and p.name not in known] if (out / "runs").is_dir() else []
    if stray:
        echo(f"note: {len(stray)} run directories under {out / 'runs'} belong to another spec (left untouched)")

    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    old = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in old:
        signal.signal(sig, on_signal)
    env, git = environment(), git_state()
    total = len(plan.runs)
    steps_left = sum(r.config.train.train_steps for r in plan.runs if statuses[r.name] != "done")
    steps_run, time_run, failed, queued = 0, 0.0, [], []
    start_all = time.perf_counter()
    current: tuple[Run, dict[str, Any]] | None = None
    try:
        for i, run in enumerate(plan.runs, 1):
            tag = f"[{i}/{total}] {run.arm} seed {run.seed}"
            if statuses[run.name] == "done":
                echo(f"{tag}: complete, skipped ({run.name})")
                _log_event(out, "skip", run=run.name)
                continue
            if live := live_job(run.dir):  # launched with `study launch --slurm` and still queued or running
                echo(f"{tag}: queued on SLURM as job {live[0]} ({live[1]}), skipped ({run.name})")
                _log_event(out, "skip", run=run.name, slurm_job=live[0])
                queued.append(run.name)
                continue
            resumed = statuses[run.name] == "partial"
            steps = run.config.train.train_steps
            echo(f"{tag}: {'resuming' if resumed else 'starting'} {steps} steps -> runs/{run.name}")
            run.dir.mkdir(parents=True, exist_ok=True)
            save_toml(run.config, run.dir / "run.toml")
            attempt = {"started": _now(), "resumed": resumed, "versions": env, "git": git, "command": None}
            current = (run, attempt)
            _record_attempt(run, attempt)
            _log_event(out, "resume" if resumed else "start", run=run.name)
            t0 = time.perf_counter()
            rc = _train_subprocess(run, s.nproc_per_node, (lambda _: None) if quiet else echo, f"[{i}/{total} {run.arm} s{run.seed}]")
            elapsed = time.perf_counter() - t0
            attempt.update(ended=_now(), returncode=rc, elapsed_s=elapsed,
                           command=" ".join(_train_command(run, s.nproc_per_node)))
            _record_attempt(run, attempt)
            current = None
            complete = rc == 0 and (run.dir / "result.json").is_file()
            if rc == PREEMPTED_EXIT_CODE:  # the trainer got a stop signal itself, saved and exited: stop too
                _log_event(out, "interrupted", signal="trainer stopped", run=run.name, returncode=rc)
                echo(f"{tag}: stopped by a signal with a checkpoint saved; run the same command again to resume")
                return PREEMPTED_EXIT_CODE
            if not complete:
                _log_event(out, "failed", run=run.name, returncode=rc, elapsed_s=elapsed)
                echo(f"{tag}: FAILED (exit {rc}); see {run.dir / 'train.log'}")
                failed.append(run.name)
                if not keep_going:
                    break
                continue
            if not s.keep_checkpoints:
                shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
            result = json.loads((run.dir / "result.json").read_text())
            _log_event(out, "done", run=run.name, elapsed_s=elapsed, best_val_loss=result.get("best_val_loss"))
            steps_run += steps
            time_run += elapsed
            steps_left -= steps
            eta = time_run / steps_run * steps_left if steps_run else 0.0
            echo(f"{tag}: done in {elapsed:,.0f} s, best val loss {result.get('best_val_loss', float('nan')):.4f} | "
                 f"study {sum(run_status(r) == 'done' for r in plan.runs)}/{total} complete, "
                 f"{time.perf_counter() - start_all:,.0f} s so far, eta {eta:,.0f} s")
    except _Stop as exc:
        if current is not None:
            run, attempt = current
            attempt.update(ended=_now(), returncode=None, interrupted=str(exc))
            _record_attempt(run, attempt)
        _log_event(out, "interrupted", signal=str(exc), run=current[0].name if current else None)
        echo(f"interrupted ({exc}); run the same command again to resume")
        return PREEMPTED_EXIT_CODE
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if failed:
        echo(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    remaining = [r.name for r in plan.runs if run_status(r) != "done" and r.name not in queued]
    if remaining:
        return 1
    if queued:
        echo(f"{len(queued)} run(s) are queued or running on SLURM; once they finish: megatron-moe study report {out}")
        return 0
    echo(f"study complete: {total} runs in {out}; next: megatron-moe study report {out}")
    return 0


def run_main(path: str, overrides: list[str], *, output_dir: str | None = None, keep_going: bool = False,
             dry_run: bool = False, quiet: bool = False) -> int:
    """Entry point of `megatron-moe study run`."""
    from megatron_moe.launch import LaunchError

    cfg = load_study(path, overrides)
    try:
        return run_study(cfg, output_dir, study_file=str(Path(path).resolve()), keep_going=keep_going,
                         dry_run=dry_run, quiet=quiet, echo=lambda line: print(line, flush=True))
    except LaunchError as exc:  # squeue did not answer about a run launched on SLURM
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
