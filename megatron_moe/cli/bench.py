"""`megatron-moe bench`: training throughput against plain PyTorch."""

from __future__ import annotations

import argparse
import sys

from megatron_moe.cli.common import check_output_dir, split_config

BENCH_EPILOG = """examples:
  megatron-moe bench examples/bench/cpu.toml -o runs/bench-cpu       # MoE + active-matched dense, CPU
  megatron-moe bench examples/bench/cpu.toml model.moe.num_experts=0    # the dense model alone
  megatron-moe bench examples/tiny_three_arm/gpu.toml -o runs/bench-arms   # every arm of a study
  megatron-moe bench examples/bench/gpu_1b_dense.toml train.precision=fp8 --baseline none
"""


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="tokens/s, TFLOP/s and MFU of our megatron-core path against the same model in plain PyTorch",
        description="Measure training throughput of a run config (an MoE also gets its active-parameter-"
        "matched dense model) or of every arm of a study config, each in a fresh single-device process, "
        "against the same model written in plain PyTorch (eager on CPU, torch.compile on GPU by default). "
        "Prints a Markdown table; with -o writes bench.json and bench.md.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="run or study config TOML (omit for the built-in tiny MoE)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps per measurement (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="alternating fresh-process measurements per path (default 2)")
    p.add_argument("--baseline", default="auto", help="plain-PyTorch baseline: auto (compile on GPU, eager on CPU), "
                   "eager, compile or none")
    p.add_argument("-o", "--output-dir", "--out", dest="out", help="directory for bench.json and bench.md")

    p.set_defaults(func=bench_main)


def bench_main(args: argparse.Namespace) -> int:
    from megatron_moe.bench.measure import bench

    check_output_dir(args.out, "--output-dir")
    config, overrides = split_config(args.config, args.overrides)
    try:
        bench(config, overrides, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
              baseline=args.baseline, out_dir=args.out)
    except RuntimeError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
    return 0
