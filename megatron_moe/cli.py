"""The `megatron-moe` command line: one subcommand per verb.

Heavy imports (torch, megatron-core) happen inside the subcommand that needs them, so `--help` and the
planner stay fast.
"""

from __future__ import annotations

import argparse
import sys

from megatron_moe.config import ConfigError

EPILOG = """examples:
  megatron-moe train examples/tiny_moe.toml                   # tiny MoE on CPU
  megatron-moe train examples/tiny_moe.toml train.train_steps=50 model.moe.top_k=1
  torchrun --nproc-per-node 2 -m megatron_moe.cli train examples/tiny_moe.toml parallel.expert=2
"""


def _split_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`train key=value` without a config file: the first positional is an override, not a path."""
    if config is not None and "=" in config and not config.endswith(".toml"):
        return None, [config, *overrides]
    return config, overrides


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

    def run(args: argparse.Namespace) -> int:
        from megatron_moe.training import train_main

        config, overrides = _split_config(args.config, args.overrides)
        return train_main(config, overrides)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-moe",
        description="Fair dense-versus-MoE pretraining studies on Megatron-Core.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
