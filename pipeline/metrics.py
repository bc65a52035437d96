"""Segmentation metrics from a confusion matrix accumulated over a whole split.

Never averaged per batch or per image: every non-ignored pixel of the split counts once.
"""

from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """rows = true class, columns = predicted class; pixels labelled `ignore_index` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of the same shape (e.g. (B, H, W))."""
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        valid = target != self.ignore_index
        t, p = target[valid].long().cpu(), pred[valid].long().cpu()
        for what, v in (("label", t), ("prediction", p)):
            bad = v[(v < 0) | (v >= self.num_classes)]
            if bad.numel():
                raise ValueError(f"{what} value {int(bad[0])} outside 0..{self.num_classes - 1}")
        idx = t * self.num_classes + p
        self.matrix += (
            torch.bincount(idx, minlength=self.num_classes**2)
            .view(self.num_classes, self.num_classes)
            .numpy()
        )

    def compute(self, class_names: list[str] | None = None) -> dict[str, float]:
        """global_accuracy, mean_accuracy, miou, dice and per-class iou_<name>.

        Classes absent from both truth and prediction are left out of the means. `dice` is the
        foreground (class 1) Dice for binary tasks and the mean Dice over classes otherwise.
        """
        m = self.matrix.astype(np.float64)
        tp, true, pred = np.diag(m), m.sum(1), m.sum(0)
        total = m.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = tp / true
            iou = tp / (true + pred - tp)
            dice = 2 * tp / (true + pred)
        names = class_names or [str(c) for c in range(self.num_classes)]
        out = {
            "global_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_accuracy": float(np.nanmean(acc)) if (true > 0).any() else float("nan"),
            "miou": float(np.nanmean(iou)) if (true + pred > 0).any() else float("nan"),
            "dice": float(dice[1] if self.num_classes == 2 else np.nanmean(dice)),
        }
        for name, value in zip(names, iou, strict=True):
            out[f"iou_{name}"] = float(value)
        return out
