"""`megatron-moe train`: one run on this process (one rank of a torchrun job, or alone)."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_moe.cli.common import check_output_dir, split_config

EPILOG = """examples:
  megatron-moe train examples/tiny_moe.toml                   # tiny MoE on CPU
  megatron-moe train examples/tiny_moe.toml train.train_steps=50 model.moe.top_k=1
  torchrun --nproc-per-node 2 -m megatron_moe.cli train examples/tiny_moe.toml parallel.expert=2
"""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one dense or MoE GPT model",
        description="Train one model through megatron-core. Run under torchrun for several processes "
        "(gloo on CPU, NCCL on GPU). Writes metrics.jsonl and result.json to train.output_dir.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="run config TOML (omit for the built-in tiny MoE defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-3")
    p.set_defaults(func=train_main)


def train_main(args: argparse.Namespace) -> int:
    from megatron_moe.config import load_run_config
    from megatron_moe.data.source import with_data_vocabulary
    from megatron_moe.train.stop import (
        PREEMPTED_EXIT_CODE,
        Preempted,
        StopFlag,
        TrainingError,
        forked_children_die_with_this_process,
        survive_lost_output,
    )

    # Caught from here on, before torch is imported: a stop signal during start-up ends in a clean stop too.
    stop = StopFlag()
    forked_children_die_with_this_process()
    survive_lost_output()  # a runner killed with its pipe must not cost this trainer its last checkpoint
    # The config is checked before the heavy imports, so a bad one is refused at once.
    config, overrides = split_config(args.config, args.overrides)
    cfg = with_data_vocabulary(load_run_config(config, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    check_output_dir(cfg.train.output_dir, "train.output_dir")
    from megatron_moe.parallel import destroy_parallel
    from megatron_moe.train.trainer import train

    try:
        train(cfg, stop=stop)
    except TrainingError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"megatron-moe: {exc}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    finally:
        destroy_parallel()
    return 0
