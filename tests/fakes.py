"""Tiny fakes of the real dataset layouts (DRIVE, CamVid, a folder of your own), for tests."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

RNG = np.random.default_rng(0)
SIZE = (40, 36)  # (H, W): not a multiple of anything, smaller than some crops


def random_image(h=SIZE[0], w=SIZE[1], gray=False) -> np.ndarray:
    shape = (h, w) if gray else (h, w, 3)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def save_image(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def fov_mask(h=SIZE[0], w=SIZE[1]) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (min(h, w) / 2.2) ** 2).astype(np.uint8) * 255


def make_drive(root: Path, train: int = 5, test: int = 3) -> Path:
    """DRIVE's original layout: tif images, gif tracings and FOV masks, 2nd_manual for test."""
    top = root / "DRIVE"
    fov = fov_mask()
    for split, numbers in (("training", range(21, 21 + train)), ("test", range(1, 1 + test))):
        for n in numbers:
            kind = "training" if split == "training" else "test"
            save_image(top / split / "images" / f"{n:02d}_{kind}.tif", random_image())
            manual = (RNG.random(SIZE) < 0.15).astype(np.uint8) * 255
            save_image(top / split / "1st_manual" / f"{n:02d}_manual1.gif", manual)
            save_image(top / split / "mask" / f"{n:02d}_{kind}_mask.gif", fov)
            if split == "test":
                second = (RNG.random(SIZE) < 0.15).astype(np.uint8) * 255
                save_image(top / split / "2nd_manual" / f"{n:02d}_manual2.gif", second)
    return top


def make_camvid(root: Path, counts=(4, 2, 2)) -> Path:
    """SegNet's CamVid layout: jpg images, png annotations with 0..10 and 11 = void."""
    top = root / "CamVid"
    for split, count in zip(("train", "val", "test"), counts, strict=True):
        (top / split).mkdir(parents=True, exist_ok=True)
        (top / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"0001TP_{split}_{i:03d}"
            ext = ".png" if i == 0 else ".jpg"  # extensions vary; pairing is by stem
            save_image(top / split / f"{stem}{ext}", random_image())
            save_image(
                top / f"{split}annot" / f"{stem}.png", RNG.integers(0, 12, SIZE, dtype=np.uint8)
            )
    return top


def make_folder(root: Path, count=10, gray=False, masks=False, splits=False) -> Path:
    """Your own data: images/ and labels/ (0/255 masks), optional masks/ and split folders."""
    top = root / "mydata"
    groups = {"train": count, "val": 2, "test": 2} if splits else {"": count}
    for split, n in groups.items():
        for i in range(n):
            stem = f"{split or 'img'}{i:02d}"
            save_image(top / "images" / split / f"{stem}.png", random_image(gray=gray))
            label = (RNG.random(SIZE) < 0.3).astype(np.uint8) * 255
            save_image(top / "labels" / split / f"{stem}.png", label)
            if masks:
                save_image(top / "masks" / split / f"{stem}.png", fov_mask())
    return top


def zip_dir(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent))
    return archive


def random_target(num_classes: int, shape=(2, 8, 8), ignored: float = 0.3):
    """Random labels with about `ignored` of the pixels set to 255 (ignored)."""
    import torch

    target = torch.randint(0, num_classes, shape)
    target[torch.rand(shape) < ignored] = 255
    return target


# the smallest settings that still run every code path: base 4, depth 2 (two pruned depths),
# 32 px crops, one epoch, timings cut to one run, tracking off
TINY = {
    "epochs": 1,
    "batch_size": 4,
    "preprocess": {"crop_size": 32, "crop_stride": 32},
    "unet": {"base_channels": 4, "depth": 2},
    "unetpp": {"base_channels": 4, "depth": 2},
    "loss": {"ds_weights": [0.5, 0.5]},
    "pruning": {"depths": [1, 2], "latency_runs": 1, "latency_warmup": 0, "onnx": False},
    "mlflow": {"enabled": False},
}


def merged(base: dict, over: dict) -> dict:
    """`over` merged into `base`, section by section (a params.yaml overlay)."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = merged(base[key], value) if both else value
    return out


def tiny_params(**overrides) -> dict:
    """TINY with `overrides` merged in, section by section."""
    return merged(TINY, overrides)


def tiny_model(arch: str, **options):
    """A small seeded UNet / UNet++ (base 4, depth 2) whose BatchNorm running statistics are
    non-trivial, so eval-mode BN matters to whatever the test compares."""
    import torch
    from torch import nn

    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, 3, 2, **{"base_channels": 4, "depth": 2, **options})
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model


def fake_manifest(num_classes: int = 2, **fields):
    """A processed-data manifest (pipeline.data.manifest.Manifest) with plausible values for
    everything a test does not set."""
    from pipeline.data.manifest import Manifest

    in_channels = fields.pop("in_channels", 3)
    base = {
        "dataset": "fake",
        "num_classes": num_classes,
        "class_names": [f"c{i}" for i in range(num_classes)],
        "in_channels": in_channels,
        "mean": [0.5] * in_channels,
        "std": [0.25] * in_channels,
        "train_class_pixels": [100] * num_classes,
        "splits": {"train": ["a", "b"], "val": ["c"], "test": ["d"]},
    }
    return Manifest(**{**base, **fields})
