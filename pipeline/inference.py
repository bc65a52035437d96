"""Prediction on full-size images of any size and split-level evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import predict
from pipeline.metrics import ConfusionMatrix


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Mirror-pad (B, C, H, W) on the bottom/right to a multiple of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, [0, pw, 0, ph], mode=mode)
    return x, (h, w)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Full-image forward; sizes not divisible by `multiple` (2**depth) are mirror-padded and
    the logits cropped back. Returns (B, 1 | C, H, W)."""
    x, (h, w) = pad_to_multiple(images, multiple)
    out = model(x)
    return out[..., :h, :w]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    num_classes: int,
    class_names: list[str],
    device: torch.device,
    multiple: int,
    loss_fn: nn.Module | None = None,
) -> dict[str, Any]:
    """Metrics over a whole split (one confusion matrix); `loss` is the pixel-weighted mean."""
    model.eval()
    cm = ConfusionMatrix(num_classes)
    loss_sum, loss_n = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = predict_logits(model, images, multiple)
        cm.update(predict(logits), labels)
        if loss_fn is not None:
            n = int((labels != cm.ignore_index).sum())
            loss_sum += float(loss_fn(logits, labels)) * n
            loss_n += n
    metrics = cm.compute(class_names)
    if loss_fn is not None:
        metrics["loss"] = loss_sum / max(loss_n, 1)
    return metrics
