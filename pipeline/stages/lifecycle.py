"""The one lifecycle of a stage's process, shared by every stage:

0. run by DVC, the stage holds the project's stage lock, stops if its `dvc` process dies
   (DVC unlocks the repository while a stage runs: an orphan would race the re-run), and
   sweeps the temporaries that killed stages left;
1. the command line is parsed and params.yaml loaded (a bad key is one line, exit status 1);
2. the stage's work runs; its outputs are written atomically, only once it succeeds;
3. a failure, wherever it happens, is recorded as a FAILED MLflow run of the stage under the
   execution's parent (which turns FAILED too) and ends the process with one line on stderr;
4. success ends with the process's time split: start-up, tracking, work (`common.run_cli`).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.core import paths
from pipeline.core.common import PipelineError, run_cli, sweep_stale_temporaries
from pipeline.core.config import Params, load_params
from pipeline.tracking.runs import failures_recorded


@contextmanager
def recorded(params: Params, stage: str, main: bool = True) -> Iterator[None]:
    """Step 3 for a stage that runs its own command line (training: an arch, DDP ranks);
    only the main rank records."""
    if not main:
        yield
        return
    with failures_recorded(params, stage):
        yield


def stage_main(stage: str, work: Callable[[Params], Any], doc: str) -> Callable[..., None]:
    """`main(argv)` of a stage whose work is a function of the params alone."""

    def main(argv: list[str] | None = None) -> None:
        argparse.ArgumentParser(description=doc.splitlines()[0]).parse_args(argv)
        params = load_params()
        with recorded(params, stage):
            work(params)

    main.__doc__ = f"`python -m pipeline.stages.{stage}`: {doc.splitlines()[0]}"
    return main


log = logging.getLogger(__name__)

SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}
LOCK_WAIT_S = 15.0  # an orphan notices its dvc is gone within WATCH_S: the re-run waits for it
WATCH_S = 1.0


def _under_dvc() -> bool:
    """Run by `dvc repro` / `dvc exp run` (not by torchrun as one of training's ranks, whose
    launcher is the stage process and holds the lock)."""
    return bool(os.environ.get("DVC_STAGE")) and "LOCAL_RANK" not in os.environ


def _launcher() -> list[tuple[Any, str]]:
    """The processes this stage dies with, and their names: its parent, and the parent's parent
    where the parent is the shell DVC ran the command in."""
    import psutil

    chain, process = [], psutil.Process()
    while (process := process.parent()) is not None:
        chain.append((process, process.name()))
        if chain[-1][1] not in SHELLS:
            break
    return chain


def _stop_if_orphaned(launcher: list[tuple[Any, str]], stage: str) -> None:
    """Poll the launcher; when any of it is gone, stop this stage and what it started (e.g.
    torchrun and its ranks). Outputs are written atomically: they stay whole."""
    import psutil

    while True:
        time.sleep(WATCH_S)
        # is_running also compares the start time: a reused pid is not the launcher
        gone = next(((p, name) for p, name in launcher if not p.is_running()), None)
        if gone is None:
            continue
        log.error(
            "%s: its launcher %s (pid %d) is gone (killed?); stopping so that a re-run does not "
            "race this one",
            stage,
            gone[1],
            gone[0].pid,
        )
        for child in psutil.Process().children(recursive=True):
            child.kill()
        logging.shutdown()
        os._exit(1)


@contextmanager
def guarded(stage: str) -> Iterator[None]:
    """Step 0 (only when DVC runs the stage)."""
    if not _under_dvc():
        yield
        return
    from filelock import FileLock, Timeout

    lock_path = paths.STAGE_LOCK
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    owner = lock_path.with_suffix(".owner")
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        held = owner.read_text().strip() if owner.exists() else "another stage"
        raise PipelineError(
            f"{lock_path}: held by {held} of this project, still running; wait for it to end "
            "(or stop it) and run again"
        ) from None
    try:
        owner.write_text(f"{stage} (pid {os.getpid()})\n")
        threading.Thread(
            target=_stop_if_orphaned, args=(_launcher(), stage), daemon=True, name="orphan-watch"
        ).start()
        sweep_stale_temporaries(paths.MODELS, paths.REPORTS, paths.PROCESSED, shallow=(paths.DATA,))
        yield
    finally:
        lock.release()


def run(main: Callable[..., None]) -> None:
    """Steps 0 and 4 around `main`, from a real command line."""
    stage = os.environ.get("DVC_STAGE", "stage")

    def guarded_main(argv: list[str] | None) -> None:
        with guarded(stage):
            main(argv)

    run_cli(guarded_main)
