"""What a run has done so far (`Progress`, restored by a resume), the INFO line each epoch
writes, and the time limit (`budget.train_<arch>_s`): whether the pace keeps to it and when
training stops."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.core.common import (
    clock,
)

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The part of a run that a resume restores besides the weights and optimizer."""

    epoch: int = 0  # last completed epoch
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    run_id: str | None = None
    train_seconds: float = 0.0
    stopped: str = ""  # why training ended before params.epochs (budget.train_<arch>_s)


def out_of_time(arch: str, epoch: int, epochs: int, progress: Progress, limit: float) -> str:
    """Why training stops after `epoch`: another epoch, as long as the last one, would end
    past the stage's time limit (budget.train_<arch>_s; 0 = none); "" to go on. After the
    first epoch (warm-up, compiling) only a limit already passed stops it."""
    if not limit or epoch >= epochs:
        return ""
    last = progress.rows[-1]["seconds"]
    if len(progress.rows) == 1:  # its warm-up (and compiling) is no pace: stop only past it
        last = 0.0
    if progress.train_seconds + last <= limit:
        return ""
    kept = "the last epoch" if progress.best_epoch == epoch else f"epoch {progress.best_epoch}"
    why = (
        f"stopped after epoch {epoch} of {epochs}: another (~{clock(last)}) would pass "
        f"budget.train_{arch}_s ({clock(limit)}) at {clock(progress.train_seconds)}; the best "
        f"so far ({kept}) is kept"
    )
    log.warning("%s %s", arch, why)
    return why


def pace(epochs: int, progress: Progress, limit: float) -> str:
    """The epoch line's note on the time limit: the limit, and whether the remaining epochs,
    at the last one's pace, end past it."""
    if not limit:
        return ""
    done = progress.rows[-1]["epoch"]
    projected = progress.train_seconds + progress.rows[-1]["seconds"] * (epochs - done)
    if projected <= limit or len(progress.rows) == 1:  # the first epoch warms up: no pace yet
        return f", limit {clock(limit)}"
    return f", limit {clock(limit)}: LATE, at this pace the run ends at {clock(projected)}"


def epoch_summary(
    arch: str, row: dict[str, Any], epochs: int, progress: Progress, limit: float = 0.0
) -> None:
    """One INFO line per epoch (progress bars are hidden when stderr is not a terminal, e.g.
    under `dvc repro > log`), with the time spent and an ETA for the remaining epochs; under a
    time limit (budget.train_<arch>_s) also whether the pace keeps to it."""
    per_epoch = progress.train_seconds / len(progress.rows)
    log.info(
        "%s epoch %d/%d (elapsed %s, ETA %s%s): train_loss %.4f val_loss %.4f val_miou %.4f "
        "val_dice %.4f | %.1fs: data %.1fs, compute %.1fs, validation %.1fs; "
        "loader %.0f img/s vs step %.0f img/s",
        arch,
        row["epoch"],
        epochs,
        clock(progress.train_seconds),
        clock(per_epoch * (epochs - row["epoch"])),
        pace(epochs, progress, limit),
        row["train_loss"],
        row["val_loss"],
        row["val_miou"],
        row["val_dice"],
        row["seconds"],
        row["data_seconds"],
        row["compute_seconds"],
        row["val_seconds"],
        row["loader_images_per_s"],
        row["step_images_per_s"],
    )
    if row["data_seconds"] > row["compute_seconds"]:
        log.warning(
            "%s: waiting for data (%.1fs) took longer than computing (%.1fs); "
            "raise train.num_workers",
            arch,
            row["data_seconds"],
            row["compute_seconds"],
        )
