"""Atomic outputs leave nothing behind: a writer killed mid-write (SIGKILL: no `finally` runs)
leaves a temporary that the next write of the same output removes, and only that."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.common import atomic_path

PROJECT = Path(__file__).resolve().parent.parent


def killed_while_writing(target: Path) -> None:
    """A process that fills atomic_path(target)'s temporary folder, then is SIGKILLed."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from pipeline.common import atomic_path
        with atomic_path(Path({str(target)!r})) as tmp:
            tmp.mkdir()
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, timeout=60)
    assert proc.returncode == -signal.SIGKILL


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "processed"
    killed_while_writing(target)
    (stale,) = leftovers(tmp_path)
    assert stale.startswith(".processed.") and stale.endswith(".tmp")
    # a temporary of a running writer (this process), and files that only look alike, stay
    live = tmp_path / f".processed.{os.getpid()}.abc123.tmp"
    live.mkdir()
    mine = [tmp_path / ".processed.notes.tmp", tmp_path / ".processed.12.x.tmp.bak"]
    for p in mine:
        p.write_text("user's")

    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"
    assert leftovers(tmp_path) == sorted([live.name, *(p.name for p in mine)])


def test_a_folder_swap_cut_short_puts_the_previous_output_back(tmp_path):
    """Killed between moving the old folder aside and moving the new one in: the old one is
    the only copy, so it is restored, not deleted."""
    target = tmp_path / "raw"
    old = tmp_path / ".raw.old"
    old.mkdir()
    (old / "data.txt").write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(target):
        raise RuntimeError("this write fails")
    assert (target / "data.txt").read_text() == "previous"
    assert leftovers(tmp_path) == []
