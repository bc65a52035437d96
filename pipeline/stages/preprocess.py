"""Stage `preprocess`: raw dataset -> data/processed/{train,val,test}/{images,labels} + crops.

Labels are uint8 class indices with 255 = ignore (see pipeline/data/sources.py for how each
dataset's raw labels map to them). Training crops (a grid of crop_size every crop_stride px, or
crops_per_image random ones) go to data/processed/crops/; images smaller than a crop are
mirror-padded and their labels padded with 255. data/processed/manifest.json describes it all
(classes, splits, crops, per-channel mean/std of the training pixels), and class_pixels.csv
holds the per-class pixel histogram of every split.

With preprocess.border_weights.enabled, every training crop also gets the U-Net paper's weight
map (pipeline/data/weightmap.py) in crops/weights/<crop>.npy (float16), computed on the full
image so that the distances to objects cross the crop borders.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import paths
from pipeline.common import (
    PipelineError,
    atomic_path,
    timed,
)
from pipeline.config import IGNORE_INDEX, Params
from pipeline.data.archives import is_url
from pipeline.data.crops import make_crops, pad_to_crop, resize
from pipeline.data.manifest import BorderWeights, Manifest, write_manifest
from pipeline.data.sources import RawDataset, equalize, open_dataset
from pipeline.data.weightmap import balanced_class_weights, border_weight_map
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared
from pipeline.tracking.runs import mlflow_run

log = logging.getLogger(__name__)


def save_png(folder: Path, name: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # fast compression: these are intermediate files, written by the thousand
    Image.fromarray(array).save(folder / f"{name}.png", compress_level=1)


def save_example(path: Path, image: np.ndarray, size: int = 512) -> None:
    """A raw image, cut to its central `size` px: the served model's input example."""
    h, w = image.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    Image.fromarray(image[y : y + size, x : x + size]).save(path)


def save_pair(
    image_dir: Path, label_dir: Path, name: str, image: np.ndarray, label: np.ndarray
) -> None:
    save_png(image_dir, name, image)
    save_png(label_dir, name, label)


class Stats:
    """Per-channel mean/std of the labelled training pixels and per-split class histograms,
    accumulated image by image (a dataset never has to fit in memory)."""

    def __init__(self, num_classes: int, channels: int):
        self.num_classes = num_classes
        self.sum = np.zeros(channels)
        self.sq = np.zeros(channels)
        self.n = 0
        self.hist: dict[str, np.ndarray] = {}

    def add(self, split: str, image: np.ndarray, label: np.ndarray) -> None:
        counts = np.bincount(label.ravel(), minlength=256)
        hist = self.hist.setdefault(split, np.zeros(self.num_classes + 1, np.int64))
        hist[: self.num_classes] += counts[: self.num_classes]
        hist[-1] += counts[IGNORE_INDEX]
        if split == "train":
            px = image[label != IGNORE_INDEX].reshape(-1, len(self.sum)).astype(np.float64) / 255
            self.sum += px.sum(0)
            self.sq += (px**2).sum(0)
            self.n += len(px)

    def mean_std(self) -> tuple[list[float], list[float]]:
        if self.n == 0:
            raise PipelineError("the training split has no labelled pixels")
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sq / self.n - mean**2, 0)) + 1e-6
        return mean.round(6).tolist(), std.round(6).tolist()

    def write_csv(self, path: Path, class_names: list[str]) -> None:
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["split", "class_index", "class_name", "pixels", "fraction"])
            for split, hist in self.hist.items():
                labelled = hist[:-1].sum()
                for c, name in enumerate(class_names):
                    frac = hist[c] / labelled if labelled else 0.0
                    out.writerow([split, c, name, int(hist[c]), f"{frac:.6f}"])
                out.writerow([split, IGNORE_INDEX, "ignore", int(hist[-1]), ""])


F16_MAX = float(np.finfo(np.float16).max)


def check_classes(split: str, hist: np.ndarray | None, ds: RawDataset) -> None:
    """A class no label of the split holds: in training, a model that cannot learn it (binary:
    an error, as with all-empty masks, which would otherwise score a perfect mIoU); in val/test,
    metrics that are undefined for it (a warning; the report registers no model then)."""
    if hist is None:
        return
    empty = [name for name, pixels in zip(ds.class_names, hist[:-1], strict=True) if not pixels]
    if not empty:
        return
    what = f"the {split} labels hold no pixel of class {', '.join(map(repr, empty))}"
    fix = (
        "check the label files and dataset.folder.mapping (which raw value is which class)"
        if ds.name == "folder"
        else "check the dataset"
    )
    if split == "train" and len(ds.class_names) == 2:
        raise PipelineError(f"{ds.root}: {what}: nothing to learn; {fix}")
    log.warning("%s: %s; its metrics are undefined there (%s)", ds.root, what, fix)


def train_class_pixels(ds: RawDataset) -> np.ndarray:
    """Per-class pixel counts of the training labels: a first pass over the training split, so
    that every weight map gets the class-balancing term of the whole split."""
    n = len(ds.class_names)
    hist = np.zeros(n, np.int64)
    for item in ds.splits["train"]:
        hist += np.bincount(ds.read(item).label.ravel(), minlength=256)[:n]
    return hist


def save_weights(folder: Path, name: str, weights: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # float16 halves the files; the clip keeps a huge class weight finite
    np.save(folder / f"{name}.npy", np.minimum(weights, F16_MAX).astype(np.float16))


def score_observer(cm, second: np.ndarray, label: np.ndarray, num_classes: int):
    """Add a second observer's tracing, scored against the reference label like a model's
    prediction, to the confusion matrix `cm` (created on first use: torch imports slowly)."""
    import torch

    from pipeline.inference.metrics import ConfusionMatrix

    cm = cm or ConfusionMatrix(num_classes, IGNORE_INDEX)
    second = np.where(second == IGNORE_INDEX, 0, second)  # outside the FOV: the label ignores it
    cm.update(torch.from_numpy(second), torch.from_numpy(label))
    return cm


def origin(message: str, params: Params) -> str:
    """`message` with the original of the first data/raw/ file it names: errors in the copy
    are fixed in the source (dataset.source, and the member inside an archive)."""
    raw = paths.raw_dir(params.dataset.name)
    match = re.search(re.escape(str(raw)) + r"/([^\s:,;()]+)", message)
    info_path = raw / "source.json"
    if not match or not info_path.is_file():
        return message
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return message
    source = info.get("source")
    if not source or is_url(source) or not isinstance(info.get("root"), str):
        what = f"downloaded from {source}" if source else ""
        return f"{message} ({what})" if what else message
    rel = "/".join(p for p in (info["root"], match.group(1)) if p)
    local = paths.resolve_source(source)
    where = f"{local / rel}" if local.is_dir() else f"{rel} inside {local}"
    return f"{message} (the copy of {where})"


def preprocess(params: Params) -> Path:
    try:
        return _preprocess(params)
    except PipelineError as exc:
        raise PipelineError(origin(str(exc), params)) from None


def _preprocess(params: Params) -> Path:
    pp = params.preprocess
    ds = open_dataset(params)
    stats = Stats(len(ds.class_names), ds.in_channels)
    rng = np.random.default_rng(params.seed)  # random crops vary with the run's seed
    crops: list[str] = []
    observer = None  # DRIVE: the second human's tracings, scored like a model
    target = paths.PROCESSED
    border = pp.border_weights
    class_weights = None  # w_c of the weight maps; None: no weight maps
    weight_seconds = 0.0
    if border.enabled:
        started = time.perf_counter()
        class_weights = balanced_class_weights(train_class_pixels(ds))
        weight_seconds += time.perf_counter() - started
        if class_weights.max() + border.w0 > F16_MAX:
            log.warning("weight maps exceed float16 and are clipped to %g", F16_MAX)
    with atomic_path(target) as tmp:
        for split, items in ds.splits.items():
            images, labels = (
                paths.split_dir(split, "images", tmp),
                paths.split_dir(split, "labels", tmp),
            )
            for item in tqdm(items, desc=f"preprocess {split}", unit="img", delay=2, disable=None):
                sample = ds.read(item)
                if split == "test" and item is items[0]:  # as users will send it
                    save_example(tmp / paths.EXAMPLE_IMAGE.name, sample.image)
                # the model's input: equalised at full size, then resized (as predict does)
                sample.image = resize(equalize(sample.image, pp.clahe), pp.scale)
                if split == "train":  # cropped at the model's size; val/test score full-size
                    sample.label = resize(sample.label, pp.scale, label=True)
                save_pair(images, labels, item.stem, sample.image, sample.label)
                if sample.second is not None:
                    save_png(paths.split_dir(split, "second", tmp), item.stem, sample.second)
                    observer = score_observer(
                        observer, sample.second, sample.label, len(ds.class_names)
                    )
                stats.add(split, sample.image, sample.label)
                if split != "train":
                    continue
                weights = None  # (H, W) of the padded image make_crops crops from
                if class_weights is not None:
                    started = time.perf_counter()
                    _, padded = pad_to_crop(sample.image, sample.label, pp.crop_size)
                    weights = border_weight_map(
                        padded, class_weights, border.w0, border.sigma, IGNORE_INDEX
                    )
                    weight_seconds += time.perf_counter() - started
                for y, x, img_c, lab_c in make_crops(
                    sample.image,
                    sample.label,
                    pp.crop_size,
                    pp.crop_stride,
                    pp.crops_per_image,
                    rng,
                ):
                    name = f"{item.stem}_y{y:04d}_x{x:04d}"
                    save_pair(
                        paths.crops_dir("images", tmp),
                        paths.crops_dir("labels", tmp),
                        name,
                        img_c,
                        lab_c,
                    )
                    if weights is not None:
                        size = pp.crop_size
                        window = weights[y : y + size, x : x + size]
                        save_weights(paths.crops_dir("weights", tmp), name, window)
                    crops.append(name)
            check_classes(split, stats.hist.get(split), ds)
        if not crops:
            raise PipelineError(f"{ds.root}: no training crop holds a labelled pixel")
        mean, std = stats.mean_std()
        stats.write_csv(tmp / paths.CLASS_PIXELS.name, ds.class_names)
        manifest = Manifest(
            dataset=ds.name,
            num_classes=len(ds.class_names),
            class_names=ds.class_names,
            positive_class=ds.class_names[1] if len(ds.class_names) == 2 else None,
            in_channels=ds.in_channels,
            ignore_index=IGNORE_INDEX,
            mean=mean,
            std=std,
            train_class_pixels=stats.hist["train"][:-1].tolist(),
            crop_size=pp.crop_size,
            crop_stride=pp.crop_stride,
            crops_per_image=pp.crops_per_image,
            clahe=pp.clahe,
            scale=pp.scale,
            bit_depth=params.dataset.folder.bit_depth if params.dataset.name == "folder" else 0,
            splits={s: [i.stem for i in items] for s, items in ds.splits.items()},
            crops=crops,
            second_observer=observer
            and {k: round(v, 6) for k, v in observer.compute(ds.class_names).items()},
            border_weights=None
            if class_weights is None
            else BorderWeights(
                w0=border.w0,
                sigma=border.sigma,
                class_weights=[round(float(w), 6) for w in class_weights],
            ),
        )
        write_manifest(tmp, manifest)
    log.info(
        "processed %s: %s images, %d training crops of %d px",
        ds.name,
        {k: len(v) for k, v in ds.splits.items()},
        len(crops),
        pp.crop_size,
    )
    if class_weights is not None:
        n_train = len(ds.splits["train"])
        log.info(
            "border weight maps (w0 %g, sigma %g, class weights %s) for %d training images: "
            "%.2f s (%.3f s per image, with the class-histogram pass)",
            border.w0,
            border.sigma,
            np.round(class_weights, 4).tolist(),
            n_train,
            weight_seconds,
            weight_seconds / max(n_train, 1),
        )
    used = declared("preprocess", params)
    with (
        timed("tracking"),
        mlflow_run(params, "preprocess", "preprocess", used=used, consumes="data/raw") as run,
    ):
        counts = {f"{k}_images": len(v) for k, v in ds.splits.items()}
        run.log_metrics({**counts, "train_crops": len(crops)})
        run.log_artifact(paths.MANIFEST)
        run.log_artifact(paths.CLASS_PIXELS)
    return target


main = lifecycle.stage_main("preprocess", preprocess, __doc__)

if __name__ == "__main__":
    lifecycle.run(main)
