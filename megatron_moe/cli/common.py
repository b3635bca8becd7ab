"""Helpers the verbs of the command line share."""

from __future__ import annotations

from pathlib import Path

from megatron_moe.config import ConfigError


def split_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`train key=value` without a config file: the first positional is an override, not a path."""
    if config is not None and "=" in config and not config.endswith(".toml"):
        return None, [config, *overrides]
    return config, overrides


def check_output_dir(path: str | None, what: str) -> None:
    """An output directory that cannot be one is refused before any work (an empty name would mean here)."""
    if path is None:
        return
    if not path.strip():
        raise ConfigError(f"{what} is empty; name the directory to write to")
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{what} = {path!r} is an existing file, not a directory")
