"""Atomic writes: whole files or none, with the usual file mode."""

from __future__ import annotations

from megatron_moe.files import atomic_write_json


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind
