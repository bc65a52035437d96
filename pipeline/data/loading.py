"""Torch datasets over data/processed: training patches sampled from the memory-mapped images
(augmented), and full-size split images read one at a time.

A training patch (its window and its augmentation) depends only on (seed, epoch, index), never
on which process or worker loads it or on what was loaded before: a resumed run, a run with
more workers and a DDP run all see exactly the same patches.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from pipeline.core import paths
from pipeline.core.common import PipelineError
from pipeline.core.config import IGNORE_INDEX, Params
from pipeline.data.crops import crop_origins, pad_to_size
from pipeline.data.manifest import Manifest
from pipeline.data.store import array_path, array_shape, open_array


def transforms(
    manifest: Manifest, augment: str, size: int = 0, seed: int | None = None
) -> A.Compose:
    """Normalise with the train split's mean/std, after the training crops' augmentation:
    `dihedral` flips and rotates by 90 degrees (exact on the pixel grid, for images with no up:
    vessels, cells); `scene` keeps the up of photographs (sky above road): a horizontal flip,
    a zoom into part of the crop (up to 1.7x) and brightness/contrast jitter; `none` only
    normalises."""
    ops: list[A.BasicTransform] = []
    if augment == "dihedral":
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    elif augment == "scene":
        size = (size, size)  # the patches'
        ops += [
            A.HorizontalFlip(p=0.5),
            # labels and weight maps are resized nearest-neighbour: 255 (ignore) stays 255
            A.RandomResizedCrop(size=size, scale=(0.35, 1.0), ratio=(0.75, 4 / 3), p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        ]
    elif augment != "none":
        raise PipelineError(f"train.augment: unknown {augment!r} (none | dihedral | scene)")
    ops.append(A.Normalize(mean=manifest.mean, std=manifest.std, max_pixel_value=255.0))
    # a border weight map travels with the label (flipped and rotated, never normalised)
    return A.Compose(ops, strict=True, seed=seed, additional_targets={"weight": "mask"})


def _hwc(image: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) -> (H, W, 1), so every image has a channel axis."""
    return image[..., None] if image.ndim == 2 else image


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _augment_seed(seed: int, epoch: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, k]).generate_state(1)[0])


class PatchDataset(Dataset):
    """Training patches of `size` px cut from the memory-mapped training images (store.py):
    item `epoch * len(self) + k` (see `EpochSampler`) is patch k of that epoch, its window and
    its augmentation drawn from (seed, epoch, k) alone, never from which process or worker
    loads it or what was loaded before. Items: (C, size, size) float32 image, (size, size)
    int64 label, plus the (size, size) float32 border weights when the data has them.

    `sampling` random: patch k lies on training image (k + epoch * len) mod n (every image alike),
    a `foreground` share of them centred on a pixel of one class the image holds (binary: the
    positive class; else drawn uniformly, so rare classes count as much as common ones), the
    rest anywhere, redrawn (up to 10 times, then centred on a labelled pixel) while entirely
    ignored. `sampling` grid: the same windows every `stride` px each epoch, those entirely
    ignored left out.
    """

    MAPS = 96  # open memory maps kept per process (images, labels, locations, weights)

    def __init__(
        self,
        stems: list[str],
        transform: A.Compose,
        size: int,
        *,
        sampling: str = "random",
        stride: int | None = None,
        per_epoch: int = 0,
        foreground: float = 0.0,
        binary: bool = True,
        weights: bool = False,
        seed: int = 0,
    ):
        if not stems:
            raise PipelineError(f"{paths.MANIFEST}: the train split is empty")
        self.stems, self.transform, self.size, self.seed = stems, transform, size, seed
        self.sampling, self.foreground, self.binary = sampling, foreground, binary
        self.weights = weights
        self._maps: dict[tuple[str, int], np.ndarray] = {}  # open memory maps, oldest first
        # (H, W) from the .npy headers: nothing is loaded (10,000 images take ~1 s)
        self.shapes = [array_shape(self._path("images", j))[:2] for j in range(len(stems))]
        stride = stride or size
        if sampling == "grid":
            self.windows = [w for j in range(len(stems)) for w in self._grid(j, stride)]
            if not self.windows:
                raise PipelineError(f"{paths.MANIFEST}: no training window holds a labelled pixel")
            self.n = len(self.windows)
        else:
            self.n = per_epoch or sum(len(self._origins(j, stride)) for j in range(len(stems)))

    def _path(self, kind: str, j: int) -> Path:
        return array_path("train", kind, self.stems[j])

    def _open(self, kind: str, j: int) -> np.ndarray:
        """Image j's `kind` array, memory-mapped; the MAPS most recently used stay open (a
        small dataset's patches then open nothing: ~1 ms a patch saved)."""
        array = self._maps.pop((kind, j), None)
        if array is None:
            array = open_array(self._path(kind, j))
            if len(self._maps) >= self.MAPS:
                self._maps.pop(next(iter(self._maps)))
        self._maps[(kind, j)] = array
        return array

    def __getstate__(self) -> dict:
        # a loader worker opens its own maps (a pickled memmap would copy the whole array)
        return {**self.__dict__, "_maps": {}}

    def _padded(self, j: int) -> tuple[int, int]:
        h, w = self.shapes[j]
        return max(h, self.size), max(w, self.size)

    def _origins(self, j: int, stride: int) -> list[tuple[int, int]]:
        h, w = self._padded(j)
        ys, xs = crop_origins(h, self.size, stride), crop_origins(w, self.size, stride)
        return [(y, x) for y in ys for x in xs]

    def _grid(self, j: int, stride: int) -> list[tuple[int, int, int]]:
        label = self._read("labels", j, 0, 0, whole=True)
        return [
            (j, y, x)
            for y, x in self._origins(j, stride)
            if (label[y : y + self.size, x : x + self.size] != IGNORE_INDEX).any()
        ]

    def _read(self, kind: str, j: int, y: int, x: int, whole: bool = False) -> np.ndarray:
        """The window at (y, x) of image j's array (the whole array with `whole`), read from
        the memory map; an image smaller than a patch is mirror-padded (labels with 255,
        weights with 0) as the grid crops were."""
        array = self._open(kind, j)
        h, w = self.shapes[j]
        if h < self.size or w < self.size:
            fill = {"labels": IGNORE_INDEX, "weights": 0}.get(kind)
            array = pad_to_size(np.asarray(array), self.size, fill)
        if whole:
            return np.asarray(array)
        return np.array(array[y : y + self.size, x : x + self.size])

    def _window(self, j: int, rng: np.random.Generator) -> tuple[int, int]:
        h, w = self._padded(j)
        if rng.random() < self.foreground:
            locations = self._open("locations", j)  # (K, 3): class, y, x
            classes = np.unique(locations[:, 0])
            if self.binary:
                classes = classes[classes == 1]
            if len(classes):
                return self._centred(j, locations, rng.choice(classes), rng)
        for _ in range(10):
            y, x = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
            if (self._read("labels", j, y, x) != IGNORE_INDEX).any():
                return y, x
        # mostly ignored (a small field of view): centre on any labelled pixel, if there is one
        locations = self._open("locations", j)
        return self._centred(j, locations, None, rng) if len(locations) else (y, x)

    def _centred(self, j: int, locations, cls, rng: np.random.Generator) -> tuple[int, int]:
        """A window centred (as far as the borders allow) on one of image j's stored pixels
        of class `cls` (None: of any class)."""
        h, w = self._padded(j)
        rows = locations if cls is None else locations[locations[:, 0] == cls]
        _, cy, cx = rows[rng.integers(len(rows))]
        y = int(np.clip(cy - self.size // 2, 0, h - self.size))
        x = int(np.clip(cx - self.size // 2, 0, w - self.size))
        return y, x

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> tuple[torch.Tensor, ...]:
        epoch, k = divmod(key, self.n)
        self.transform.set_random_seed(_augment_seed(self.seed, epoch, k))
        if self.sampling == "grid":
            j, y, x = self.windows[k]
        else:
            j = (k + epoch * self.n) % len(self.stems)
            y, x = self._window(j, np.random.default_rng([self.seed, epoch, k, 1]))
        image = _hwc(self._read("images", j, y, x))  # (size, size, C)
        label = self._read("labels", j, y, x)
        extra = {}
        if self.weights:
            extra["weight"] = self._read("weights", j, y, x).astype(np.float32)
        out = self.transform(image=image, mask=label, **extra)
        image = _tensor(out["image"].transpose(2, 0, 1))
        label = _tensor(out["mask"]).long()
        return (image, label, _tensor(out["weight"])) if extra else (image, label)


class SplitDataset(Dataset):
    """The full-size images of a split, read one at a time when asked for (a split never has
    to fit in memory): (C, H, W) float32 normalised image and (H, W) int64 label. Under
    preprocess.scale the image is smaller than its (full-size) label."""

    def __init__(self, split: str, stems: list[str], transform: A.Compose):
        if not stems:
            raise PipelineError(f"{paths.MANIFEST}: split {split!r} is empty")
        self.split, self.stems, self.transform = split, stems, transform

    def __len__(self) -> int:
        return len(self.stems)

    def shape(self, i: int) -> tuple[int, int]:
        """(H, W) of image i as the model sees it, from its header alone."""
        return array_shape(array_path(self.split, "images", self.stems[i]))[:2]

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image i as stored, (H, W, C) uint8, and its (H', W') uint8 label."""
        image = np.array(open_array(array_path(self.split, "images", self.stems[i])))
        label = np.array(open_array(array_path(self.split, "labels", self.stems[i])))
        return _hwc(image), label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.read(i)
        out = self.transform(image=image)  # normalised only: the label passes unchanged
        return _tensor(out["image"].transpose(2, 0, 1)), _tensor(label).long()


class EpochSampler(Sampler[int]):
    """DistributedSampler (seeded shuffle per epoch, this rank's share) whose indices carry the
    epoch, `epoch * n + i`, so the dataset can seed the augmentation by (epoch, i).

    With one process it is the single-process order; with N processes rank r takes every N-th
    index of the same permutation, so the N per-rank batches together form the single-process
    batch.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n = n
        self.inner = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return (self.epoch * self.n + i for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def train_dataset(manifest: Manifest, params: Params) -> PatchDataset:
    """The training patches `params.preprocess` asks for, augmented by `params.train.augment`."""
    pp = params.preprocess
    return PatchDataset(
        manifest.splits["train"],
        transforms(manifest, params.train.augment, pp.crop_size, params.seed),
        pp.crop_size,
        sampling=pp.sampling,
        stride=pp.crop_stride,
        per_epoch=pp.patches_per_epoch,
        foreground=pp.foreground,
        binary=manifest.binary,
        weights=manifest.border_weights is not None,
        seed=params.seed,
    )


def split_dataset(manifest: Manifest, split: str, limit: int | None = None) -> SplitDataset:
    """Full-size images of a split (the first `limit` of them), normalised, not augmented."""
    return SplitDataset(split, manifest.splits[split][:limit], transforms(manifest, "none"))
