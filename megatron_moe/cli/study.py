"""`megatron-moe study`: run, report and launch studies."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path

from megatron_moe import directories
from megatron_moe.cli.common import check_output_dir
from megatron_moe.config import ConfigError

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
    _add_memory_flags(run, "this machine's GPU's (none on a machine without one)")

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

    check_output_dir(args.output_dir, "--output-dir")
    cfg = load_study(args.study, args.overrides)
    check_output_dir(cfg.study.output_dir or None, "study.output_dir")
    echo, bar = (lambda line: print(line, flush=True)), None
    if sys.stdout.isatty() and not args.dry_run:  # a bar of complete runs under the lines; plain lines in a log
        from tqdm import tqdm

        bar = tqdm(total=len(cfg.study.seeds), desc="study", unit="run", dynamic_ncols=True, leave=False)
        echo = bar.write

        def on_progress(complete: int, total: int) -> None:
            bar.total, bar.n = total, complete
            bar.refresh()
    try:
        return run_study(cfg, args.output_dir, study_file=_study_file(args.study),
                         keep_going=args.keep_going, dry_run=args.dry_run, quiet=args.quiet,
                         echo=echo, on_progress=on_progress if bar is not None else None,
                         gpu_memory=_gpu_memory(args), force=args.force)
    except LaunchError as exc:  # squeue did not answer about a run launched on SLURM
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()


def _add_memory_flags(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--gpu-memory", metavar="SIZE",
                   help=f"device memory each run's estimated peak per GPU must fit in, e.g. 80GB or 141GB (GB and GiB "
                   f"both mean 2^30 bytes, as GPUs are sold; default {default})")
    p.add_argument("--force", action="store_true", help="go on when an arm's estimated memory exceeds it")


def _gpu_memory(args: argparse.Namespace) -> int | None:
    from megatron_moe.text import parse_memory

    return None if args.gpu_memory is None else parse_memory(args.gpu_memory, "--gpu-memory")


def _study_file(path: str) -> str:
    """Where the study file read lies (a packaged example's copy when `path` names one that is not here)."""
    from megatron_moe.schema import packaged_example

    return str((Path(path) if Path(path).exists() else packaged_example(path) or Path(path)).resolve())


def study_report_main(args: argparse.Namespace) -> int:
    from megatron_moe.study.records import load_results
    from megatron_moe.study.report import tables, write_report

    check_output_dir(args.output_dir, "--output-dir")
    paths = write_report(args.dir, args.output_dir, args.confidence, args.allow_damaged)
    results = load_results(paths[directories.RESULTS])
    for w in results.warnings:
        print(f"WARNING: {w}")
    if results.ordering:
        print(f"\nordering of mean best validation loss: {results.ordering['line']}")
    if results.regime:
        print(f"regime: {results.regime['line']}")
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
    _add_memory_flags(p, "with --gpus-per-node, the planner's assumed GPU's, 80GB")
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
        # "Study name" -> "study name", but an acronym (GPUs, SLURM, USR1) keeps its capitals
        first = doc[:1].lower() if doc[1:2].islower() else doc[:1]
        help_text = first + doc[1:] + ("" if default in ("", 0, [], False) else f" (default {default})")
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
    check_output_dir(args.output_dir, "--output-dir")
    lc = load_launch_config(args.launch_config, {k: getattr(args, k) for k in args.launch_flags})
    cfg = load_study(args.study, args.overrides, check_world=False)
    try:
        return launch_study(cfg, lc, args.output_dir, study_file=_study_file(args.study),
                            dry_run=args.dry_run, data_check=not args.skip_data_check,
                            echo=lambda line: print(line, flush=True), gpu_memory=_gpu_memory(args), force=args.force)
    except LaunchError as exc:
        print(f"megatron-moe: error: {exc}", file=sys.stderr)
        return 1
