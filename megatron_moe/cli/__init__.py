"""The `megatron-moe` command line: one subcommand per verb, each a thin handler over library functions.

Every handler imports what it needs when it runs, so `--help` and the planner start without torch. Errors the
user can fix (`ConfigError`) are one line on stderr with exit code 2; `TrainingError` and `LaunchError` exit 1;
a trainer stopped by a signal exits with `train.stop.PREEMPTED_EXIT_CODE`. Each verb's parser and handler live in
the module named after it; this one builds the parser and runs the handler.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from megatron_moe import __version__
from megatron_moe.cli.bench import _add_bench
from megatron_moe.cli.config_show import _add_config
from megatron_moe.cli.data import _add_data
from megatron_moe.cli.export import _add_export
from megatron_moe.cli.plan import _add_plan
from megatron_moe.cli.study import _add_study
from megatron_moe.cli.train import EPILOG, _add_train
from megatron_moe.config import ConfigError


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
    _add_export(sub)
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
