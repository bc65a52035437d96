"""The segmentation loss (pixel-weighted CE + soft Dice + optional focal), class weights, deep
supervision, and the logits -> probabilities convention.

Binary tasks use one sigmoid channel (BCE); multi-class tasks use softmax (CE). Pixels labelled
`ignore_index` (255) contribute nothing to any term, nor any gradient.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.common import PipelineError

if TYPE_CHECKING:
    from pipeline.core.config import LossParams
    from pipeline.data.manifest import Manifest

log = logging.getLogger(__name__)


class SegmentationLoss(nn.Module):
    """ce_weight * CE + dice_weight * Dice + focal_weight * Focal, all over non-ignored pixels.

    - CE: per-pixel (B)CE weighted by class_weights[target] (binary: [background, foreground])
      times the pixel weight map, reduced as sum(w * ce) / sum(w); with class weights alone it
      equals `F.cross_entropy(..., weight=class_weights, ignore_index=255)`.
    - Dice: `soft_dice_loss` over the whole batch, smp's DiceLoss(smooth 0) computed without
      its one-hot (binary: the foreground's 1 - Dice; multi-class: the mean of 1 - Dice over
      all classes); a class absent from the batch's labels counts 0. Unweighted: Dice is a set
      measure, pixel weights mean little there.
    - Focal: -(1 - p_t)^gamma * log p_t, the mean over valid pixels, unweighted. Binary it equals
      smp's FocalLoss("binary"); multi-class it is the softmax focal loss (smp's multi-class
      FocalLoss is one-vs-rest sigmoid, which neither matches our softmax head nor reduces to
      CE at gamma 0).
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        focal_weight: float = 0.0,
        focal_gamma: float = 2.0,
        class_weights: list[float] | None = None,
        ignore_index: int = 255,
    ):
        super().__init__()
        self.ce_weight, self.dice_weight = ce_weight, dice_weight
        self.focal_weight, self.focal_gamma = focal_weight, focal_gamma
        self.ignore_index = ignore_index
        # a buffer so that .to(device) moves it with the module
        cw = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", cw, persistent=False)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits (B, 1 | C, H, W), target (B, H, W) int with ignore_index allowed, weight
        (B, H, W) per-pixel weights (the border weight map) or None."""
        self._check(logits, target, weight)
        logits = logits.float()  # autocast may hand us bf16/fp16: the sums need float32
        valid = target != self.ignore_index  # (B, H, W)
        if not valid.any():
            return logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
        binary = logits.shape[1] == 1
        safe = torch.where(valid, target, torch.zeros_like(target))  # (B, H, W)
        if binary:
            ce = F.binary_cross_entropy_with_logits(
                logits[:, 0], safe.float(), reduction="none"
            )  # (B, H, W)
        else:
            ce = F.cross_entropy(logits, safe, reduction="none")  # (B, H, W)

        total = logits.new_zeros(())
        if self.ce_weight:
            w = valid.float()  # (B, H, W)
            if self.class_weights is not None:
                # .to: a no-op once the loss is on the logits' device, which callers may forget
                w = w * self.class_weights.to(logits.device)[safe]
            if weight is not None:
                w = w * weight.float()
            # tiny floor: all-zero weights give 0, not 0 / 0
            total = total + self.ce_weight * (w * ce).sum() / w.sum().clamp_min(1e-30)
        if self.dice_weight:
            total = total + self.dice_weight * soft_dice_loss(logits, safe, valid)
        if self.focal_weight:
            # ce = -log p_t in both modes; the floor keeps pow's gradient finite where p_t = 1
            modulating = (1 - torch.exp(-ce)).clamp_min(1e-12) ** self.focal_gamma
            focal = (modulating * ce)[valid].mean()
            total = total + self.focal_weight * focal
        return total

    def _check(self, logits, target, weight) -> None:
        b, c, h, w = logits.shape
        if target.shape != (b, h, w):
            raise ValueError(f"target {tuple(target.shape)} does not match logits {(b, c, h, w)}")
        if weight is not None and weight.shape != target.shape:
            raise ValueError(f"weight {tuple(weight.shape)} does not match target {(b, h, w)}")
        classes = max(c, 2)
        if self.class_weights is not None and len(self.class_weights) != classes:
            raise ValueError(f"{len(self.class_weights)} class weights for {classes} classes")


def soft_dice_loss(logits: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """smp's DiceLoss(mode, from_logits=True, smooth=0, ignore_index) without its one-hot.

    logits (B, 1 | C, H, W); safe (B, H, W) class indices, 0 where ignored; valid (B, H, W) the
    non-ignored pixels. Per class c over the whole batch: 1 - 2 I_c / (P_c + T_c), with
    I_c = sum p_c over pixels labelled c, P_c = sum p_c over valid pixels, T_c = pixels
    labelled c; 0 for a class without labelled pixels; binary scores the foreground alone,
    multi-class the mean over classes. smp builds a (B, C, H*W) one-hot target and an L1 norm
    for I_c: at CamVid's 11 classes that made a validation pass 2x slower than it is with a
    gather and an index_add (the same sums, tested against smp).
    """
    mask = valid.unsqueeze(1)  # (B, 1, H, W)
    if logits.shape[1] == 1:  # the foreground channel: I = sum p t, T = sum t
        p = torch.sigmoid(logits) * mask  # (B, 1, H, W)
        t = safe.unsqueeze(1).to(p.dtype)
        counts = t.sum().reshape(1)
        inter = (p * t).sum().reshape(1)
        psum = p.sum().reshape(1)
    else:
        c = logits.shape[1]
        p = torch.softmax(logits, dim=1) * mask  # (B, C, H, W)
        psum = p.sum(dim=(0, 2, 3))  # (C,)
        labels = safe[valid]  # (N,)
        p_true = p.gather(1, safe.unsqueeze(1))[:, 0][valid]  # (N,) p of each pixel's class
        inter = p.new_zeros(c).index_add(0, labels, p_true)  # (C,)
        counts = torch.bincount(labels, minlength=c).to(p.dtype)
    score = 2 * inter / (psum + counts).clamp_min(1e-7)  # smp's eps
    return ((1 - score) * (counts > 0)).mean()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over several heads' outputs (UNet++), shallowest head first.

    After each call `final_loss` holds the deepest head's loss alone (detached)."""

    def __init__(self, loss: nn.Module, weights: list[float]):
        super().__init__()
        self.loss, self.weights = loss, list(weights)
        self.final_loss: torch.Tensor | None = None

    def forward(
        self,
        outputs: torch.Tensor | list[torch.Tensor],
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
    ):
        if isinstance(outputs, torch.Tensor):
            self.final_loss = self.loss(outputs, target, weight)
            return self.final_loss
        if len(outputs) != len(self.weights):
            raise ValueError(f"{len(outputs)} heads but {len(self.weights)} weights")
        losses = [self.loss(o, target, weight) for o in outputs]
        # the deepest head's loss, detached: what validation scores (the model's output in eval
        # mode), so the training curve can be drawn on the same footing as the validation one
        self.final_loss = losses[-1].detach()
        return sum(w * loss for w, loss in zip(self.weights, losses, strict=True))


def median_frequency_weights(class_pixels: list[int]) -> list[float]:
    """Median-frequency balancing (Eigen & Fergus 2015): w_c = median(freq) / freq_c.

    freq_c = pixels of class c / all labelled pixels of the split. The paper divides by the
    pixels of the images where c is present instead; we only keep a per-split histogram, so
    the split's total it is (the weights differ only for classes missing from many images).
    Classes without pixels get weight 0 and stay out of the median.
    """
    pixels = np.asarray(class_pixels, dtype=np.float64)
    present = pixels > 0
    if not present.any():
        raise PipelineError("loss.class_weights: median_frequency needs labelled pixels")
    freq = pixels / pixels.sum()
    weights = np.zeros_like(freq)
    weights[present] = np.median(freq[present]) / freq[present]
    return weights.tolist()


def resolve_class_weights(loss_params: LossParams, manifest: Manifest) -> list[float] | None:
    """loss.class_weights -> one CE weight per class, or None."""
    spec, n = loss_params.class_weights, manifest.num_classes
    if spec is None:
        return None
    if spec in ("median_frequency", "sqrt_median_frequency"):
        weights = median_frequency_weights(manifest.train_class_pixels)
        if spec == "sqrt_median_frequency":  # milder: ratios are the square roots
            weights = [w**0.5 for w in weights]
        log.info("%s class weights: %s", spec, [round(w, 4) for w in weights])
        return weights
    if len(spec) != n:
        names = ", ".join(manifest.class_names)
        raise PipelineError(f"loss.class_weights: {len(spec)} weights for {n} classes ({names})")
    if not any(spec):
        raise PipelineError("loss.class_weights: all weights are 0")
    return [float(w) for w in spec]


def build_eval_loss(loss_params: LossParams, manifest: Manifest) -> SegmentationLoss:
    """The plain (single-output) loss, e.g. for the validation loss."""
    return SegmentationLoss(
        loss_params.ce_weight,
        loss_params.dice_weight,
        loss_params.focal_weight,
        loss_params.focal_gamma,
        resolve_class_weights(loss_params, manifest),
        manifest.ignore_index,
    )


def build_loss(
    loss_params: LossParams, arch_has_deep_supervision: bool, manifest: Manifest
) -> nn.Module:
    """The training loss: SegmentationLoss, summed over the heads with loss.ds_weights when the
    architecture has deep supervision."""
    base = build_eval_loss(loss_params, manifest)
    if arch_has_deep_supervision:
        return DeepSupervisionLoss(base, loss_params.ds_weights)
    return base
