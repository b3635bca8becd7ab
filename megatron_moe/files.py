"""Small shared helpers: atomic file writes, JSON lines and exclusive file locks."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from a cluster group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class DamagedJsonLines(ValueError):
    """A JSON-lines file has an unreadable line before its last one (not what a killed writer leaves)."""

    def __init__(self, path: Path, lines: list[int]):
        shown = ", ".join(map(str, lines[:5])) + (f" and {len(lines) - 5} more" if len(lines) > 5 else "")
        super().__init__(f"{path}: line{'s' if len(lines) > 1 else ''} {shown} {'are' if len(lines) > 1 else 'is'} "
                         "not JSON")
        self.path, self.lines = path, lines


def read_jsonl(path: str | Path, *, allow_damaged: bool = False, damaged: list[int] | None = None
               ) -> list[dict[str, Any]]:
    """Read a JSON-lines file. A torn last line (left by a killed writer) is skipped; an unreadable line before it
    raises DamagedJsonLines unless `allow_damaged`, which skips those too and appends their (1-based) numbers to
    `damaged` when given."""
    rows, bad = [], []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                bad.append(number)
    if bad and not allow_damaged:
        raise DamagedJsonLines(Path(path), bad)
    if damaged is not None:
        damaged.extend(bad)
    return rows


class Locked(Exception):
    """Another process holds the lock; `holder` is what it wrote there (pid@host)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


_HELD: dict[str, int] = {}  # path -> descriptor of the locks this process holds


def _forget_locks_in_child() -> None:
    """A forked child (megatron-core's checkpoint writer, a multiprocessing manager) shares its parent's lock
    descriptors, and would keep the lock held after the parent dies: it closes its copies at once."""
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def _gone(holder: str) -> bool:
    """Whether the "pid@host" that wrote a lock is a process of this host that no longer runs."""
    pid, _, host = holder.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's, or unreadable: it cannot be checked from here
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


def lock_exclusive(path: str | Path, notes: list[str] | None = None) -> int:
    """Hold an exclusive `flock` on `path` (created if needed) until this process exits, with "pid@host" written
    in it; returns its descriptor. A process that already holds it gets it again. Raises `Locked` when another
    process holds it, and OSError where the file system has no locks (some network file systems).

    A lock whose writer is a process of this host that no longer runs, yet is still held (by a process that writer
    left behind), is stale: the lock file is replaced and taken, with a line on `notes`.
    """
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD:
        return _HELD[key]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        os.close(fd)
        if _gone(holder) and same_file:
            path.unlink()  # the leftover process keeps its lock on the old file, which nothing opens again
            if notes is not None:
                notes.append(f"took over {path}: its owner {holder} no longer runs (a process it left held the lock)")
            return lock_exclusive(path, notes)
        raise Locked(path, holder) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
    _HELD[key] = fd
    return fd


def lock_holder(path: str | Path) -> str | None:
    """Who holds the `lock_exclusive` lock on `path` (what it wrote there), or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    except OSError:
        return None  # no locks on this file system: nobody can be said to hold it
    finally:
        os.close(fd)
    return None
