"""The `megatron-moe` command line: one subcommand per verb.

Heavy imports (torch, megatron-core) happen inside the subcommand that needs them, so `--help` and the
planner stay fast.
"""

from __future__ import annotations

import argparse
import logging
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


# ---------------------------------------------------------------- data (owner: data layer, issue #4)

DATA_EPILOG = """examples:
  megatron-moe data prepare corpus.jsonl.xz -o data/mycorpus --vocab-size 8192 --workers 2
  megatron-moe data prepare stories.txt.xz -o data/ts --valid-input valid.txt.xz --tokenizer tokenizer.json
  megatron-moe data inspect data/ts --seq-length 256 --unique-tokens 1000000 --epochs 4
  megatron-moe data inspect                      # the built-in synthetic corpus
"""


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="prepare and inspect tokenized datasets",
        description="Tokenize corpora into megatron-core .bin/.idx datasets and inspect data-reuse schedules.",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="data_command", required=True, metavar="VERB")

    prep = verbs.add_parser(
        "prepare",
        help="tokenize text / JSON lines into a prepared dataset directory",
        description="Inputs: plain text with documents separated by --separator (default a line\n"
        "<|endoftext|>), JSON lines with a --text-key field, or directories of them; .xz/.gz/.bz2\n"
        "are read directly. The train/validation split is by a hash of each document's text.",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("inputs", nargs="+", help="input files or directories")
    prep.add_argument("-o", "--output", required=True, help="output dataset directory (must not exist)")
    prep.add_argument("--tokenizer", help="tokenizer.json, SentencePiece *.model or *.tiktoken (default: train a BPE)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="vocab size of a trained BPE (default 8192)")
    prep.add_argument("--eod-token", help="end-of-document token of a loaded tokenizer (default: auto-detect)")
    prep.add_argument("--text-key", default="text", help="JSON field holding the text (default text)")
    prep.add_argument("--separator", default="<|endoftext|>", help="document separator in plain text")
    prep.add_argument("--valid-fraction", type=float, default=0.01, help="held-out fraction of documents")
    prep.add_argument("--valid-input", action="append", help="file/dir of validation documents (repeatable)")
    prep.add_argument("--split-seed", type=int, default=0, help="key of the split hash (default 0)")
    prep.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    prep.add_argument("--force", action="store_true", help="replace an existing output directory")
    prep.add_argument("--quiet", action="store_true", help="no progress display")

    def run_prepare(args: argparse.Namespace) -> int:
        from megatron_moe.data import prepare_main

        return prepare_main(args)

    prep.set_defaults(func=run_prepare)

    insp = verbs.add_parser(
        "inspect",
        help="print a dataset's counts and a schedule's tokens, epochs and fingerprint",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    insp.add_argument("path", nargs="?", help="prepared dataset directory (omit for the synthetic corpus)")
    insp.add_argument("--config", help="take data, seq_length, global batch and train steps from a run config")
    insp.add_argument("--seq-length", type=int, help="sequence length (default 256)")
    insp.add_argument("--global-batch-size", type=int, help="sequences per step (default 8)")
    insp.add_argument("--train-steps", type=int, help="steps of the run (for consumed tokens when unbounded)")
    insp.add_argument("--seed", type=int, help="data order seed")
    insp.add_argument("--unique-tokens", type=int, help="unique-token budget (0 = all)")
    insp.add_argument("--epochs", type=float, help="passes over the unique tokens")
    insp.add_argument("--consumed-tokens", type=int, help="total tokens of the schedule")
    insp.add_argument("--verify", action="store_true", help="verify every file's sha256 against the manifest")
    insp.add_argument("--json", action="store_true", help="print the description as JSON")

    def run_inspect(args: argparse.Namespace) -> int:
        from megatron_moe.data import inspect_main

        return inspect_main(args)

    insp.set_defaults(func=run_inspect)


# ---------------------------------------------------------------- plan (owner: planner, issue #3)

PLAN_EPILOG = """examples:
  megatron-moe plan examples/tiny_moe.toml                      # ledger + active/total/flops-matched dense
  megatron-moe plan examples/tiny_moe.toml --match active --json
  megatron-moe plan examples/tiny_moe.toml --resize ffn+hidden --multiple-of 16 --write-dir runs/plan
  megatron-moe plan examples/tiny_moe.toml --match equal-resources --r-a 0.2,0.3,0.5 --tokens-per-param 20
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
        "FLOPs (width resized at fixed depth); or an equal-resources family. Uses the run config's [model] "
        "and [parallel]; no torch needed.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="run config TOML (or a bare model config)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. model.moe.top_k=1")
    p.add_argument("--match", default="all", choices=["active", "total", "flops", "all", "equal-resources"],
                   help="which matched configs to plan (default all = active, total, flops)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--write-dir", help="write each matched run config as TOML (plus source.toml, plan.json)")
    p.add_argument("--multiple-of", type=int, default=8,
                   help="resized widths are multiples of this (default 8; FP8 and grouped GEMM want 16)")
    p.add_argument("--resize", default="ffn", choices=["ffn", "ffn+hidden"],
                   help="dense widths to resize (default ffn)")
    p.add_argument("--count", default="non-embedding", choices=["non-embedding", "all"],
                   help="parameters the active/total contracts compare (default non-embedding)")
    p.add_argument("--causal-attention", action="store_true", help="count (S+1)/2 keys per query instead of S")
    er = p.add_argument_group("equal-resources family (--match equal-resources)")
    er.add_argument("--r-a", type=_csv(float), default=(0.1, 0.15, 0.2, 0.25, 0.3),
                    help="activation rates (default 0.1,0.15,0.2,0.25,0.3)")
    er.add_argument("--total-params", type=int, help="N, non-embedding parameters (default: the config's)")
    er.add_argument("--unique-tokens", type=int, help="D, the unique-token budget (default tokens-per-param x N)")
    er.add_argument("--tokens-per-param", type=float, default=20.0, help="D / N when --unique-tokens is not given")
    er.add_argument("--top-k", type=_csv(int), default=(2, 3, 4, 6, 8), help="top-k choices (default 2,3,4,6,8)")
    er.add_argument("--max-experts", type=int, default=256, help="largest expert count tried (default 256)")

    def run(args: argparse.Namespace) -> int:
        from megatron_moe.planner import plan_main

        return plan_main(
            args.config, args.overrides, match=args.match, as_json=args.json, write_dir=args.write_dir,
            multiple_of=args.multiple_of, resize=args.resize, count=args.count.replace("-", "_"),
            causal_attention=args.causal_attention, r_a_grid=args.r_a, total_params=args.total_params,
            unique_tokens=args.unique_tokens, tokens_per_param=args.tokens_per_param,
            top_k_choices=args.top_k, max_experts=args.max_experts,
        )

    p.set_defaults(func=run)


# ---------------------------------------------------------------- study (owner: studies, issue #6)

STUDY_EPILOG = """examples:
  megatron-moe study run examples/tiny_three_arm/cpu.toml             # 3 arms x 3 seeds on CPU, ~15 min
  megatron-moe study run examples/tiny_three_arm/cpu.toml --dry-run   # derived arms, runs and their status
  megatron-moe study run examples/tiny_three_arm/cpu.toml study.seeds=[1] study.budget_tokens=40960 -o runs/quick
  megatron-moe study run examples/equal_resources/cpu.toml data.path=data/tinystories model.vocab_size=4096
  megatron-moe study report runs/study/tiny_three_arm_cpu            # report.md, report.html, results.json
"""


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study",
        help="run and report dense-vs-MoE studies (arms derived by the planner, several seeds)",
        description="A study file is a base MoE run config plus a [study] table naming the arms by contract, "
        "the seeds and the budget. `run` trains every (arm, seed) in its own process, skipping complete runs "
        "and resuming partial ones; `report` turns the run directories into tables, plots and statistics.",
        epilog=STUDY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="study_command", required=True, metavar="VERB")
    run = verbs.add_parser("run", help="train every (arm, seed) of a study; idempotent", epilog=STUDY_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("study", help="study TOML")
    run.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. study.seeds=[1,2]")
    run.add_argument("-o", "--output-dir", help="study directory (default study.output_dir, else runs/study/<name>)")
    run.add_argument("--dry-run", action="store_true", help="derive arms and runs, check the data, train nothing")
    run.add_argument("--keep-going", action="store_true", help="go on to the next run when one fails")
    run.add_argument("--quiet", action="store_true", help="do not echo the trainer's output")

    def do_run(args: argparse.Namespace) -> int:
        from megatron_moe.study import run_main

        return run_main(args.study, args.overrides, output_dir=args.output_dir, keep_going=args.keep_going,
                        dry_run=args.dry_run, quiet=args.quiet)

    run.set_defaults(func=do_run)
    rep = verbs.add_parser("report", help="tables, plots and paired statistics of a study directory",
                           epilog=STUDY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("dir", help="study directory (holding study.json)")
    rep.add_argument("-o", "--output-dir", help="where to write the report (default: the study directory)")
    rep.add_argument("--confidence", type=float, default=0.95, help="confidence level of the t intervals (default 0.95)")

    def do_report(args: argparse.Namespace) -> int:
        from megatron_moe.report import report_main

        return report_main(args.dir, args.output_dir, args.confidence)

    rep.set_defaults(func=do_report)
    _add_study_launch(verbs)


# ---------------------------------------------------------------- study launch (owner: launch, issue #8)

LAUNCH_EPILOG = """examples:
  megatron-moe study launch examples/tiny_three_arm/cpu.toml --slurm --dry-run   # render scripts, submit nothing
  megatron-moe study launch study.toml --slurm --nodes 2 --gpus-per-node 8 --partition batch --account proj \\
      --time 04:00:00 --container-image nvcr.io#nvidia/pytorch:26.04-py3 --container-mounts /lustre:/lustre
  megatron-moe study launch study.toml --slurm --array --max-parallel 4 --launch-config cluster.toml
  scancel --signal=USR1 --batch JOBID     # checkpoint now and requeue (what --signal-seconds does before --time)
"""


def _add_study_launch(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "launch",
        help="submit every (arm, seed) of a study as SLURM jobs (srun + torchrun); idempotent",
        description="Render one sbatch script per run (saved in its run directory) or one job array, and submit "
        "them. World size = --nodes x processes per node; the run config fixes tensor/pipeline/expert, data "
        "parallel takes the rest. Before --time runs out the job checkpoints and requeues itself; it resumes "
        "where it stopped. Complete runs and runs still queued are skipped; `study run` and `study report` work "
        "on the same run directories. Options may also come from a --launch-config TOML (keys = option names "
        "with underscores); flags override it.",
        epilog=LAUNCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", help="study TOML")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. study.seeds=[1,2]")
    p.add_argument("--slurm", action="store_true", help="submit to SLURM (the only scheduler supported)")
    p.add_argument("-o", "--output-dir", help="study directory (default study.output_dir, else runs/study/<name>)")
    p.add_argument("--dry-run", action="store_true", help="render and save the scripts, submit nothing")
    p.add_argument("--skip-data-check", action="store_true", help="do not build each arm's data source first")
    p.add_argument("--launch-config", help="TOML of launch options (a cluster profile); flags override it")
    g = p.add_argument_group("layout")
    g.add_argument("--nodes", type=int, help="nodes per run (default 1)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 0 = CPU job); default processes per node")
    g.add_argument("--nproc-per-node", type=int, help="trainer processes per node (default: --gpus-per-node, "
                   "else study.nproc_per_node)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per node task (default: SLURM's)")
    g.add_argument("--mem", help="memory per node, e.g. 200G (default: SLURM's)")
    g.add_argument("--exclusive", action="store_true", default=None, help="whole nodes")
    g.add_argument("--master-port", type=int, help="rendezvous port (default 20000 + job id mod 20000)")
    g = p.add_argument_group("queue")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--time", help="time limit per attempt, e.g. 04:00:00 or 1-00:00:00")
    g.add_argument("--signal-seconds", type=int, help="USR1 this long before --time: checkpoint and requeue "
                   "(default 300)")
    g.add_argument("--array", action="store_true", default=None, help="one job array over the runs")
    g.add_argument("--max-parallel", type=int, help="job array: at most this many runs at once")
    g.add_argument("--sbatch-arg", dest="sbatch_args", action="append", metavar="OPT",
                   help="extra #SBATCH option, e.g. --sbatch-arg=--constraint=h100 (repeatable)")
    g = p.add_argument_group("environment")
    g.add_argument("--container-image", help="container image for the training step (pyxis/enroot)")
    g.add_argument("--container-mounts", help="srun --container-mounts, e.g. /lustre:/lustre")
    g.add_argument("--python", help="python on the compute nodes (default: this one; `python` in a container)")
    g.add_argument("--workdir", help="directory the job runs in and puts on PYTHONPATH (default: this checkout)")
    g.add_argument("--setup", action="append", metavar="LINE", help="shell line run before training (repeatable)")
    g.add_argument("--srun-arg", dest="srun_args", action="append", metavar="OPT",
                   help="extra option of the training srun (repeatable)")
    g.add_argument("--log-dir", help="job logs (default: each run directory; <study>/slurm for arrays)")

    launch_flags = ("nodes", "gpus_per_node", "nproc_per_node", "cpus_per_task", "mem", "exclusive", "master_port",
                    "partition", "account", "qos", "time", "signal_seconds", "array", "max_parallel", "sbatch_args",
                    "container_image", "container_mounts", "python", "workdir", "setup", "srun_args", "log_dir")

    def run(args: argparse.Namespace) -> int:
        from megatron_moe.launch import launch_main

        return launch_main(args.study, args.overrides, output_dir=args.output_dir, slurm=args.slurm,
                           dry_run=args.dry_run, data_check=not args.skip_data_check,
                           launch_config=args.launch_config, flags={k: getattr(args, k) for k in launch_flags})

    p.set_defaults(func=run)


# ---------------------------------------------------------------- bench (issues #5, #7)

BENCH_EPILOG = """examples:
  megatron-moe bench examples/bench/cpu.toml --out runs/bench-cpu       # MoE + active-matched dense, CPU
  megatron-moe bench examples/bench/cpu.toml model.moe.num_experts=0    # the dense model alone
  megatron-moe bench examples/tiny_three_arm/gpu.toml --out runs/bench-arms   # every arm of a study
  megatron-moe bench examples/bench/gpu_1b_dense.toml train.precision=fp8 --baseline none
"""


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="tokens/s, TFLOP/s and MFU of our megatron-core path against the same model in plain PyTorch",
        description="Measure training throughput of a run config (an MoE also gets its active-parameter-"
        "matched dense model) or of every arm of a study config, each in a fresh single-device process, "
        "against the same model written in plain PyTorch (eager on CPU, torch.compile on GPU by default). "
        "Prints a Markdown table; with --out writes bench.json and bench.md.",
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
    p.add_argument("--out", help="directory for bench.json and bench.md")

    def run(args: argparse.Namespace) -> int:
        from megatron_moe.bench import bench

        config, overrides = _split_config(args.config, args.overrides)
        try:
            bench(config, overrides, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                  baseline=args.baseline, out_dir=args.out)
        except RuntimeError as exc:
            print(f"megatron-moe: error: {exc}", file=sys.stderr)
            return 1
        return 0

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
    _add_data(sub)
    _add_plan(sub)
    _add_study(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A CUDA build of torch on a machine without a GPU (a cluster's login node) logs "No CUDA runtime is
    # found" when megatron-core imports torch.utils.cpp_extension: noise on every command, and it would
    # break the one-line error contract.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
