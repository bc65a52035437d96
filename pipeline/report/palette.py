"""Class colours: one palette for predicted masks (palette PNGs), overlays and report panels."""

from __future__ import annotations

import numpy as np

# class 0 (background) black, then distinct colours (CamVid's first, then vivid extras); beyond
# those, the Pascal VOC bit pattern, so all 256 indices of a palette PNG have a colour
COLOURS = [
    (0, 0, 0),
    (255, 40, 40),
    (128, 64, 128),
    (244, 35, 232),
    (70, 130, 180),
    (220, 220, 0),
    (0, 200, 0),
    (0, 0, 255),
    (255, 128, 0),
    (0, 255, 255),
    (153, 51, 255),
    (255, 255, 255),
    (128, 128, 0),
    (0, 128, 128),
    (255, 102, 178),
    (102, 51, 0),
    (64, 64, 128),
    (192, 192, 128),
    (0, 128, 192),
    (128, 0, 0),
    (64, 0, 128),
]


def palette() -> np.ndarray:
    """(256, 3) uint8: COLOURS, then the Pascal VOC colours of the remaining indices."""
    colours = list(COLOURS)
    for index in range(len(colours), 256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):  # VOC: spread the index's bits over the channels' MSBs
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return np.array(colours, dtype=np.uint8)


PALETTE = palette()


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image (RGB or (H, W) grey) half-blended with each pixel's class
    colour; background (class 0) pixels are left as they are."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    out = rgb.copy()
    fg = labels != 0
    out[fg] = ((rgb[fg].astype(np.uint16) + PALETTE[labels[fg]]) // 2).astype(np.uint8)
    return out


def label_image(labels: np.ndarray):
    """(H, W) uint8 class indices -> a palette PNG image: the pixel values are the indices,
    the palette only colours them for viewers."""
    from PIL import Image

    img = Image.fromarray(labels)  # "L"; a palette makes it "P", values unchanged
    img.putpalette(PALETTE.tobytes())
    return img
