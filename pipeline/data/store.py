"""data/processed's arrays: one `.npy` per image, label, weight map and class-location sample,
so that a loader worker memory-maps an image and reads only the bytes of the patch it cuts.

    {split}/images/<stem>.npy     (H, W, C) uint8: the model's input (CLAHE and scale applied)
    {split}/labels/<stem>.npy     (H, W) uint8 class indices, 255 = ignore (train: at the
                                  images' size; val/test: full size, scored at that size)
    test/second/<stem>.npy        DRIVE: the second observer's tracing, as a label
    train/weights/<stem>.npy      (H, W) float16 border weight maps (preprocess.border_weights)
    train/locations/<stem>.npy    (K, 3) int32 rows (class, y, x): up to LOCATIONS pixels of
                                  each class the label holds, where forced patches centre

Read them with `numpy.load(path, mmap_mode="r")` (data/README.md).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from pipeline.core import paths
from pipeline.core.common import PipelineError

LOCATIONS = 256  # pixels kept per class and image: enough to vary the centre of forced patches


def array_path(split: str, kind: str, stem: str, processed: Path | None = None) -> Path:
    return paths.split_dir(split, kind, processed) / f"{stem}.npy"


def save_array(folder: Path, stem: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{stem}.npy", np.ascontiguousarray(array))


def open_array(path: Path) -> np.ndarray:
    """The array memory-mapped read-only: slicing it reads only the slice's pages."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise PipelineError(
            f"{path}: unreadable processed array ({reason}); re-run it: dvc repro -f preprocess"
        ) from None


def array_shape(path: Path) -> tuple[int, ...]:
    """The shape from the .npy header alone (nothing else is read)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read(f)
        return tuple(shape)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise PipelineError(
            f"{path}: unreadable processed array ({reason}); re-run it: dvc repro -f preprocess"
        ) from None


def class_locations(label: np.ndarray, num_classes: int, stem: str) -> np.ndarray:
    """(K, 3) int32 rows (class, y, x): up to LOCATIONS pixels of every class in `label`, drawn
    with a seed from the image's name alone (the same for any number of preprocess workers)."""
    rng = np.random.default_rng(zlib.crc32(stem.encode()))
    rows = []
    for c in range(num_classes):
        ys, xs = np.nonzero(label == c)
        if len(ys) > LOCATIONS:
            keep = np.sort(rng.choice(len(ys), LOCATIONS, replace=False))
            ys, xs = ys[keep], xs[keep]
        rows.append(np.stack([np.full(len(ys), c), ys, xs], axis=1))
    return np.concatenate(rows).astype(np.int32)
