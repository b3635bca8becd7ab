"""Numbers and tables as people read and write them: short numbers (1.23M), counts as researchers write them
(6.5B, 1.4e11), plain-text tables with columns sized to their contents. Used by every part of the package."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from megatron_moe.config import ConfigError


def human(x: float) -> str:
    """Short human number: 1.23M, 4.5e12 style."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def human_bytes(n: float) -> str:
    """Bytes in binary units: 512 bytes, 3.2 MiB, 79.1 GiB."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


_MEMORY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(t|g|m)i?b?", re.IGNORECASE)


def parse_memory(text: str, what: str = "memory") -> int:
    """Device memory as written on the box: 80GB, 80G, 80GiB, 141GB, 512MB (binary units whichever is written: an
    "80GB" GPU holds 80 GiB). ConfigError (one line, naming `what`) otherwise."""
    match = _MEMORY.fullmatch(str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{what} = {str(text)!r} is not a memory size: write e.g. 80GB, 80GiB or 141GB")
    return int(float(match.group(1)) * 2 ** {"m": 20, "g": 30, "t": 40}[match.group(2).lower()])


_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?", re.IGNORECASE)


def parse_count(text: str | int, what: str = "count") -> int:
    """A whole count as researchers write it: 6500000000, 6_500_000_000, 6.5e9, 6.5B, 130B, 20M, 4k, 1.5T
    (k = 10^3, M = 10^6, B or G = 10^9, T = 10^12; any case). Exact (decimal arithmetic), so 6.5B is
    6,500,000,000. The sign is kept: ranges are the caller's to check. ConfigError (one line, naming `what`)
    for anything else, and for values that are not whole (1.5k is, 1.0005k is not)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().replace("_", "")
    suffix = s[-1:].lower() if s[-1:].isalpha() and s[-1:].lower() in _SUFFIXES else ""
    number = s[:-1] if suffix else s
    value = None
    if _COUNT.fullmatch(number):
        try:
            value = Decimal(number) * _SUFFIXES[suffix]
        except InvalidOperation:
            value = None
    if value is None:
        raise ConfigError(f"{what} = {str(text)!r} is not a count: write e.g. 6500000000, 6_500_000_000, 6.5e9 or "
                          "6.5B (suffixes k, M, B/G, T)")
    if value != value.to_integral_value():
        raise ConfigError(f"{what} = {str(text)!r} is {value.normalize():f}, not a whole number")
    return int(value)


def table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """Lines of a plain-text table, each column as wide as its widest cell, two spaces apart. `align` has one
    letter per column, l (left) or r (right); columns it does not cover are right-aligned except the first."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    align = (align or "l").ljust(len(widths), "r")

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(header), *(line(r) for r in rows)]


# ---------------------------------------------------------------- report
