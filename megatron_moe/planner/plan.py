"""What `megatron-moe plan` computes for one config: its ledger, matched dense baselines or an
equal-resources family, each as a complete run config, optionally written as TOML files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_moe.config import ModelConfig, RunConfig, validate
from megatron_moe.schema import apply_overrides, from_dict, load_toml, save_toml
from megatron_moe.files import atomic_write_json
from megatron_moe.planner.family import Family, equal_resources_family
from megatron_moe.planner.ledger import Ledger, ledger
from megatron_moe.planner.match import Match, legal_widths, match_dense
from megatron_moe.planner.memory import MemoryEstimate, estimate_memory, minimum_world_size


def load_plan_config(path: str, overrides: list[str], world_size: int | None = None) -> RunConfig:
    """A run config (tables [model], [parallel], ...) or a bare model config (model keys at top level)."""
    data = load_toml(path)
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    if data and "model" not in data and set(data) <= model_keys:
        data = {"model": data}
    cfg = from_dict(RunConfig, apply_overrides(data, list(overrides)))
    validate(cfg, world_size)
    return cfg


@dataclass
class ConfigPlan:
    """A source run config, its ledger, and the arms planned from it as complete run configs."""

    source: RunConfig
    ledger: Ledger
    matches: list[Match]
    family: Family | None
    arms: dict[str, RunConfig]
    legal_widths: str
    """The widths the matched dense models could take, in words."""
    memory: dict[str, MemoryEstimate]
    """Memory per GPU of the source ("source") and of each arm, on one world size."""

    def to_dict(self, config_path: str) -> dict[str, Any]:
        source = self.memory["source"]
        return {
            "config": config_path,
            "tensor": self.source.parallel.tensor,
            "ledger": self.ledger.to_dict(),
            "matches": [x.to_dict() for x in self.matches],
            "equal_resources": self.family.to_dict() if self.family is not None else None,
            "memory": {**source.to_dict(), "arms": {name: m.per_gpu.parts() for name, m in self.memory.items()
                                                    if name != "source"}},
            "written": {},
        }

    def write(self, out: Path, config_path: str) -> dict[str, Any]:
        """source.toml, one TOML per arm and plan.json under `out`; returns what plan.json holds."""
        plan = self.to_dict(config_path)
        save_toml(self.source, out / "source.toml")
        for name, cfg in self.arms.items():
            save_toml(cfg, out / f"{name}.toml")
            plan["written"][name] = str(out / f"{name}.toml")
        atomic_write_json(out / "plan.json", plan)
        return plan


def plan_config(run_cfg: RunConfig, contracts: tuple[str, ...], *, equal_resources: dict[str, Any] | None = None,
                multiple_of: int, resize: str, count: str, causal_attention: bool,
                world_size: int | None = None) -> ConfigPlan:
    """Dense baselines matched on each of `contracts`, and the equal-resources family when its options are
    given (keyword arguments of `equal_resources_family`); memory per GPU on `world_size` GPUs (default: the fewest
    the source's layout runs on)."""
    m, par = run_cfg.model, run_cfg.parallel
    matches = [match_dense(m, c, par.tensor, multiple_of=multiple_of, resize=resize, count=count,
                           causal_attention=causal_attention) for c in contracts]
    family = None
    if equal_resources is not None:
        family = equal_resources_family(m, tensor=par.tensor, expert=par.expert, multiple_of=multiple_of,
                                        causal_attention=causal_attention, **equal_resources)
    models = {f"dense_{x.contract}": x.config for x in matches}
    if family is not None:
        models.update({f"er_{a.name}": a.config for a in (family.dense, *family.members)})
    arms = {name: run_cfg.with_model(model) for name, model in models.items()}
    world = world_size or minimum_world_size(run_cfg)
    for arm in arms.values():
        validate(arm, world_size)
    memory = {name: estimate_memory(cfg, world) for name, cfg in {"source": run_cfg, **arms}.items()}
    return ConfigPlan(run_cfg, ledger(m, par.tensor, causal_attention=causal_attention), matches, family, arms,
                      legal_widths(m, par.tensor, multiple_of, resize), memory)
