"""`megatron-moe config show`: a resolved config with every default."""

from __future__ import annotations

import argparse
import dataclasses

from megatron_moe.cli.common import split_config

CONFIG_EPILOG = """examples:
  megatron-moe config show                                    # every default
  megatron-moe config show examples/tiny_moe.toml train.lr=1e-3
  megatron-moe config show examples/tiny_three_arm/cpu.toml   # a study file, [study] included
  megatron-moe config show --describe                         # every field with what it means
"""


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show a resolved config", epilog=CONFIG_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="config_command", required=True, metavar="VERB")
    show = verbs.add_parser("show", help="print a run or study config with every default filled in, as TOML",
                            epilog=CONFIG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("config", nargs="?", help="run or study config TOML (omit for the defaults)")
    show.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    show.add_argument("--roles", action="store_true",
                      help="mark each field that does not change what is trained with its role (see the header)")
    show.add_argument("--describe", action="store_true", help="follow each field with what it means (and its unit)")
    show.set_defaults(func=config_show_main)


def config_show_main(args: argparse.Namespace) -> int:
    from megatron_moe.config import ROLES, field_roles, load_run_config
    from megatron_moe.data.source import with_data_vocabulary
    from megatron_moe.schema import field_docs, load_toml, to_toml

    config, overrides = split_config(args.config, args.overrides)
    if config is not None and "study" in load_toml(config):
        from megatron_moe.study.spec import load_study

        cfg = load_study(config, overrides, check_world=False)
    else:
        cfg = with_data_vocabulary(load_run_config(config, overrides))
    comments: dict[str, str] = {}
    if args.describe:
        comments.update(field_docs(type(cfg)))
    if args.roles:
        for name, role in field_roles().items():
            if role != "trains":
                comments[name] = f"[{role}] {comments[name]}" if name in comments else role
        print("".join(f"# {role}: {meaning}\n" for role, meaning in ROLES.items()) + "# (unmarked fields: trains)\n")
    print(to_toml(dataclasses.asdict(cfg), comments or None), end="")
    return 0
