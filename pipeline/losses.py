"""CE + Dice loss that ignores label 255, and the logits -> probabilities convention.

Binary tasks use one sigmoid channel (BCE); multi-class tasks use softmax (CE). Ignored pixels
contribute nothing: not to the CE mean, not to the Dice sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1 | C, H, W) logits -> (B, C, H, W) class probabilities (C = 2 for binary)."""
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def predict(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1 | C, H, W) logits -> (B, H, W) class indices."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)


class CEDiceLoss(nn.Module):
    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        ignore_index: int = 255,
        smooth: float = 1.0,
    ):
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.ignore_index, self.smooth = ignore_index, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, 1 | C, H, W), target (B, H, W) int with ignore_index allowed."""
        valid = target != self.ignore_index  # (B, H, W)
        if not valid.any():
            return logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
        safe = torch.where(valid, target, torch.zeros_like(target))
        if logits.shape[1] == 1:
            ce = F.binary_cross_entropy_with_logits(logits[:, 0][valid], safe[valid].float())
            probs = torch.sigmoid(logits[:, 0])[valid]
            onehot = safe[valid].float()
            # Dice of the foreground class, as usual for binary segmentation
            inter, total = (probs * onehot).sum(), probs.sum() + onehot.sum()
            dice = 1 - (2 * inter + self.smooth) / (total + self.smooth)
        else:
            ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
            probs = torch.softmax(logits, 1).permute(0, 2, 3, 1)[valid]  # (N, C)
            onehot = F.one_hot(safe[valid], logits.shape[1]).float()  # (N, C)
            inter = (probs * onehot).sum(0)
            total = probs.sum(0) + onehot.sum(0)
            dice = (1 - (2 * inter + self.smooth) / (total + self.smooth)).mean()
        return self.ce_weight * ce + self.dice_weight * dice


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over several heads' outputs (UNet++), shallowest head first."""

    def __init__(self, loss: nn.Module, weights: list[float]):
        super().__init__()
        self.loss, self.weights = loss, list(weights)

    def forward(self, outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor):
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        if len(outputs) != len(self.weights):
            raise ValueError(f"{len(outputs)} heads but {len(self.weights)} weights")
        return sum(w * self.loss(o, target) for w, o in zip(self.weights, outputs, strict=True))
