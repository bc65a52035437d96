"""From logits to answers: the full-image forward (mirror-padded to the model's size multiple)
and the one convention for reading logits: binary tasks have one channel read through a sigmoid,
multi-class tasks C channels read through a softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.numerics import module_format


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
    if module_format(model) == torch.channels_last:  # NHWC input for an NHWC model
        x = x.contiguous(memory_format=torch.channels_last)
    out = model(x)
    return out[..., :h, :w]
