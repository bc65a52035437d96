"""The training step and the epoch loop: `Engine` (forward, backward, clipping, the optimizer
and scheduler step, under autocast), `train_epoch` (one pass over the crops, every rank
deciding alike on a non-finite loss), `fit` (the epochs, with the caller's hooks after each)
and the best-epoch rule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.common import PipelineError
from pipeline.engine import distributed
from pipeline.engine.distributed import Dist


class NonFiniteLoss(PipelineError):
    """The loss became NaN or infinite: training stops, the last good state is kept."""


@dataclass
class Engine:
    """What one optimisation step needs; `model` is what forward runs (DDP and/or compiled)."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    grad_clip: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    ctx: Dist = field(default_factory=Dist)

    def to_device(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images, *rest = batch
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return [images, *(t.to(self.device, non_blocking=True) for t in rest)]

    def step(self, images, labels, weight=None) -> torch.Tensor:
        """Forward, backward and clipping; returns (loss, gradient norm, final-output loss),
        detached. The loss is the objective (UNet++: the weighted sum over its heads), the
        final-output loss the deepest head's alone (what validation scores). The norm is
        inf/NaN when the gradients are; with a scaler that only skips the step (expected)."""
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(images)
        loss = self.loss_fn(outputs, labels, weight)  # the losses compute in float32
        final = getattr(self.loss_fn, "final_loss", None)
        final = loss.detach() if final is None else final
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # so clipping sees the true gradients
        else:
            loss.backward()
        norm = loss.new_zeros(())  # with a scaler, inf gradients only skip the step (expected)
        if self.grad_clip or self.scaler is None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        return torch.stack([loss.detach().float(), norm.float(), final.float()])

    def apply(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def train_epoch(engine: Engine, loader: DataLoader, desc: str) -> dict[str, float]:
    """One pass over the training crops.

    Returns the mean loss per image (over every rank): `loss` of the final output (comparable
    with the validation loss) and `objective` (what is minimised: for UNet++ the weighted sum
    over its heads); the images seen, and where the time went: loader vs steps.
    """
    ctx = engine.ctx
    engine.model.train()
    loss_sum, objective_sum, n_seen, data_s, compute_s = 0.0, 0.0, 0, 0.0, 0.0
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None if ctx.main else True)
    t = time.perf_counter()
    for i, batch in enumerate(bar, start=1):
        images, labels, *weight = engine.to_device(batch)
        t_data = time.perf_counter()
        data_s += t_data - t
        out = engine.step(images, labels, weight[0] if weight else None)
        value, norm, final = distributed.mean_values(out, ctx)  # every rank takes the same decision
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{desc}, batch {i}: loss is {value}")
        if not math.isfinite(norm):
            raise NonFiniteLoss(f"{desc}, batch {i}: gradient norm is {norm}")
        engine.apply()  # runs on asynchronously; the next step's loss read-out waits for it
        t = time.perf_counter()
        compute_s += t - t_data
        batch_images = len(images) * ctx.world
        objective_sum += value * batch_images
        loss_sum += final * batch_images
        n_seen += batch_images
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{n_seen / (data_s + compute_s):.0f}")
    return {
        "loss": loss_sum / max(n_seen, 1),
        "objective": objective_sum / max(n_seen, 1),
        "images": n_seen,
        "data_seconds": data_s,
        "compute_seconds": compute_s,
    }


def is_better(monitor: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if monitor == "val_loss" else value > best


def fit(
    engine: Engine,
    loader: DataLoader,
    sampler,
    epochs: range,
    total: int,
    name: str,
    end_epoch: Callable[[int, dict[str, float], float], bool | None],
) -> None:
    """The epoch loop: each epoch one pass over the crops in a fresh order (`train_epoch`),
    then `end_epoch(epoch, stats, started)`: the caller's hooks (validation, the best epoch,
    logging, the resume state), which returns True to stop early (a time limit). `epochs`
    may start late: a resumed run."""
    bar = tqdm(
        epochs,
        desc=name,
        unit="epoch",
        initial=epochs.start - 1,
        total=total,
        disable=None if engine.ctx.main else True,
    )
    for epoch in bar:
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        stats = train_epoch(engine, loader, f"{name} epoch {epoch}/{total}")
        if end_epoch(epoch, stats, started):
            bar.close()
            return
