"""Windows and resizing: the grid of windows over an image, mirror padding for images smaller
than a patch, antialiased resizing for `preprocess.scale`."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.core.common import scaled_size


def crop_origins(length: int, size: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every `stride`, plus one flush with the far border."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def pad_to_size(array: np.ndarray, size: int, fill: int | None = None) -> np.ndarray:
    """`array` (H, W[, C]) padded at its bottom and right to at least `size` px a side: mirrored
    (an image) or with `fill` (labels: 255, ignored; weight maps: 0)."""
    h, w = array.shape[:2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if not (ph or pw):
        return array
    pad = ((0, ph), (0, pw)) + ((0, 0),) * (array.ndim - 2)
    if fill is not None:
        return np.pad(array, pad, constant_values=fill)
    return np.pad(array, pad, mode="reflect" if min(h, w) > 1 else "edge")


def resize(image: np.ndarray, scale: float, label: bool = False) -> np.ndarray:
    """`image` (H, W[, C]) uint8 resized by `scale`: antialiased bilinear for images (what
    prediction does to its input, torch's antialias matching PIL's), nearest for labels."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    nh, nw = scaled_size(h, w, scale)
    mode = Image.Resampling.NEAREST if label else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((nw, nh), mode))
