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

from pipeline.core.common import atomic_path

PROJECT = Path(__file__).resolve().parents[2]


def killed_while_writing(target: Path) -> None:
    """A process that fills atomic_path(target)'s temporary folder, then is SIGKILLed."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from pipeline.core.common import atomic_path
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


# --- the time split every stage logs when it ends (bench/startup.py reads it) ---------------


def test_timed_blocks_add_up_and_nested_ones_count_once(monkeypatch):
    import time

    from pipeline.core import common

    monkeypatch.setattr(common, "_spent", {})
    monkeypatch.setattr(common, "_open", {})
    with common.timed("tracking"):
        time.sleep(0.05)
        with common.timed("tracking"):  # e.g. log_to_parent inside a tracked block
            time.sleep(0.05)
    with common.timed("tracking"):
        time.sleep(0.02)
    assert 0.12 <= common._spent["tracking"] < 0.5
    assert common._open["tracking"] == 0


def test_the_time_split_names_the_stage_and_its_parts_add_up(monkeypatch):
    from bench.startup import stage_splits
    from pipeline.core import common

    monkeypatch.setenv("DVC_STAGE", "train_unet")
    monkeypatch.setattr(common, "_spent", {"tracking": 6.0})
    monkeypatch.setattr(common, "_process_start", lambda: 1000.0)
    line = common.time_split(entered=1005.0, now=1050.0)
    assert line == "train_unet done in 50.0s: start-up 5.0s, tracking 6.0s, work 39.0s"
    split = stage_splits(f"12:00:00 INFO pipeline: {line}\n")["train_unet"]
    assert split == {"total": 50.0, "startup": 5.0, "tracking": 6.0, "work": 39.0}


def test_a_stage_run_from_the_command_line_ends_with_its_time_split(tmp_path):
    code = "from pipeline.core.common import run_cli; run_cli(lambda argv: None)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT,
        env={**os.environ, "DVC_STAGE": "report"},
        capture_output=True,
        text=True,
        check=True,
    )
    import re

    m = re.search(r"report done in ([\d.]+)s: start-up ([\d.]+)s, tracking 0.0s, work", out.stderr)
    assert m, out.stderr
    total, startup = float(m.group(1)), float(m.group(2))
    assert 0 <= startup <= total < 60  # the interpreter's start counts as start-up
