"""Stage `preprocess`: raw dataset -> data/processed/{train,val,test}/{images,labels} + crops.

Labels are uint8 class indices with 255 = ignore. For vessel data (DRIVE-like) the manual
tracing and the field-of-view mask merge into one label: 1 vessel, 0 background, 255 outside
the FOV. Training crops (size and stride from params) go to data/processed/crops/, and
data/processed/manifest.json describes it all (classes, splits, crops, per-channel mean/std).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import paths
from pipeline.common import PipelineError, atomic_path, run_cli, write_json
from pipeline.config import Params, load_params

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
VESSEL_CLASSES = ["background", "vessel"]


def read_image(path: Path, mode: str) -> np.ndarray:
    """Read an image file as a uint8 array in PIL `mode` ("RGB" or "L"); one-line error if bad."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert(mode))  # writable copy
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise PipelineError(f"{path}: unreadable or corrupt image ({exc})") from None


def merge_vessel_label(manual: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """(H, W) manual tracing + FOV mask -> label: 1 vessel, 0 background, 255 outside the FOV."""
    label = (manual > 127).astype(np.uint8)
    label[fov <= 127] = IGNORE_INDEX
    return label


def split_stems(stems: list[str], val: int, test: int, seed: int) -> dict[str, list[str]]:
    """Seeded random split; each list sorted so the manifest is stable and readable."""
    order = np.random.default_rng(seed).permutation(len(stems))
    shuffled = [stems[i] for i in order]
    return {
        "test": sorted(shuffled[:test]),
        "val": sorted(shuffled[test : test + val]),
        "train": sorted(shuffled[test + val :]),
    }


def crop_origins(length: int, size: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every `stride`, plus one flush with the far border."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def make_crops(image: np.ndarray, label: np.ndarray, size: int, stride: int):
    """Yield (y, x, image_crop, label_crop); images smaller than a crop are mirror-padded
    (labels padded with 255) and crops that hold only ignored pixels are skipped."""
    h, w = label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    for y in crop_origins(label.shape[0], size, stride):
        for x in crop_origins(label.shape[1], size, stride):
            lab = label[y : y + size, x : x + size]
            if (lab != IGNORE_INDEX).any():
                yield y, x, image[y : y + size, x : x + size], lab


def save_pair(
    image_dir: Path, label_dir: Path, name: str, image: np.ndarray, label: np.ndarray
) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_dir / f"{name}.png")
    Image.fromarray(label).save(label_dir / f"{name}.png")


def load_synthetic(raw: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stem -> (image (H, W, 3), label (H, W)) for the DRIVE-like layout."""
    images = sorted((raw / "images").glob("*.png"))
    if not images:
        raise PipelineError(f"{raw / 'images'}: no images found (run the download stage)")
    out = {}
    for img_path in images:
        stem = img_path.stem
        image = read_image(img_path, "RGB")
        manual = read_image(raw / "manual" / f"{stem}.png", "L")
        fov = read_image(raw / "mask" / f"{stem}.png", "L")
        if manual.shape != image.shape[:2] or fov.shape != image.shape[:2]:
            raise PipelineError(
                f"{img_path}: image is {image.shape[1]}x{image.shape[0]} but its label or mask "
                f"is {manual.shape[1]}x{manual.shape[0]}"
            )
        out[stem] = (image, merge_vessel_label(manual, fov))
    return out


def preprocess(params: Params) -> Path:
    ds, pp = params.dataset, params.preprocess
    samples = load_synthetic(paths.raw_dir(ds.name))
    need = ds.val_count + ds.test_count + 1
    if len(samples) < need:
        raise PipelineError(
            f"{paths.raw_dir(ds.name)}: {len(samples)} images, but dataset.val_count + "
            f"dataset.test_count + 1 training image need {need}"
        )
    splits = split_stems(sorted(samples), ds.val_count, ds.test_count, params.seed)

    target = paths.PROCESSED
    with atomic_path(target) as tmp:
        for split, stems in splits.items():
            for stem in stems:
                save_pair(
                    paths.split_dir(split, "images", tmp),
                    paths.split_dir(split, "labels", tmp),
                    stem,
                    *samples[stem],
                )
        crops = []
        for stem in splits["train"]:
            image, label = samples[stem]
            for y, x, img_c, lab_c in make_crops(image, label, pp.crop_size, pp.crop_stride):
                name = f"{stem}_y{y:04d}_x{x:04d}"
                save_pair(
                    paths.crops_dir("images", tmp),
                    paths.crops_dir("labels", tmp),
                    name,
                    img_c,
                    lab_c,
                )
                crops.append(name)

        # normalisation statistics from the training split, inside the labelled area only
        train_px = (
            np.concatenate(
                [samples[s][0][samples[s][1] != IGNORE_INDEX] for s in splits["train"]]
            ).astype(np.float64)
            / 255.0
        )  # (N, 3)
        counts = np.zeros(len(VESSEL_CLASSES), np.int64)
        for s in splits["train"]:
            lab = samples[s][1]
            counts += np.bincount(lab[lab != IGNORE_INDEX], minlength=len(VESSEL_CLASSES))
        manifest = {
            "dataset": ds.name,
            "num_classes": len(VESSEL_CLASSES),
            "class_names": VESSEL_CLASSES,
            "in_channels": 3,
            "ignore_index": IGNORE_INDEX,
            "mean": train_px.mean(0).round(6).tolist(),
            "std": train_px.std(0).round(6).tolist(),
            "train_class_pixels": counts.tolist(),
            "crop_size": pp.crop_size,
            "crop_stride": pp.crop_stride,
            "splits": splits,
            "crops": crops,
        }
        write_json(tmp / paths.MANIFEST.name, manifest)
    log.info(
        "processed %s: %s images, %d training crops of %d px",
        ds.name,
        {k: len(v) for k, v in splits.items()},
        len(crops),
        pp.crop_size,
    )
    return target


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    preprocess(load_params())


if __name__ == "__main__":
    run_cli(main)
