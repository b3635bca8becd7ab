"""Atomic writes: whole files or none, with the usual file mode."""

from __future__ import annotations

import os

from megatron_moe.files import atomic_write_json


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


_HOLD = """
import os, signal, sys, time
from megatron_moe.files import lock_exclusive
from megatron_moe.train.stop import forked_children_die_with_this_process
forked_children_die_with_this_process()
lock_exclusive(sys.argv[1])
child = os.fork()
if child == 0:  # what megatron-core's checkpoint writer is: a forked child
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_a_killed_lock_holder_leaves_no_child_holding_its_lock(tmp_path):
    """A forked child drops its copy of the lock at fork and is killed with its parent, so a SIGKILLed trainer
    leaves neither a process nor a held lock behind."""
    import signal
    import subprocess
    import sys

    from megatron_moe.files import lock_holder
    from tests.conftest import REPO, wait_until

    lock = tmp_path / ".train.lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert lock_holder(lock) == f"{proc.pid}@{os.uname().nodename}"  # the parent holds it
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    wait_until(lambda: not os.path.exists(f"/proc/{child}") or "Z" in _state(child),
               "the forked child ending with its parent", seconds=30)
    assert lock_holder(lock) is None


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_a_lock_held_for_a_dead_owner_is_taken_over_with_a_note(tmp_path):
    """A lock still held, but written by a process of this host that no longer runs (a leftover of it holds the
    file), is stale: it is replaced and taken, and the caller is told."""
    import socket
    import subprocess
    import sys

    from megatron_moe.files import Locked, lock_exclusive

    lock = tmp_path / ".train.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder_code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                   "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, sys.argv[2].encode()); print('held', flush=True); "
                   "time.sleep(600)")
    for owner, stale in ((f"{dead.stdout.strip()}@{socket.gethostname()}", True), ("1@elsewhere", False)):
        lock.unlink(missing_ok=True)
        leftover = subprocess.Popen([sys.executable, "-c", holder_code, str(lock), owner], stdout=subprocess.PIPE,
                                    text=True)
        try:
            assert leftover.stdout.readline().strip() == "held"
            notes: list[str] = []
            if stale:
                fd = lock_exclusive(lock, notes)
                assert notes == [f"took over {lock}: its owner {owner} no longer runs (a process it left held the lock)"]
                assert lock.read_text() == f"{os.getpid()}@{socket.gethostname()}\n"  # a new file, this process's
                from megatron_moe import files

                assert files._HELD.pop(str(lock.resolve())) == fd
                os.close(fd)  # let go: this test process lives on
            else:  # another host's process cannot be checked from here: still refused
                try:
                    lock_exclusive(lock, notes)
                    raise AssertionError("a live-looking lock was taken")
                except Locked as exc:
                    assert exc.holder == owner and notes == []
        finally:
            leftover.kill()
            leftover.wait()
