"""Optimizers and per-batch learning-rate schedules (with linear warm-up), from `train.*`."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.core.config import Params


def make_optimizer(params: Params, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """train.optimizer over `model`'s weights; `fused`: one kernel for all of them (what
    pipeline.engine.numerics picks with bf16 on a CPU), else torch's per-tensor default."""
    tp = params.train
    kernel = {"fused": True} if fused else {}
    if tp.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=tp.momentum,
            weight_decay=tp.weight_decay,
            **kernel,
        )
    cls = torch.optim.AdamW if tp.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=params.lr, weight_decay=tp.weight_decay, **kernel)


def lr_factor(params: Params, step: int, steps_per_epoch: int) -> float:
    """Multiplier of `lr` at optimizer step `step` (0-based) of the whole run.

    Warm-up rises linearly to 1 over `warmup_epochs`; then step / cosine / poly decay over the
    remaining steps (cosine and poly end at `min_lr`).
    """
    tp = params.train
    total = max(params.epochs * steps_per_epoch, 1)
    warmup = round(min(tp.warmup_epochs * steps_per_epoch, total - 1))  # 1e308 epochs: no overflow
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if tp.scheduler == "step":
        return tp.step_gamma ** ((step // steps_per_epoch) // tp.step_epochs)
    if tp.scheduler == "none":
        return 1.0
    floor = tp.min_lr / params.lr
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if tp.scheduler == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # poly
        shape = (1 - progress) ** tp.poly_power
    return floor + (1 - floor) * shape


def make_scheduler(
    params: Params, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped after every optimizer step; its state (the step count) goes in the checkpoint."""

    def factor(step: int) -> float:
        return lr_factor(params, step, steps_per_epoch)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
