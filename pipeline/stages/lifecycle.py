"""The one lifecycle of a stage's process, shared by every stage:

1. the command line is parsed and params.yaml loaded (a bad key is one line, exit status 1);
2. the stage's work runs; its outputs are written atomically, only once it succeeds;
3. a failure, wherever it happens, is recorded as a FAILED MLflow run of the stage under the
   execution's parent (which turns FAILED too) and ends the process with one line on stderr;
4. success ends with the process's time split: start-up, tracking, work (`common.run_cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.common import run_cli
from pipeline.config import Params, load_params
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


def run(main: Callable[..., None]) -> None:
    """Step 4 around `main`, from a real command line."""
    run_cli(main)
