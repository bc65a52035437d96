"""Torch datasets over data/processed: training crops (augmented) and full-size split images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import paths
from pipeline.common import PipelineError, read_json
from pipeline.datasets import read_image


def load_manifest() -> dict[str, Any]:
    return read_json(paths.MANIFEST, "processed-data manifest")


def transforms(manifest: dict[str, Any], augment: bool, seed: int | None = None) -> A.Compose:
    """Normalise with the train split's mean/std; optionally flip and rotate by 90 degrees
    (label-preserving for vessels and exact on the pixel grid)."""
    ops: list[A.BasicTransform] = []
    if augment:
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    ops.append(A.Normalize(mean=manifest["mean"], std=manifest["std"], max_pixel_value=255.0))
    return A.Compose(ops, strict=True, seed=seed)


def _hwc(image: np.ndarray) -> np.ndarray:
    """Grayscale (H, W) -> (H, W, 1), so every image has a channel axis."""
    return image[..., None] if image.ndim == 2 else image


class SegmentationDataset(Dataset):
    """Image/label PNG pairs, held in memory: (C, H, W) float32 image, (H, W) int64 label."""

    def __init__(
        self,
        image_paths: list[Path],
        label_paths: list[Path],
        transform: A.Compose,
        in_channels: int = 3,
    ):
        if not image_paths:
            raise PipelineError("empty dataset: no images to load")
        mode = "L" if in_channels == 1 else "RGB"
        self.images = [_hwc(read_image(p, mode)) for p in image_paths]  # (H, W, C)
        self.labels = [read_image(p, "L") for p in label_paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.transform(image=self.images[idx], mask=self.labels[idx])
        image = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        return image, torch.from_numpy(np.ascontiguousarray(out["mask"])).long()


def crops_dataset(manifest: dict[str, Any], augment: bool, seed: int) -> SegmentationDataset:
    names = manifest["crops"]
    return SegmentationDataset(
        [paths.crops_dir("images") / f"{n}.png" for n in names],
        [paths.crops_dir("labels") / f"{n}.png" for n in names],
        transforms(manifest, augment, seed),
        manifest["in_channels"],
    )


def split_dataset(manifest: dict[str, Any], split: str) -> SegmentationDataset:
    """Full-size images of a split, normalised, not augmented."""
    stems = manifest["splits"][split]
    if not stems:
        raise PipelineError(f"{paths.MANIFEST}: split {split!r} is empty")
    return SegmentationDataset(
        [paths.split_dir(split, "images") / f"{s}.png" for s in stems],
        [paths.split_dir(split, "labels") / f"{s}.png" for s in stems],
        transforms(manifest, augment=False),
        manifest["in_channels"],
    )


def eval_loader(dataset: SegmentationDataset, batch_size: int) -> DataLoader:
    """Full-size images batch together only when they all share one size (a folder of your own
    may mix sizes); otherwise they go one at a time."""
    sizes = {image.shape[:2] for image in dataset.images}
    return DataLoader(dataset, batch_size=batch_size if len(sizes) == 1 else 1)
