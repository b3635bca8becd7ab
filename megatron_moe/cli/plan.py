"""`megatron-moe plan`: the parameter/FLOP ledger, matched dense baselines and equal-resources families."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_moe.cli.common import check_output_dir
from megatron_moe.config import ConfigError, validate
from megatron_moe.planner.family import DEFAULT_R_A_GRID
from megatron_moe.planner.match import CONTRACTS

PLAN_EPILOG = """examples:
  megatron-moe plan examples/tiny_moe.toml                      # ledger + active/total/flops-matched dense
  megatron-moe plan examples/equal_resources/7b.toml            # a study: its arms, GPU-hours and memory per GPU
  megatron-moe plan examples/equal_resources/7b.toml --gpus 16 --gpu-memory 141GB train.recompute_granularity=full
  megatron-moe plan examples/tiny_moe.toml --match active --json
  megatron-moe plan examples/tiny_moe.toml --resize ffn+hidden --multiple-of 16 -o runs/plan
  megatron-moe plan examples/tiny_moe.toml --match equal-resources --r-a 0.2,0.3,0.5 --tokens-per-param 20
  megatron-moe plan examples/tiny_moe.toml --match equal-resources --total-params 6.5B --unique-tokens 130B
"""


def _csv(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="parameter/FLOP ledger and matched dense baselines for a config",
        description="Print parameters by component (total and active), the activation rate r_a, FLOPs per "
        "token and dense baselines matched to the config's active parameters, total parameters or training "
        "FLOPs (width resized at fixed depth); or an equal-resources family; and the memory each needs per GPU "
        "(weights, gradients, optimizer state, activations). Given a study file, its arms as `study run --dry-run` "
        "derives them, with their cost and memory. Uses the run config's [model], [parallel] and [train]; no torch "
        "needed.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="run config TOML, a bare model config, or a study file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. model.moe.top_k=1")
    p.add_argument("--match", default="all", choices=[*CONTRACTS, "all", "equal-resources"],
                   help="which matched configs to plan (default all = active, total, flops)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("-o", "--output-dir", "--write-dir", dest="write_dir",
                   help="write each matched run config as TOML (plus source.toml, plan.json) here")
    p.add_argument("--multiple-of", type=int, default=8,
                   help="resized widths are multiples of this (default 8; FP8 and grouped GEMM want 16)")
    p.add_argument("--resize", default="ffn", choices=["ffn", "ffn+hidden"],
                   help="dense widths to resize (default ffn)")
    p.add_argument("--count", default="non-embedding", choices=["non-embedding", "all"],
                   help="parameters the active/total contracts compare (default non-embedding)")
    p.add_argument("--causal-attention", action="store_true", help="count (S+1)/2 keys per query instead of S")
    p.add_argument("--gpus", type=int, help="world size the memory is estimated for (default: a study's "
                   "study.nproc_per_node, else the fewest GPUs the layout runs on)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="say whether each config fits in this much per GPU, e.g. 80GB "
                   "(GB and GiB both mean 2^30 bytes; default: the assumed GPU's, 80GB)")
    er = p.add_argument_group("equal-resources family (--match equal-resources)")
    er.add_argument("--r-a", type=_csv(float), default=DEFAULT_R_A_GRID,
                    help=f"activation rates (default {','.join(map(str, DEFAULT_R_A_GRID))})")
    # counts as researchers write them (6.5e9, 6.5B, 130B, 1_000_000); parsed in plan_main so that a bad one is
    # refused in one line rather than with argparse's usage text
    er.add_argument("--total-params", help="N, non-embedding parameters, e.g. 6.5B or 6.5e9 (default: the config's)")
    er.add_argument("--unique-tokens", help="D, the unique-token budget, e.g. 130B (default tokens-per-param x N)")
    er.add_argument("--tokens-per-param", type=float, default=20.0, help="D / N when --unique-tokens is not given")
    er.add_argument("--top-k", type=_csv(int), default=(2, 3, 4, 6, 8), help="top-k choices (default 2,3,4,6,8)")
    er.add_argument("--max-experts", type=int, default=256, help="largest expert count tried (default 256)")

    p.set_defaults(func=plan_main)


def plan_main(args: argparse.Namespace) -> int:
    from megatron_moe.planner.format import format_plan
    from megatron_moe.planner.plan import load_plan_config, plan_config
    from megatron_moe.text import parse_count

    counts = {name: None if text is None else parse_count(text, f"--{name.replace('_', '-')}")
              for name, text in (("total_params", args.total_params), ("unique_tokens", args.unique_tokens))}
    from megatron_moe.planner.cost import ASSUMED_GPU, memory_limit
    from megatron_moe.schema import load_toml
    from megatron_moe.text import parse_memory

    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus = {args.gpus} must be >= 1")
    limit = memory_limit(None if args.gpu_memory is None else parse_memory(args.gpu_memory, "--gpu-memory"),
                         ASSUMED_GPU)
    check_output_dir(args.write_dir, "--output-dir")
    if "study" in load_toml(args.config):
        return _plan_study(args, limit)
    from megatron_moe.data.source import with_data_vocabulary

    run_cfg = with_data_vocabulary(load_plan_config(args.config, args.overrides, args.gpus))
    family = None
    if args.match == "equal-resources":
        family = dict(r_a_grid=tuple(args.r_a), total_params=counts["total_params"], unique_tokens=counts["unique_tokens"],
                      tokens_per_param=args.tokens_per_param, top_k_choices=tuple(args.top_k),
                      max_experts=args.max_experts)
    contracts = CONTRACTS if args.match == "all" else (args.match,) if args.match in CONTRACTS else ()
    plan = plan_config(run_cfg, contracts, equal_resources=family, multiple_of=args.multiple_of, resize=args.resize,
                       count=args.count.replace("-", "_"), causal_attention=args.causal_attention,
                       world_size=args.gpus)
    plan_dict = plan.to_dict(str(args.config))
    if args.write_dir is not None:
        plan_dict = plan.write(Path(args.write_dir), str(args.config))
    if args.json:
        print(json.dumps(plan_dict, indent=2))
        return 0
    print(format_plan(plan, str(args.config), limit))
    if args.write_dir is not None:
        print(f"\nwrote {len(plan.arms)} run configs, source.toml and plan.json to {args.write_dir}")
        changed = [name for name, cfg in plan.arms.items() if cfg.parallel != run_cfg.parallel]
        if changed:
            print(f"note: parallel.expert set to 1 in {', '.join(changed)} (a dense model has no experts)")
    return 0


def _plan_study(args: argparse.Namespace, limit: tuple[int | None, str]) -> int:
    """A study file: its arms as `study run` derives them, their cost and their memory per GPU."""
    from megatron_moe.planner.format import format_memory
    from megatron_moe.study.design import design_study, family_line, format_arms
    from megatron_moe.study.spec import load_study

    if args.write_dir is not None or args.match != "all":
        raise ConfigError(f"{args.config} is a study file: its [study] table picks the arms, so --match and "
                          "--output-dir do not apply (plan a run config for those)")
    cfg = load_study(args.config, args.overrides, check_world=False)
    design = design_study(cfg, check_world=False)
    world = args.gpus or cfg.study.nproc_per_node
    for run in design.runs:
        validate(run.config, world)
    memory = {a.name: a.memory(world, on_gpu=True) for a in design.arms}
    if args.json:
        print(json.dumps({
            "study": cfg.study.name, "config": args.config, "world_size": world, "family": design.family,
            "arms": [{"name": a.name, "contract": a.contract, "train_steps": a.config.train.train_steps,
                      "train_flops": a.train_flops, "gpu_hours": a.gpu_hours, "ledger": a.ledger.to_dict(),
                      "memory": memory[a.name].to_dict()} for a in design.arms],
            "runs": len(design.runs), "warnings": design.warnings}, indent=2))
        return 0
    print(f"study {cfg.study.name}: {len(design.arms)} arms x {len(cfg.study.seeds)} seeds = {len(design.runs)} runs "
          f"of {world} GPUs each")
    print(format_arms(design, world, on_gpu=True))
    if line := family_line(design):
        print(line)
    print()
    print(format_memory(memory, limit))
    for w in design.warnings:
        print(f"warning: {w}")
    return 0
