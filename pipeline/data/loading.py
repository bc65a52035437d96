"""Torch datasets over data/processed: training crops (augmented) and full-size split images.

A training crop's augmentation depends only on (seed, epoch, index), never on which process or
worker loads it or on what was loaded before: a resumed run, a run with more workers and a DDP
run all see exactly the same augmented crops.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from pipeline import paths
from pipeline.common import PipelineError
from pipeline.data.manifest import Manifest
from pipeline.data.sources import read_image


def transforms(manifest: Manifest, augment: str, seed: int | None = None) -> A.Compose:
    """Normalise with the train split's mean/std, after the training crops' augmentation:
    `dihedral` flips and rotates by 90 degrees (exact on the pixel grid, for images with no up:
    vessels, cells); `scene` keeps the up of photographs (sky above road): a horizontal flip,
    a zoom into part of the crop (up to 1.7x) and brightness/contrast jitter; `none` only
    normalises."""
    ops: list[A.BasicTransform] = []
    if augment == "dihedral":
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    elif augment == "scene":
        size = (manifest.crop_size, manifest.crop_size)
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


def _read_weight(path: Path) -> np.ndarray:
    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable weight map ({exc})") from None


class SegmentationDataset(Dataset):
    """Image/label PNG pairs, held in memory: (C, H, W) float32 image, (H, W) int64 label,
    plus an (H, W) float32 pixel-weight map when `weight_paths` are given.

    Index `epoch * len(self) + i` (see `EpochSampler`) loads item i augmented for that epoch:
    the augmentation is seeded by (seed, epoch, i) alone.
    """

    def __init__(
        self,
        image_paths: list[Path],
        label_paths: list[Path],
        transform: A.Compose,
        in_channels: int = 3,
        weight_paths: list[Path] | None = None,
        seed: int = 0,
    ):
        if not image_paths:
            raise PipelineError("empty dataset: no images to load")
        mode = "L" if in_channels == 1 else "RGB"
        # our own outputs: preprocess checked their size against dataset.max_image_pixels
        self.images = [_hwc(read_image(p, mode, max_pixels=0)) for p in image_paths]  # (H, W, C)
        self.labels = [read_image(p, "L", max_pixels=0) for p in label_paths]
        self.weights = [_read_weight(p) for p in weight_paths] if weight_paths else None
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, ...]:
        epoch, idx = divmod(key, len(self.images))
        seed = np.random.SeedSequence([self.seed, epoch, idx]).generate_state(1)[0]
        self.transform.set_random_seed(int(seed))
        extra = {"weight": self.weights[idx]} if self.weights is not None else {}
        if self.images[idx].shape[:2] != self.labels[idx].shape:
            # preprocess.scale: a val/test image is smaller than its full-size label; these
            # splits are only normalised, so the label passes through unchanged
            out = self.transform(image=self.images[idx])
            return _tensor(out["image"].transpose(2, 0, 1)), _tensor(self.labels[idx]).long()
        out = self.transform(image=self.images[idx], mask=self.labels[idx], **extra)
        image = _tensor(out["image"].transpose(2, 0, 1))
        label = _tensor(out["mask"]).long()
        return (image, label, _tensor(out["weight"])) if extra else (image, label)


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


def crops_dataset(manifest: Manifest, augment: str, seed: int) -> SegmentationDataset:
    names = manifest.crops
    weights = None
    if manifest.border_weights:
        weights = [paths.crops_dir("weights") / f"{n}.npy" for n in names]
    return SegmentationDataset(
        [paths.crops_dir("images") / f"{n}.png" for n in names],
        [paths.crops_dir("labels") / f"{n}.png" for n in names],
        transforms(manifest, augment, seed),
        manifest.in_channels,
        weights,
        seed,
    )


def split_dataset(manifest: Manifest, split: str, limit: int | None = None) -> SegmentationDataset:
    """Full-size images of a split (the first `limit` of them), normalised, not augmented."""
    stems = manifest.splits[split][:limit]
    if not stems:
        raise PipelineError(f"{paths.MANIFEST}: split {split!r} is empty")
    return SegmentationDataset(
        [paths.split_dir(split, "images") / f"{s}.png" for s in stems],
        [paths.split_dir(split, "labels") / f"{s}.png" for s in stems],
        transforms(manifest, augment="none"),
        manifest.in_channels,
    )
