"""The training data's fingerprint: what the rules (pipeline.autoconf.rules) decide from.

Measured on the raw training images and labels (at most MAX_IMAGES of them, seeded), as the
preprocess stage will read them:

- counts per split, image sizes (median, smallest, largest), channels, bit depth, intensity
  mean / std per channel and the lightness range (1st-99th percentile), in [0, 1];
- class pixel frequencies among the labelled pixels, and the share of ignored pixels;
- per class, the structures: their width (from the distance transform: the local width of
  the typical pixel), the size of the connected component the typical pixel lies in
  (equivalent diameter), how many components per image, and whether they are blobs
  (inscribed diameter close to the equivalent one: cells, polyps) rather than lines (vessels);
- touching objects: the share of blob components that merge with a neighbour when the mask
  grows by one pixel (objects drawn with a one-pixel gap), plus the share of blob area in
  merged clusters (two touching cells drawn as one region);
- an up: how much more the class layout differs between the top and bottom thirds of the
  images than between their left and right thirds (street scenes: sky above, road below);
- the contrast of the positive class against the background (binary), in background stds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.core.config import IGNORE_INDEX

MAX_IMAGES = 80  # enough for the statistics; reading all of a large dataset is not needed
RIDGE_SAMPLES = 4000  # pixels per class and image: the width's median needs no more


@dataclass
class ClassStats:
    name: str
    frequency: float  # share of the labelled pixels
    thickness: float  # px, the local width of the typical pixel (nan where absent)
    diameter: float  # px, equivalent diameter of the component the typical pixel lies in
    per_image: float  # components per image (mean)
    blob: float  # median inscribed / equivalent diameter of its components (disc: ~1, line: ~0)


@dataclass
class Fingerprint:
    dataset: str
    counts: dict[str, int]
    size: list[int]  # median (H, W)
    min_size: list[int]
    max_size: list[int]
    channels: int
    bit_depth: int
    mean: list[float]
    std: list[float]
    lightness_range: float  # 99th - 1st percentile of the lightness, in [0, 1]
    ignore: float  # share of ignored pixels
    classes: list[ClassStats]
    up: float  # top/bottom class-layout difference minus left/right (0: no up)
    touching: float  # share of blob objects touching or nearly touching a neighbour
    contrast: float  # binary: |mean(fg) - mean(bg)| / std(bg) of the lightness; nan otherwise
    sampled: int  # training images measured
    label_values: dict[int, int] = field(default_factory=dict)  # raw value -> pixels (folder)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def foreground(self) -> float:
        """The share of the positive class (binary) or of the rarest class (multi-class)."""
        if self.binary:
            return self.classes[1].frequency
        return min(c.frequency for c in self.classes)

    def objects(self) -> list[ClassStats]:
        """The classes whose structures matter: binary, the positive one; multi-class, all."""
        return [self.classes[1]] if self.binary else list(self.classes)

    def thickness(self) -> float:
        """The typical structure's width (median over the classes that matter)."""
        values = [c.thickness for c in self.objects() if math.isfinite(c.thickness)]
        return float(np.median(values)) if values else math.nan

    def diameter(self) -> float:
        values = [c.diameter for c in self.objects() if math.isfinite(c.diameter)]
        return float(np.median(values)) if values else math.nan

    def blobs(self) -> bool:
        """Compact objects (cells, nuclei, polyps), not lines or regions spanning the image."""
        return self.binary and self.classes[1].blob >= BLOB and self.classes[1].per_image >= 1

    def summary(self) -> dict[str, Any]:
        """The fingerprint as params.yaml and MLflow keep it: short keys, rounded numbers."""
        r3 = lambda v: None if not math.isfinite(v) else round(float(v), 4)  # noqa: E731
        return {
            "images": dict(self.counts),
            "size": list(self.size),
            "channels": self.channels,
            "bit_depth": self.bit_depth,
            "lightness_range": r3(self.lightness_range),
            "ignore": r3(self.ignore),
            # lists, not a mapping by name: class names are no MLflow or Hydra keys
            "classes": [c.name for c in self.classes],
            "class_frequency": [r3(c.frequency) for c in self.classes],
            "thickness_px": r3(self.thickness()),
            "object_diameter_px": r3(self.diameter()),
            "blobs": self.blobs(),
            "touching": r3(self.touching),
            "up": r3(self.up),
            "contrast": r3(self.contrast),
            "sampled": self.sampled,
        }

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["label_values"] = {str(k): v for k, v in self.label_values.items()}
        return out


BLOB = 0.6  # inscribed / equivalent diameter: a disc 1.0, a 4:1 ellipse 0.5, a line ~0.1


MIN_AREA = 4  # px: smaller components are label noise, not objects


def _widths(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(local widths of `mask`'s pixels, the distance transform). The distance to the nearest
    background pixel averages w/4 across a stripe of width w, so 4 x EDT - 2 measures, for each
    pixel, the width of the structure it lies in (a one-pixel line: 2, a stripe of 8 px: 8);
    a median over pixels is the width most of the class's area has."""
    edt = ndimage.distance_transform_edt(mask)
    inside = edt[mask]
    if inside.size > RIDGE_SAMPLES:
        inside = rng.choice(inside, RIDGE_SAMPLES, replace=False)
    return inside, edt


def _components(mask: np.ndarray, edt: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(areas, inscribed / equivalent diameters, how many of them merge into a neighbour when
    the mask grows by one pixel) of the connected regions of `mask` of MIN_AREA px or more."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(0), np.zeros(0), 0
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(mask, labels, index)
    inscribed = 2 * ndimage.maximum(edt, labels, index) - 1
    equivalent = np.sqrt(4 * area / math.pi)
    keep = area >= MIN_AREA
    grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3)))
    _, n_grown = ndimage.label(grown, structure=np.ones((3, 3)))
    merged = max(0, int(keep.sum()) - n_grown)
    return area[keep], (inscribed / np.maximum(equivalent, 1e-9))[keep], merged


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value at half the total weight (an area-weighted median: the typical pixel's)."""
    if values.size == 0:
        return math.nan
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


class _Accumulator:
    """Sums over the sampled images, turned into a Fingerprint by `finish`."""

    def __init__(self, num_classes: int, seed: int = 0):
        self.k = num_classes
        self.rng = np.random.default_rng(seed)
        self.pixels = np.zeros(num_classes, np.int64)
        self.ignored = 0
        self.total = 0
        sides = ("top", "bottom", "left", "right")
        self.thirds = {s: np.zeros(num_classes, np.int64) for s in sides}
        self.widths: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.areas: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.ratios: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
        self.count = np.zeros(num_classes, np.int64)
        self.merged = 0
        self.clustered = 0.0
        self.blob_area = 0.0
        self.channel_sum: np.ndarray | None = None
        self.channel_sq: np.ndarray | None = None
        self.light: list[np.ndarray] = []
        self.fg_light: list[float] = []
        self.bg_light: list[np.ndarray] = []
        self.images = 0

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        img = image.reshape(*image.shape[:2], -1).astype(np.float64) / 255.0  # (H, W, C)
        valid = label != IGNORE_INDEX
        pixels = img[valid]  # (N, C)
        if self.channel_sum is None:
            self.channel_sum = np.zeros(img.shape[-1])
            self.channel_sq = np.zeros(img.shape[-1])
        self.channel_sum += pixels.sum(0)
        self.channel_sq += (pixels**2).sum(0)
        light = pixels.mean(1)
        self.light.append(self.rng.choice(light, min(light.size, 20000), replace=False))
        self.total += label.size
        self.ignored += int((~valid).sum())
        self.pixels += np.bincount(label[valid].ravel(), minlength=self.k)[: self.k]
        h, w = label.shape
        for name, part in (
            ("top", label[: h // 3]),
            ("bottom", label[h - h // 3 :]),
            ("left", label[:, : w // 3]),
            ("right", label[:, w - w // 3 :]),
        ):
            part = part[part != IGNORE_INDEX]
            self.thirds[name] += np.bincount(part.ravel(), minlength=self.k)[: self.k]
        if self.k == 2:
            fg = (label == 1) & valid
            bg = (label == 0) & valid
            lightness = img.mean(-1)
            if fg.any() and bg.any():
                self.fg_light.append(float(lightness[fg].mean()))
                self.bg_light.append(self.rng.choice(lightness[bg], min(int(bg.sum()), 20000)))
        for c in range(1 if self.k == 2 else 0, self.k):
            mask = label == c
            if not mask.any():
                continue
            widths, edt = _widths(mask, self.rng)
            self.widths[c].append(4 * widths - 2)
            area, ratio, merged = _components(mask, edt)
            self.areas[c].append(area)
            self.ratios[c].append(ratio)
            self.count[c] += area.size
            if self.k == 2:
                self._touching(area, ratio, merged)
        self.images += 1

    def _touching(self, area: np.ndarray, ratio: np.ndarray, merged: int) -> None:
        """Blob objects that touch: neighbours one or two pixels apart (they merge when the
        mask grows by a pixel), or drawn as one region (a component far larger than the
        typical one and no longer a blob)."""
        if area.size < 3:
            return
        typical = np.median(area)
        self.merged += merged
        self.clustered += float(area[(area > 2.5 * typical) & (ratio < BLOB)].sum())
        self.blob_area += float(area.sum())

    def finish(self, names: list[str]) -> dict[str, Any]:
        n = max(self.images, 1)
        labelled = max(int(self.pixels.sum()), 1)
        classes = []
        for c, name in enumerate(names):
            widths = np.concatenate(self.widths[c]) if self.widths[c] else np.zeros(0)
            area = np.concatenate(self.areas[c]) if self.areas[c] else np.zeros(0)
            ratio = np.concatenate(self.ratios[c]) if self.ratios[c] else np.zeros(0)
            blob = weighted_median(ratio, area)
            classes.append(
                ClassStats(
                    name=name,
                    frequency=float(self.pixels[c] / labelled),
                    thickness=float(np.median(widths)) if widths.size else math.nan,
                    # the size of the object the typical pixel belongs to
                    diameter=weighted_median(np.sqrt(4 * area / math.pi), area),
                    per_image=float(self.count[c] / n),
                    blob=0.0 if math.isnan(blob) else blob,
                )
            )
        mean = self.channel_sum / labelled if self.channel_sum is not None else np.zeros(1)
        var = self.channel_sq / labelled - mean**2 if self.channel_sq is not None else mean
        light = np.concatenate(self.light) if self.light else np.zeros(1)
        lo, hi = np.percentile(light, [1, 99])
        contrast = math.nan
        if self.fg_light:
            bg = np.concatenate(self.bg_light)
            contrast = abs(float(np.mean(self.fg_light)) - float(bg.mean())) / max(bg.std(), 1e-6)
        objects = int(self.count[1]) if self.k == 2 else 0
        touching = 0.0
        if objects:
            touching = max(self.merged / objects, self.clustered / max(self.blob_area, 1e-9))
        return {
            "mean": [round(float(v), 4) for v in mean],
            "std": [round(float(math.sqrt(max(v, 0))), 4) for v in var],
            "lightness_range": float(hi - lo),
            "ignore": self.ignored / max(self.total, 1),
            "classes": classes,
            "up": layout_up(self.thirds),
            "touching": touching,
            "contrast": contrast,
            "sampled": self.images,
        }


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total variation distance of two class histograms (0: alike, 1: disjoint)."""
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    return 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())


def layout_up(thirds: dict[str, np.ndarray]) -> float:
    """How much the class layout differs from top to bottom beyond how it differs from left
    to right: an up (sky above, road below) shows in the first only; a symmetric field (a
    fundus, a tissue slide) differs alike in both, or in neither."""
    return max(0.0, _tv(thirds["top"], thirds["bottom"]) - _tv(thirds["left"], thirds["right"]))


def measure(
    samples, names: list[str], counts: dict[str, int], dataset: str, bit_depth: int = 8
) -> Fingerprint:
    """The fingerprint of `samples`: (image (H, W[, C]) uint8, label (H, W) class indices with
    255 = ignore) pairs of the training split."""
    acc = _Accumulator(len(names))
    sizes = []
    channels = 1
    for image, label in samples:
        sizes.append(label.shape)
        channels = 1 if image.ndim == 2 else image.shape[-1]
        acc.add(image, label)
    if not sizes:
        raise ValueError("no training images to measure")
    stats = acc.finish(names)
    hs, ws = zip(*sizes, strict=True)
    return Fingerprint(
        dataset=dataset,
        counts=dict(counts),
        size=[int(np.median(hs)), int(np.median(ws))],
        min_size=[int(min(hs)), int(min(ws))],
        max_size=[int(max(hs)), int(max(ws))],
        channels=channels,
        bit_depth=bit_depth,
        **stats,
    )
