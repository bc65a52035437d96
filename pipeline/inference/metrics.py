"""Segmentation metrics accumulated over a whole split.

Never averaged per batch or per image: every non-ignored pixel of the split counts once. Both
accumulators keep their state in one numpy int64 array (`ConfusionMatrix.matrix`,
`ScoreHistogram.hist`) so that distributed training can all-reduce it by summing before
`compute()`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where tensors are counted: preprocess scores without torch
    import torch


class ConfusionMatrix:
    """rows = true class, columns = predicted class; pixels labelled `ignore_index` are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of the same shape (e.g. (B, H, W))."""
        import torch

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
        """Metrics of the accumulated matrix.

        Always: global_accuracy, mean_accuracy (mean per-class recall), miou, dice, and per class
        iou_<name> and dice_<name> (Dice = F1 = 2 tp / (true + pred)). Classes absent from both
        truth and prediction get NaN and are left out of the means. `dice` is the foreground
        (class 1) Dice for binary tasks and the mean Dice over classes otherwise.

        Binary tasks (num_classes == 2, class 1 = foreground) also get sensitivity (recall of
        class 1), specificity (recall of class 0), precision (of class 1) and f1 (= dice).
        Every ratio whose denominator is zero is NaN.
        """
        m = self.matrix.astype(np.float64)
        tp, true, pred = np.diag(m), m.sum(1), m.sum(0)
        total = m.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = tp / true
            iou = tp / (true + pred - tp)
            dice = 2 * tp / (true + pred)
            prec = tp / pred
        names = class_names or [str(c) for c in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        out = {
            "global_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_accuracy": float(np.nanmean(acc)) if (true > 0).any() else float("nan"),
            "miou": float(np.nanmean(iou)) if (true + pred > 0).any() else float("nan"),
            "dice": float(
                dice[1]
                if self.num_classes == 2
                else (np.nanmean(dice) if (true + pred > 0).any() else np.nan)
            ),
        }
        for name, value in zip(names, iou, strict=True):
            out[f"iou_{name}"] = float(value)
        for name, value in zip(names, dice, strict=True):
            out[f"dice_{name}"] = float(value)
        if self.num_classes == 2:
            out["sensitivity"] = float(acc[1])
            out["specificity"] = float(acc[0])
            out["precision"] = float(prec[1])
            out["f1"] = float(dice[1])
        return out


class ScoreHistogram:
    """Foreground-probability histogram of a binary task, for AUC-ROC and AUC-PR over a split.

    Every non-ignored pixel's score s (its foreground probability, in [0, 1]) goes to bin
    min(floor(s * bins), bins - 1) (computed in float64, so exactly) of row `target` of the
    int64 array `hist` (shape (2, bins): row 0 negatives, row 1 positives). Summing the `hist`
    of several accumulators (e.g. a DDP all-reduce) gives the histogram of all their pixels.

    `compute()` evaluates the ROC and precision-recall curves at the bin edges, i.e. exactly as
    if each score were quantised to floor(s * bins) / bins: scores in one bin are ties.
    AUC-ROC is the trapezoid rule over the ROC points (ties count half, exactly like sklearn's
    `roc_auc_score` on the quantised scores); AUC-PR is the average precision
    sum_n (R_n - R_{n-1}) * P_n over the thresholds, high to low (like sklearn's
    `average_precision_score` on the quantised scores); with the default 10,000 bins both are
    typically well within 1e-3 of the unquantised figures. Both are NaN when either class has
    no pixel.
    """

    def __init__(self, bins: int = 10_000, ignore_index: int = 255):
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        self.bins, self.ignore_index = int(bins), ignore_index
        self.hist = np.zeros((2, self.bins), dtype=np.int64)

    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        """prob: float foreground probabilities (e.g. (B, H, W), any device and float dtype);
        target: integer labels of the same shape, 0, 1 or `ignore_index`. The scores of ignored
        pixels are not looked at."""
        import torch

        if prob.shape != target.shape:
            raise ValueError(f"prob {tuple(prob.shape)} and target {tuple(target.shape)} differ")
        if not prob.is_floating_point():
            raise ValueError(f"prob must be a floating-point tensor, got {prob.dtype}")
        target = target.to(prob.device)
        valid = target != self.ignore_index
        bad = valid & (target != 0) & (target != 1)
        if bad.any():
            raise ValueError(
                f"label value {int(target[bad][0])} is not 0, 1 "
                f"or the ignore index {self.ignore_index}"
            )
        if (valid & torch.isnan(prob)).any():
            raise ValueError("prob contains NaN")
        bad = valid & ((prob < 0) | (prob > 1))
        if bad.any():
            raise ValueError(f"prob value {float(prob[bad][0])} outside [0, 1]")
        # float64 makes s * bins exact; truncation is floor for s >= 0. Whole-tensor ops (no
        # boolean indexing): ignored pixels go to an extra bin that is dropped.
        idx = (prob.double() * self.bins).to(torch.int32).clamp_(max=self.bins - 1)
        idx += target.to(torch.int32) * self.bins
        idx.masked_fill_(~valid, 2 * self.bins)
        counts = torch.bincount(idx.view(-1), minlength=2 * self.bins + 1)[: 2 * self.bins]
        self.hist += counts.view(2, self.bins).cpu().numpy()

    def compute(self) -> dict[str, float]:
        """{"auc_roc": ..., "auc_pr": ...} of the accumulated histogram (see the class doc)."""
        neg, pos = self.hist[0][::-1], self.hist[1][::-1]  # highest scores first
        n_neg, n_pos = int(neg.sum()), int(pos.sum())
        if n_neg == 0 or n_pos == 0:
            return {"auc_roc": math.nan, "auc_pr": math.nan}
        # predicted positive at threshold edge: every bin at or above it
        tp = np.cumsum(pos).astype(np.float64)
        fp = np.cumsum(neg).astype(np.float64)
        keep = (pos + neg) > 0  # thresholds that are some pixel's (quantised) score
        tp, fp, pos = tp[keep], fp[keep], pos[keep]
        tpr = np.concatenate([[0.0], tp / n_pos])
        fpr = np.concatenate([[0.0], fp / n_neg])
        auc_roc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)
        auc_pr = float(np.sum(pos / n_pos * (tp / (tp + fp))))
        return {"auc_roc": auc_roc, "auc_pr": auc_pr}


def split_metrics(
    cm: ConfusionMatrix, scores: ScoreHistogram | None, class_names: list[str] | None = None
) -> dict[str, float]:
    """The confusion-matrix metrics of a split, plus auc_roc and auc_pr when `scores` is given."""
    out = cm.compute(class_names)
    if scores is not None:
        out.update(scores.compute())
    return out
