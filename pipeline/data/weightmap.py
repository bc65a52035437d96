"""The U-Net paper's weight map (Ronneberger et al. 2015, eq. 2):

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

w_c balances the class frequencies; d1 and d2 are the distances from x to the nearest and the
second-nearest object, so the border term is large in the narrow gaps between touching objects
and teaches the network to keep them apart. Objects are the 8-connected components of each
foreground class (class > 0), found per class and pooled. As in the paper's cell separation,
the border term only weights background pixels (label 0); ignored pixels (255) weigh 0.

Speed: an object's distance transform is computed only inside its bounding box grown by the
cutoff `border_cutoff(w0, sigma)`, beyond which the border term is below EPS_REL * w0; farther
pixels count as infinitely far. Any pixel whose second-nearest object lies within the cutoff
sees both objects' exact distances, so the map differs from the exact one by less than
EPS_REL * w0 (0.01 for w0 = 10).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

EPS_REL = 1e-3  # border terms below EPS_REL * w0 are dropped (see border_cutoff)
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


def border_cutoff(w0: float, sigma: float, eps_rel: float = EPS_REL) -> float:
    """Distance m with w0 * exp(-m^2 / (2 sigma^2)) = eps_rel * w0: since d1 + d2 >= d2, a
    pixel whose second-nearest object is farther than m has a border term below eps_rel * w0."""
    return sigma * math.sqrt(2 * math.log(1 / eps_rel))


def nearest_two_distances(
    label: np.ndarray, cutoff: float, ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) distances to the nearest and second-nearest object (inf beyond `cutoff`)."""
    d1 = np.full(label.shape, np.inf, dtype=np.float32)  # (H, W)
    d2 = np.full(label.shape, np.inf, dtype=np.float32)  # (H, W)
    margin = math.ceil(cutoff)
    h, w = label.shape
    for c in np.unique(label):
        if c == 0 or c == ignore_index:
            continue
        components, _ = ndimage.label(label == c, structure=EIGHT)
        for i, box in enumerate(ndimage.find_objects(components), start=1):
            # the object's bounding box grown by the cutoff holds every pixel within reach
            ys, xs = box
            window = (
                slice(max(ys.start - margin, 0), min(ys.stop + margin, h)),
                slice(max(xs.start - margin, 0), min(xs.stop + margin, w)),
            )
            d = ndimage.distance_transform_edt(components[window] != i).astype(np.float32)
            d[d > cutoff] = np.inf  # the same cutoff everywhere, wherever the window ends
            near, second = d1[window], d2[window]  # views: updated in place
            np.minimum(second, np.maximum(near, d), out=second)
            np.minimum(near, d, out=near)
    return d1, d2


def border_weight_map(
    label: np.ndarray,
    class_weights: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    ignore_index: int = 255,
) -> np.ndarray:
    """(H, W) uint8 label -> (H, W) float32 weights w_c(x) + the border term (module doc)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    class_weights = np.asarray(class_weights, dtype=np.float32)
    lut = np.zeros(256, dtype=np.float32)  # label value -> w_c; 255 stays 0
    lut[: len(class_weights)] = class_weights
    unknown = set(np.unique(label).tolist()) - set(range(len(class_weights))) - {ignore_index}
    if unknown:
        raise ValueError(f"label values {sorted(unknown)} have no class weight")
    weights = lut[label]  # (H, W)
    if w0 > 0:
        cutoff = border_cutoff(w0, sigma)
        d1, d2 = nearest_two_distances(label, cutoff, ignore_index)
        near = (label == 0) & np.isfinite(d2)  # fewer than two objects in reach: no term
        gap = d1[near] + d2[near]
        weights[near] += w0 * np.exp(-(gap**2) / (2 * sigma**2))
    return weights


def balanced_class_weights(class_pixels) -> np.ndarray:
    """w_c = total / (classes present * pixels_c), scaled so that the most frequent class gets 1
    (w_c = its pixels / pixels_c); classes without pixels get 0."""
    pixels = np.asarray(class_pixels, dtype=np.float64)
    present = pixels > 0
    if not present.any():
        raise ValueError("no labelled pixels to balance")
    weights = np.zeros_like(pixels)
    weights[present] = pixels.sum() / (present.sum() * pixels[present])
    return (weights / weights[present].min()).astype(np.float32)
