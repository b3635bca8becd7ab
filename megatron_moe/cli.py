"""The `megatron-moe` command line: one subcommand per verb, each a thin handler over library functions.

Every handler imports what it needs when it runs, so `--help` and the planner start without torch. Errors the
user can fix (`ConfigError`) are one line on stderr with exit code 2; `TrainingError` and `LaunchError` exit 1;
a trainer stopped by a signal exits with `train.stop.PREEMPTED_EXIT_CODE`. The module is long because it is the
whole command line, every subcommand's parser and handler, and nothing else.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path

from megatron_moe import __version__
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
    p.set_defaults(func=train_main)


def _check_output_dir(path: str | None, what: str) -> None:
    """An output directory that cannot be one is refused before any work (an empty name would mean here)."""
    if path is None:
        return
    if not path.strip():
        raise ConfigError(f"{what} is empty; name the directory to write to")
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{what} = {path!r} is an existing file, not a directory")


def train_main(args: argparse.Namespace) -> int:
    from megatron_moe.config import load_run_config
    from megatron_moe.train.stop import (
        PREEMPTED_EXIT_CODE, Preempted, StopFlag, TrainingError, forked_children_die_with_this_process,
        survive_lost_output,
    )

    # Caught from here on, before torch is imported: a stop signal during start-up ends in a clean stop too.
    stop = StopFlag()
    forked_children_die_with_this_process()
    survive_lost_output()  # a runner killed with its pipe must not cost this trainer its last checkpoint
    # The config is checked before the heavy imports, so a bad one is refused at once.
    config, overrides = _split_config(args.config, args.overrides)
    cfg = load_run_config(config, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    _check_output_dir(cfg.train.output_dir, "train.output_dir")
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


# ---------------------------------------------------------------- data

DATA_EPILOG = """examples:
  megatron-moe data prepare corpus.jsonl.xz -o data/mycorpus --vocab-size 8192 --workers 2
  megatron-moe data prepare stories.txt.xz -o data/ts --valid-input valid.txt.xz --tokenizer tokenizer.json
  megatron-moe data import /data/megatron/corpus_text_document -o data/imported --tokenizer gpt2
  megatron-moe data inspect data/ts --seq-length 256 --unique-tokens 1000000 --epochs 4
  megatron-moe data inspect                      # the built-in synthetic corpus
  megatron-moe data inspect --corpus tinystories # the built-in real text
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
    prep.add_argument("-o", "--output-dir", "--output", dest="output", required=True,
                      help="output dataset directory (must not exist)")
    prep.add_argument("--tokenizer", help="tokenizer.json (or its directory), a Hugging Face Hub model name, SentencePiece "
                      "*.model or *.tiktoken (default: train a BPE)")
    prep.add_argument("--vocab-size", type=int, default=8192, help="vocab size of a trained BPE (default 8192)")
    prep.add_argument("--eod-token", help="end-of-document token of a loaded tokenizer (default: auto-detect)")
    prep.add_argument("--text-key", default="text", help="JSON field or Parquet column holding the text (default text)")
    prep.add_argument("--separator", default="<|endoftext|>", help="document separator in plain text")
    prep.add_argument("--line-documents", action="store_true", help="plain text: each non-empty line is a document")
    prep.add_argument("--valid-fraction", type=float, default=0.01, help="held-out fraction of documents")
    prep.add_argument("--valid-input", action="append", help="file/dir of validation documents (repeatable)")
    prep.add_argument("--split-seed", type=int, default=0, help="key of the split hash (default 0)")
    prep.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    prep.add_argument("--force", action="store_true", help="replace an existing output directory")
    prep.add_argument("--quiet", action="store_true", help="no progress display")

    prep.set_defaults(func=prepare_main)

    imp = verbs.add_parser(
        "import",
        help="turn a Megatron-LM tokenized dataset (PREFIX.bin/.idx) into a prepared dataset, no re-tokenizing",
        description="Reads a megatron-core indexed dataset written by Megatron-LM's preprocessing (one sequence per "
        "document), appends the end-of-document token where missing, and writes a prepared dataset (manifest, "
        "train/validation split, checksums). --tokenizer must be the one the data was tokenized with.",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("prefix", help="Megatron-LM dataset prefix (PREFIX.bin and PREFIX.idx)")
    imp.add_argument("-o", "--output-dir", dest="output", required=True, help="output dataset directory (must not exist)")
    imp.add_argument("--tokenizer", required=True, help="tokenizer.json (or a directory or Hub name), *.model, *.tiktoken")
    imp.add_argument("--eod-token", help="end-of-document token of the tokenizer (default: auto-detect)")
    imp.add_argument("--valid-prefix", help="a second Megatron-LM prefix to use as the validation split")
    imp.add_argument("--valid-fraction", type=float, default=0.01, help="held-out fraction when no --valid-prefix")
    imp.add_argument("--split-seed", type=int, default=0, help="key of the split hash (default 0)")
    imp.add_argument("--force", action="store_true", help="replace an existing output directory")
    imp.add_argument("--quiet", action="store_true", help="no progress display")
    imp.set_defaults(func=import_main)

    insp = verbs.add_parser(
        "inspect",
        help="print a dataset's counts and a schedule's tokens, epochs and fingerprint",
        epilog=DATA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    insp.add_argument("path", nargs="?", help="prepared dataset directory (omit for a built-in corpus)")
    insp.add_argument("--corpus", choices=["synthetic", "tinystories"], help="built-in corpus when no path is given")
    insp.add_argument("--config", help="take data, seq_length, global batch and train steps from a run config")
    insp.add_argument("--seq-length", type=int, help="sequence length (default 256)")
    insp.add_argument("--global-batch-size", type=int, help="sequences per step (default 8)")
    insp.add_argument("--train-steps", type=int, help="steps of the run (for consumed tokens when unbounded)")
    insp.add_argument("--seed", type=int, help="data order seed")
    insp.add_argument("--unique-tokens", type=int, help="unique-token budget (0 = all)")
    insp.add_argument("--epochs", type=float, help="passes over the unique tokens")
    insp.add_argument("--consumed-tokens", type=int, help="total tokens of the schedule")
    insp.add_argument("--verify", action="store_true",
                      help="verify every file's sha256 against the manifest and every token id against the vocabulary")
    insp.add_argument("--json", action="store_true", help="print the description as JSON")

    insp.set_defaults(func=inspect_main)


def prepare_main(args: argparse.Namespace) -> int:
    from megatron_moe.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    m = prepare_dataset(
        args.inputs, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size, eod_token=args.eod_token,
        text_key=args.text_key, separator=args.separator, line_documents=args.line_documents,
        valid_fraction=args.valid_fraction,
        valid_inputs=args.valid_input or [], split_seed=args.split_seed, workers=args.workers, force=args.force,
        progress=not args.quiet,
    )
    secs = time.perf_counter() - t0
    tr, va = m["splits"]["train"], m["splits"]["valid"]
    print(f"wrote {args.output}: {m['documents']:,} documents ({tr['documents']:,} train, {va['documents']:,} valid), "
          f"{m['tokens']:,} tokens, {m['bytes'] / 1e6:.2f} MB, {m['bytes_per_token']:.3f} bytes/token, "
          f"vocab {m['tokenizer']['vocab_size']:,}, {secs:.1f} s ({m['bytes'] / 1e6 / secs:.2f} MB/s)")
    if m["skipped_empty_documents"]:
        print(f"skipped {m['skipped_empty_documents']:,} empty documents")
    return 0


def import_main(args: argparse.Namespace) -> int:
    from megatron_moe.data.interop import import_megatron

    m = import_megatron(args.prefix, args.output, tokenizer=args.tokenizer, eod_token=args.eod_token,
                        valid_prefix=args.valid_prefix, valid_fraction=args.valid_fraction,
                        split_seed=args.split_seed, force=args.force, progress=not args.quiet)
    tr, va = m["splits"]["train"], m["splits"]["valid"]
    print(f"wrote {args.output}: {m['documents']:,} documents ({tr['documents']:,} train, {va['documents']:,} valid), "
          f"{m['tokens']:,} tokens, {m['bytes_per_token']:.3f} bytes/token, vocab {m['tokenizer']['vocab_size']:,}")
    return 0


def inspect_main(args: argparse.Namespace) -> int:
    from megatron_moe.config import DataConfig, load_run_config
    from megatron_moe.data.source import build_data_source
    from megatron_moe.data.store import verify_dataset

    seq_length, gbs, steps = 256, 8, None
    cfg = DataConfig()
    if args.config:
        run = load_run_config(args.config)
        cfg, seq_length, gbs, steps = run.data, run.model.seq_length, run.train.global_batch_size, run.train.train_steps
    if args.path is not None:
        cfg.path = args.path
    for name in ("corpus", "seed", "unique_tokens", "epochs", "consumed_tokens"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for name in ("seq_length", "global_batch_size", "train_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    seq_length = args.seq_length or seq_length
    gbs = args.global_batch_size or gbs
    steps = args.train_steps if args.train_steps is not None else steps
    ds = build_data_source(cfg, seq_length, gbs, steps)
    if args.verify:
        verify_dataset(ds.path, ds.manifest)
    info = ds.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = ds.manifest
    fmt = lambda v: "unbounded" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4g}"  # noqa: E731
    rows = [
        ("dataset", f"{info['source']} ({ds.path})" if ds.builtin else info["source"]),
        ("tokenizer", f"{m['tokenizer']['kind']}, vocab {ds.vocab_size:,}, eod {ds.eod_id}, "
                      f"sha256 {m['tokenizer']['sha256'][:12]}"),
        ("documents", f"{m['documents']:,} ({info['train_documents']:,} train, {info['valid_documents']:,} valid)"),
        ("tokens", f"{m['tokens']:,} ({info['train_tokens']:,} train, {info['valid_tokens']:,} valid)"),
        ("bytes/token", f"{ds.bytes_per_token:.4f} (validation split)"),
        ("sequence", f"seq_length {seq_length}, global batch {gbs}, seed {cfg.seed}"),
        ("unique", f"{info['unique_tokens']:,} tokens in {info['unique_documents']:,} documents"
                   + (f" (budget {cfg.unique_tokens:,})" if cfg.unique_tokens else " (all)")),
        ("schedule", f"{fmt(info['schedule_tokens'])} tokens, {fmt(info['schedule_samples'])} samples, "
                     f"{fmt(info['num_steps'])} steps"),
        ("consumed", f"{fmt(info['consumed_tokens'])} tokens" + ("" if steps is None else f" ({steps} train steps)")),
        ("epochs", fmt(info["epochs"])),
        ("fingerprint", info["fingerprint"]),
    ]
    if args.verify:
        rows.append(("checksums", "verified"))
    for k, v in rows:
        print(f"{k:>12}  {v}")
    return 0


# ---------------------------------------------------------------- plan

PLAN_EPILOG = """examples:
  megatron-moe plan examples/tiny_moe.toml                      # ledger + active/total/flops-matched dense
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
    p.add_argument("-o", "--output-dir", "--write-dir", dest="write_dir",
                   help="write each matched run config as TOML (plus source.toml, plan.json) here")
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
    # counts as researchers write them (6.5e9, 6.5B, 130B, 1_000_000); parsed in plan_main so that a bad one is
    # refused in one line rather than with argparse's usage text
    er.add_argument("--total-params", help="N, non-embedding parameters, e.g. 6.5B or 6.5e9 (default: the config's)")
    er.add_argument("--unique-tokens", help="D, the unique-token budget, e.g. 130B (default tokens-per-param x N)")
    er.add_argument("--tokens-per-param", type=float, default=20.0, help="D / N when --unique-tokens is not given")
    er.add_argument("--top-k", type=_csv(int), default=(2, 3, 4, 6, 8), help="top-k choices (default 2,3,4,6,8)")
    er.add_argument("--max-experts", type=int, default=256, help="largest expert count tried (default 256)")

    p.set_defaults(func=plan_main)


def plan_main(args: argparse.Namespace) -> int:
    from megatron_moe.planner.format import format_plan, parse_count
    from megatron_moe.planner.match import CONTRACTS
    from megatron_moe.planner.plan import load_plan_config, plan_config

    counts = {name: None if text is None else parse_count(text, f"--{name.replace('_', '-')}")
              for name, text in (("total_params", args.total_params), ("unique_tokens", args.unique_tokens))}
    _check_output_dir(args.write_dir, "--output-dir")
    run_cfg = load_plan_config(args.config, args.overrides)
    family = None
    if args.match == "equal-resources":
        family = dict(r_a_grid=tuple(args.r_a), total_params=counts["total_params"], unique_tokens=counts["unique_tokens"],
                      tokens_per_param=args.tokens_per_param, top_k_choices=tuple(args.top_k),
                      max_experts=args.max_experts)
    contracts = CONTRACTS if args.match == "all" else (args.match,) if args.match in CONTRACTS else ()
    plan = plan_config(run_cfg, contracts, equal_resources=family, multiple_of=args.multiple_of, resize=args.resize,
                       count=args.count.replace("-", "_"), causal_attention=args.causal_attention)
    plan_dict = plan.to_dict(str(args.config))
    if args.write_dir is not None:
        plan_dict = plan.write(Path(args.write_dir), str(args.config))
    if args.json:
        print(json.dumps(plan_dict, indent=2))
        return 0
    print(format_plan(plan, str(args.config)))
    if args.write_dir is not None:
        print(f"\nwrote {len(plan.arms)} run configs, source.toml and plan.json to {args.write_dir}")
        changed = [name for name, cfg in plan.arms.items() if cfg.parallel != run_cfg.parallel]
        if changed:
            print(f"note: parallel.expert set to 1 in {', '.join(changed)} (a dense model has no experts)")
    return 0


# ---------------------------------------------------------------- study

STUDY_EPILOG = """examples:
  megatron-moe study run examples/tiny_three_arm/cpu.toml             # 3 arms x 3 seeds on CPU, ~15 min
  megatron-moe study run examples/tiny_three_arm/cpu.toml --dry-run   # derived arms, runs and their status
  megatron-moe study run examples/tiny_three_arm/cpu.toml study.seeds=[1] study.budget_tokens=40960 -o runs/quick
  megatron-moe study run examples/equal_resources/cpu.toml            # r_a family on the built-in TinyStories
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

    run.set_defaults(func=study_run_main)
    rep = verbs.add_parser("report", help="tables, plots and paired statistics of a study directory",
                           epilog=STUDY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("dir", help="study directory (holding study.json)")
    rep.add_argument("-o", "--output-dir", help="where to write the report (default: the study directory)")
    rep.add_argument("--confidence", type=float, default=0.95, help="confidence level of the t intervals (default 0.95)")
    rep.add_argument("--allow-damaged", action="store_true",
                     help="leave out unreadable metrics.jsonl lines anywhere, with a warning (default: only a torn "
                     "last line; any other is refused)")

    rep.set_defaults(func=study_report_main)
    _add_study_launch(verbs)


def study_run_main(args: argparse.Namespace) -> int:
    from megatron_moe.study.runner import run_study
    from megatron_moe.study.slurm import LaunchError
    from megatron_moe.study.spec import load_study

    _check_output_dir(args.output_dir, "--output-dir")
    cfg = load_study(args.study, args.overrides)
    _check_output_dir(cfg.study.output_dir or None, "study.output_dir")
    echo, bar = (lambda line: print(line, flush=True)), None
    if sys.stdout.isatty() and not args.dry_run:  # a bar of complete runs under the lines; plain lines in a log
        from tqdm import tqdm

        bar = tqdm(total=len(cfg.study.seeds), desc="study", unit="run", dynamic_ncols=True, leave=False)
        echo = bar.write

        def on_progress(complete: int, total: int) -> None:
            bar.total, bar.n = total, complete
            bar.refresh()
    try:
        return run_study(cfg, args.output_dir, study_file=str(Path(args.study).resolve()),
                         keep_going=args.keep_going, dry_run=args.dry_run, quiet=args.quiet,
                         echo=echo, on_progress=on_progress if bar is not None else None)
    except LaunchError as exc:  # squeue did not answer about a run launched on SLURM
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()


def study_report_main(args: argparse.Namespace) -> int:
    from megatron_moe.study.report import tables, write_report

    _check_output_dir(args.output_dir, "--output-dir")
    paths = write_report(args.dir, args.output_dir, args.confidence, args.allow_damaged)
    results = json.loads(paths["results.json"].read_text())
    for w in results["warnings"]:
        print(f"WARNING: {w}")
    if results.get("ordering"):
        print(f"\nordering of mean best validation loss: {results['ordering']['line']}")
    for title, _, header, rows in tables(results)[:2]:
        print(f"\n{title}")
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


# ---------------------------------------------------------------- study launch

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
    p.set_defaults(func=study_launch_main, launch_flags=_add_launch_flags(p))


# LaunchConfig fields by help group; a field missing here still gets its flag, under "launch options".
LAUNCH_GROUPS = {
    "layout": ("nodes", "gpus_per_node", "nproc_per_node", "cpus_per_task", "mem", "exclusive", "master_port"),
    "queue": ("partition", "account", "qos", "time", "signal_seconds", "array", "max_parallel", "sbatch_args"),
    "environment": ("container_image", "container_mounts", "python", "workdir", "setup", "srun_args", "log_dir"),
}


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the one place its options are described)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _add_launch_flags(p: argparse.ArgumentParser) -> tuple[str, ...]:
    """One flag per LaunchConfig field, help from its docstring; every default is None (= not given), so a
    --launch-config TOML and then the dataclass defaults fill what the flags leave out."""
    from megatron_moe.study.slurm import LaunchConfig

    docs = _field_docs(LaunchConfig)
    groups = {name: p.add_argument_group(name) for name in LAUNCH_GROUPS}
    fields = dataclasses.fields(LaunchConfig)
    for f in fields:
        group = next((groups[g] for g, names in LAUNCH_GROUPS.items() if f.name in names), None)
        group = group or groups.setdefault("launch options", p.add_argument_group("launch options"))
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        doc = docs.get(f.name, "").removesuffix(".")
        help_text = doc[:1].lower() + doc[1:] + ("" if default in ("", 0, [], False) else f" (default {default})")
        flag = "--" + f.name.removesuffix("_args").replace("_", "-") + ("-arg" if f.name.endswith("_args") else "")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        elif str(f.type).startswith("list"):
            group.add_argument(flag, dest=f.name, action="append", metavar="LINE" if f.name == "setup" else "OPT",
                               help=help_text + " (repeatable)")
        else:
            kind = int if f.type in ("int", int) else str
            group.add_argument(flag, dest=f.name, type=kind, help=help_text)
    return tuple(f.name for f in fields)


def study_launch_main(args: argparse.Namespace) -> int:
    from megatron_moe.study.slurm import LaunchError, launch_study, load_launch_config
    from megatron_moe.study.spec import load_study

    if not args.slurm:
        raise ConfigError("study launch needs a scheduler: add --slurm (the only one supported)")
    _check_output_dir(args.output_dir, "--output-dir")
    lc = load_launch_config(args.launch_config, {k: getattr(args, k) for k in args.launch_flags})
    cfg = load_study(args.study, args.overrides, check_world=False)
    try:
        return launch_study(cfg, lc, args.output_dir, study_file=str(Path(args.study).resolve()),
                            dry_run=args.dry_run, data_check=not args.skip_data_check,
                            echo=lambda line: print(line, flush=True))
    except LaunchError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- bench

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

    _check_output_dir(args.out, "--output-dir")
    config, overrides = _split_config(args.config, args.overrides)
    try:
        bench(config, overrides, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
              baseline=args.baseline, out_dir=args.out)
    except RuntimeError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- config

CONFIG_EPILOG = """examples:
  megatron-moe config show                                    # every default
  megatron-moe config show examples/tiny_moe.toml train.lr=1e-3
  megatron-moe config show examples/tiny_three_arm/cpu.toml   # a study file, [study] included
"""


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show a resolved config", epilog=CONFIG_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="config_command", required=True, metavar="VERB")
    show = verbs.add_parser("show", help="print a run or study config with every default filled in, as TOML",
                            epilog=CONFIG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("config", nargs="?", help="run or study config TOML (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    show.set_defaults(func=config_show_main)


def config_show_main(args: argparse.Namespace) -> int:
    from megatron_moe.config import load_run_config, load_toml, to_toml

    config, overrides = _split_config(args.config, args.overrides)
    if config is not None and "study" in load_toml(config):
        from megatron_moe.study.spec import load_study

        cfg = load_study(config, overrides, check_world=False)
    else:
        cfg = load_run_config(config, overrides)
    print(to_toml(dataclasses.asdict(cfg)), end="")
    return 0


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
    _add_config(sub)
    parser.add_argument("--version", action="version", version=f"megatron-moe {__version__}")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; `key=value` overrides may also come after options (`plan CFG --json a.b=1`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # A CUDA build of torch on a machine without a GPU (a cluster's login node) logs "No CUDA runtime is
    # found" when megatron-core imports torch.utils.cpp_extension: noise on every command, and it would
    # break the one-line error contract.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        print(f"megatron-moe: error: {storage_error(exc)}", file=sys.stderr)
        return 1


def storage_error(exc: OSError) -> str:
    """One line for a file the command could not read or write: the path, what went wrong, what to do."""
    path = repr(str(exc.filename))
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied on {path}: this command needs to read it (or write where it goes); check its mode and owner"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device writing {path}; free space there or write elsewhere"
    if exc.errno == errno.EROFS:
        return f"{path} is on a read-only file system; write elsewhere"
    return f"cannot use {path}: {exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
