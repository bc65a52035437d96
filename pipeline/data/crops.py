"""Training crops and resizing: grid or seeded random windows over an image and its label,
mirror-padded when the image is smaller than a crop; antialiased resizing for
`preprocess.scale`."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.common import scaled_size
from pipeline.config import IGNORE_INDEX


def crop_origins(length: int, size: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every `stride`, plus one flush with the far border."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def pad_to_crop(image: np.ndarray, label: np.ndarray, size: int):
    """Mirror-pad an image smaller than a crop (labels padded with 255: ignored)."""
    h, w = label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pad = ((0, ph), (0, pw)) + ((0, 0),) * (image.ndim - 2)
        image = np.pad(image, pad, mode="reflect" if min(h, w) > 1 else "edge")
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return image, label


def make_crops(
    image: np.ndarray,
    label: np.ndarray,
    size: int,
    stride: int,
    count: int = 0,
    rng: np.random.Generator | None = None,
):
    """Yield (y, x, image_crop, label_crop): a grid every `stride` px (count == 0) or `count`
    random windows (seeded by `rng`). Crops that hold only ignored pixels are skipped."""
    image, label = pad_to_crop(image, label, size)
    h, w = label.shape
    if count:
        rng = rng or np.random.default_rng(0)
        origins = sorted(
            {
                (int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)))
                for _ in range(count)
            }
        )
    else:
        origins = [
            (y, x) for y in crop_origins(h, size, stride) for x in crop_origins(w, size, stride)
        ]
    for y, x in origins:
        lab = label[y : y + size, x : x + size]
        if (lab != IGNORE_INDEX).any():
            yield y, x, image[y : y + size, x : x + size], lab


def resize(image: np.ndarray, scale: float, label: bool = False) -> np.ndarray:
    """`image` (H, W[, C]) uint8 resized by `scale`: antialiased bilinear for images (what
    prediction does to its input, torch's antialias matching PIL's), nearest for labels."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    nh, nw = scaled_size(h, w, scale)
    mode = Image.Resampling.NEAREST if label else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(image).resize((nw, nh), mode))
