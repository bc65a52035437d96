"""Split-level evaluation: every image of a split predicted full-size (whole or by overlap-tile),
scored into a confusion matrix (and, for binary tasks, a score histogram for AUC)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from pipeline.core.config import InferenceParams
from pipeline.engine.distributed import SINGLE, Dist, sum_array
from pipeline.inference.forward import predict, probabilities
from pipeline.inference.metrics import ConfusionMatrix, ScoreHistogram, split_metrics
from pipeline.inference.tiling import predict_tiled

# On a CPU a batch of large images is slower per image than one image at a time (it leaves
# the caches): a DRIVE image (584x565) takes 1.2 s alone and 2.0 s in a batch of 8 (UNet++
# base 16, float32, 2 cores). Batches stop at this many pixels there; GPUs take any batch.
CPU_BATCH_PIXELS = 2**18


def eval_shard(dataset, ctx: Dist, batch_size: int, max_pixels: int | None = None) -> DataLoader:
    """This rank's share of a split (every world-th image), loaded batch by batch (a split never
    sits in memory whole), batched only when the images share one size (a folder of your own
    may mix sizes), and at most `max_pixels` per batch."""
    indices = list(range(ctx.rank, len(dataset), ctx.world))
    if hasattr(dataset, "shape"):  # SplitDataset: sizes from the headers, nothing loaded
        sizes = {dataset.shape(i) for i in indices}
    else:
        sizes = {tuple(dataset[i][0].shape[-2:]) for i in indices}
    if len(sizes) != 1:
        batch_size = 1
    elif max_pixels is not None:
        h, w = sizes.pop()
        batch_size = max(1, min(batch_size, max_pixels // (h * w)))
    return DataLoader(Subset(dataset, indices), batch_size=batch_size)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    class_names: list[str],
    inference: InferenceParams,
    *,
    loss_fn: nn.Module | None = None,
    batch_size: int = 1,
    amp_dtype: torch.dtype | None = None,
    multiple: int | None = None,
    ctx: Dist = SINGLE,
) -> dict[str, Any]:
    """Metrics over a whole split, from one confusion matrix (and, for binary tasks, one score
    histogram) summed over every pixel of every image and every DDP rank; never a mean of
    per-batch or per-image figures. `loss` is the pixel-weighted mean loss.

    Images are predicted full-size by mirror-padded overlap-tile prediction (`inference.*`,
    with test-time flips where `inference.tta` asks for them), on the model's device; inputs
    are mirror-padded to `multiple` (default: the model's size multiple; the prune stage pads
    every depth like the full UNet++, so the deepest reproduces its test metrics).
    """
    device = next(model.parameters()).device
    multiple = multiple or model.size_multiple
    model.eval()
    num_classes = len(class_names)
    cm = ConfusionMatrix(num_classes)
    scores = ScoreHistogram() if num_classes == 2 else None
    loss_sum = np.zeros(2)  # (sum of loss * pixels, pixels)
    max_pixels = CPU_BATCH_PIXELS if device.type == "cpu" else None
    for images, labels in eval_shard(dataset, ctx, batch_size, max_pixels):
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = predict_tiled(
                model,
                images,
                inference.tile_size,
                inference.tile_overlap,
                multiple,
                inference.blend,
                batch_size=max(batch_size, 4),
                tta=inference.tta,
            ).float()  # (B, 1 | C, h, w)
        if logits.shape[-2:] != labels.shape[-2:]:  # preprocess.scale < 1: images were resized,
            logits = F.interpolate(  # labels were not: score every original pixel
                logits, size=labels.shape[-2:], mode="bilinear", align_corners=False
            )  # (B, 1 | C, H, W)
        cm.update(predict(logits), labels)
        if scores is not None:
            scores.update(probabilities(logits)[:, 1], labels)
        if loss_fn is not None:
            n = int((labels != cm.ignore_index).sum())
            loss_sum += (float(loss_fn(logits, labels)) * n, n)
    cm.matrix = sum_array(cm.matrix, ctx)
    if scores is not None:
        scores.hist = sum_array(scores.hist, ctx)
    metrics = split_metrics(cm, scores, class_names)
    if loss_fn is not None:
        total, n = sum_array(loss_sum, ctx)
        metrics["loss"] = total / max(n, 1)
    return metrics
