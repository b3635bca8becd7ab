"""Strict records: dataclasses loaded from dicts and TOML with every key and type checked (one-line `ConfigError`
naming the dotted path of the bad value and what is allowed), dotted overrides, and TOML written back. The run
config (`megatron_moe.config`) is the main user; any other typed record can use it too."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field and what is allowed."""


def changed_fields(a: Any, b: Any, prefix: str = "") -> tuple[str, ...]:
    """Dotted names of the fields in which two configs of the same dataclass differ."""
    out: list[str] = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(x):
            out.extend(changed_fields(x, y, name))
        elif x != y:
            out.append(name)
    return tuple(out)


def get_dotted(cfg: Any, dotted: str) -> Any:
    """The field of a (nested) config named by a dotted path relative to `cfg`."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    if tp is Any:
        return value
    if tp in (dict, list):
        if not isinstance(value, tp):
            raise ConfigError(f"{path} = {value!r} has the wrong type; expected a {'table' if tp is dict else 'list'}")
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path} = {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append((arg, exc))
        others = [exc for arg, exc in errors if arg is not type(None)]
        if len(others) == 1:  # an optional field: what is wrong with the value, not the whole value
            raise others[0]
        raise ConfigError(f"{path} = {value!r} has the wrong type; expected {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a table, got {value!r}")
        return from_dict(tp, value, path)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path} = {value!r}; expected none")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} = {value!r} has the wrong type; expected float")
        if not math.isfinite(value):  # TOML has nan and inf literals; no field means either
            raise ConfigError(f"{path} = {value!r} is not allowed; expected a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} = {value!r} has the wrong type; expected int")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(f"{path} = {value!r} has the wrong type; expected {tp.__name__}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path} = {value!r} has the wrong type; expected a list")
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} = {value!r} has the wrong type; expected a table")
        _, item = typing.get_args(tp)
        return {k: _coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported field type {tp}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else key
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r}; valid keys here: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    missing = [f.name for f in fields.values() if f.name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"no {'.'.join(filter(None, (path, missing[0])))!r}")
    return cls(**kwargs)


def field_docs(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted field name -> the first sentence of its description (the string literal after the field in the class
    body), for the fields of dataclass `cls` and of the dataclasses it nests; fields without one are left out."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            text = " ".join(after.value.value.split())
            docs[node.target.id] = re.split(r"(?<!i\.e)(?<!e\.g)\.\s+(?=[A-Z])", text)[0].rstrip(".")
    hints = typing.get_type_hints(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(field_docs(hints[f.name], name))
        elif f.name in docs:
            out[name] = docs[f.name]
    return out


def load_json_record(cls: type, path: Path, *, version: int, remedy: str,
                     upgrade: typing.Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Any:
    """The versioned JSON record at `path` as dataclass `cls`, which has a `version` field. A record without one is
    version 0. One older than `version` is read through `upgrade` (refused without one); a newer one is refused.
    Every refusal is a one-line ConfigError naming the file and, but for a newer layout, ending in `remedy`."""
    name = path.name
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path} is not a readable {name} ({why}); {remedy}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a valid {name}: expected a JSON object, found {type(raw).__name__}; {remedy}")
    found = raw.get("version", 0)
    if not isinstance(found, int) or isinstance(found, bool) or found > version:
        raise ConfigError(f"{path} has layout version {found!r}; this megatron-moe reads versions up to {version}: "
                          "upgrade megatron-moe")
    if found < version:
        if upgrade is None:
            raise ConfigError(f"{path} is not a {name} of layout version {version} (found {found}); {remedy}")
        raw = {**upgrade(raw), "version": version}
    try:
        return from_dict(cls, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path} is not a valid {name}: {exc}; {remedy}") from None


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string such as precision=bf16


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as TOML, else taken as strings)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a table")
        node[parts[-1]] = _parse_override_value(text.strip())
    return data


MAX_CONFIG_BYTES = 2**20
"""Configs are a few kB: a larger file is not one (and /dev/zero would never end)."""


def packaged_example(path: str | Path) -> Path | None:
    """The copy installed with the package of `examples/...` (None when `path` names none): a wheel holds the
    examples as megatron_moe/examples, so the README's `examples/...` commands run without the checkout."""
    parts = Path(path).parts
    if len(parts) < 2 or parts[0] != "examples":
        return None
    copy = Path(__file__).resolve().parent.joinpath("examples", *parts[1:])
    return copy if copy.is_file() else None


def load_toml(path: str | Path) -> dict[str, Any]:
    """A config file's tables; `examples/...` falls back to the packaged copy when no such file is here."""
    path = Path(path)
    if not path.exists():
        path = packaged_example(path) or path
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        what = "a directory" if path.is_dir() else "not a regular file" if not path.is_file() else "larger than 1 MiB"
        raise ConfigError(f"config file {str(path)!r} is {what}; give a TOML file")
    try:
        return tomllib.loads(path.read_text())
    except PermissionError:
        raise ConfigError(f"config file {str(path)!r} is not readable (permission denied)") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def save_toml(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as TOML, atomically."""
    from megatron_moe.files import atomic_write_text

    atomic_write_text(path, to_toml(dataclasses.asdict(cfg)))


def to_toml(data: dict[str, Any], comments: dict[str, str] | None = None) -> str:
    """`data` as TOML; `comments` (dotted name -> text) go after the values they name."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            # A TOML basic string: JSON's escapes except that characters outside the BMP stay literal
            # (JSON would write surrogate pairs, which TOML rejects).
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        raise TypeError(v)

    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and scalars:
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            note = (comments or {}).get(f"{prefix}.{k}" if prefix else k)
            lines.append(f"{k} = {fmt(v)}" + (f"  # {note}" if note else ""))
        if scalars:
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(data, "")
    return "\n".join(lines)
