"""Stage `preprocess`: raw dataset -> data/processed/{train,val,test}/ arrays and a manifest.

Every image is read once, equalised (preprocess.clahe) and resized (preprocess.scale), and stored
as a `.npy` a training loader memory-maps: the training stages cut their patches from these
full-size arrays afresh every epoch (pipeline/data/loading.py), so nothing here depends on the
patch size. Labels are uint8 class indices with 255 = ignore (see pipeline/data/sources.py for how
each dataset's raw labels map to them). The layout is in pipeline/data/store.py and
data/README.md; data/processed/manifest.json describes it all (classes, splits, per-channel
mean/std of the training pixels), and class_pixels.csv holds the per-class pixel histogram of
every split.

Images are prepared by preprocess.workers processes (0: one per core), one image at a time
each: memory does not grow with the dataset, and the outputs are the same for any number of
workers (each image's files depend on that image alone; the statistics are summed in order).

With preprocess.border_weights.enabled, every training image also gets the U-Net paper's weight
map (pipeline/data/weightmap.py) in train/weights/<stem>.npy (float16).
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import paths
from pipeline.common import (
    PipelineError,
    atomic_path,
    preprocess_workers,
    setup_logging,
    timed,
)
from pipeline.config import IGNORE_INDEX, Params
from pipeline.data.archives import is_url
from pipeline.data.crops import resize
from pipeline.data.manifest import BorderWeights, Manifest, write_manifest
from pipeline.data.sources import RawDataset, equalize, open_dataset
from pipeline.data.store import class_locations, save_array
from pipeline.data.weightmap import balanced_class_weights, border_weight_map
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared
from pipeline.tracking.runs import mlflow_run

log = logging.getLogger(__name__)


def save_example(path: Path, image: np.ndarray, size: int = 512) -> None:
    """A raw image, cut to its central `size` px: the served model's input example."""
    h, w = image.shape[:2]
    y, x = max(0, (h - size) // 2), max(0, (w - size) // 2)
    Image.fromarray(image[y : y + size, x : x + size]).save(path)


@dataclass
class Prepared:
    """What preparing one image sends back (its arrays are written already): its class
    histogram (classes, then ignored), the sums of its labelled pixels per channel (train),
    the second observer's confusion matrix against the label, and the weight map's time."""

    split: str
    hist: np.ndarray
    sum: np.ndarray
    sq: np.ndarray
    n: int
    observer: np.ndarray | None = None
    weight_seconds: float = 0.0


class Stats:
    """Per-channel mean/std of the labelled training pixels and per-split class histograms,
    summed image by image in the dataset's order (a dataset never has to fit in memory, and
    the sums do not depend on how many workers prepared the images)."""

    def __init__(self, num_classes: int, channels: int):
        self.num_classes = num_classes
        self.sum = np.zeros(channels)
        self.sq = np.zeros(channels)
        self.n = 0
        self.hist: dict[str, np.ndarray] = {}

    def add(self, image: Prepared) -> None:
        hist = self.hist.setdefault(image.split, np.zeros(self.num_classes + 1, np.int64))
        hist += image.hist
        if image.split == "train":
            self.sum += image.sum
            self.sq += image.sq
            self.n += image.n

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


@dataclass(frozen=True)
class Job:
    """What every worker needs besides the image: where to write, and how."""

    out: Path  # the temporary data/processed being built
    clahe: float
    scale: float
    num_classes: int
    class_weights: np.ndarray | None = None  # border weight maps: w_c; None: no weight maps
    w0: float = 0.0
    sigma: float = 1.0


_DATASET: RawDataset | None = None  # a worker's dataset, opened once by `_start_worker`


def _start_worker(root: Path, params: Params) -> None:
    global _DATASET
    paths.use_root(root)
    setup_logging()
    _DATASET = open_dataset(params)


def _use_dataset(ds: RawDataset | None) -> None:
    global _DATASET
    _DATASET = ds


def _count_labels(split: str, index: int) -> np.ndarray:
    """Per-class pixel counts of one label (the weight maps' class balance needs the split's)."""
    label = _DATASET.read(_DATASET.splits[split][index]).label
    return np.bincount(label.ravel(), minlength=256)[: len(_DATASET.class_names)]


def _prepare(job: Job, split: str, index: int) -> Prepared:
    """Read, equalise, resize and store one image with its label (and, for training images,
    its weight map and class locations); return its statistics."""
    item = _DATASET.splits[split][index]
    sample = _DATASET.read(item)
    if split == "test" and index == 0:  # as users will send it
        save_example(job.out / paths.EXAMPLE_IMAGE.name, sample.image)
    # the model's input: equalised at full size, then resized (as predict does)
    image = resize(equalize(sample.image, job.clahe), job.scale)
    label = sample.label
    if split == "train":  # patches are cut at the model's size; val/test score full-size
        label = resize(label, job.scale, label=True)
    save_array(paths.split_dir(split, "images", job.out), item.stem, image)
    save_array(paths.split_dir(split, "labels", job.out), item.stem, label)
    counts = np.bincount(label.ravel(), minlength=256)
    hist = np.append(counts[: job.num_classes], counts[IGNORE_INDEX])
    channels = 1 if image.ndim == 2 else image.shape[2]
    out = Prepared(split, hist, np.zeros(channels), np.zeros(channels), 0)
    if sample.second is not None:
        save_array(paths.split_dir(split, "second", job.out), item.stem, sample.second)
        out.observer = observer_matrix(sample.second, sample.label, job.num_classes)
    if split != "train":
        return out
    px = image[label != IGNORE_INDEX].reshape(-1, channels).astype(np.float64) / 255
    out.sum, out.sq, out.n = px.sum(0), (px**2).sum(0), len(px)
    locations = class_locations(label, job.num_classes, item.stem)
    save_array(paths.split_dir(split, "locations", job.out), item.stem, locations)
    if job.class_weights is not None:
        started = time.perf_counter()
        weights = border_weight_map(label, job.class_weights, job.w0, job.sigma, IGNORE_INDEX)
        # float16 halves the files; the clip keeps a huge class weight finite
        weights = np.minimum(weights, F16_MAX).astype(np.float16)
        save_array(paths.split_dir(split, "weights", job.out), item.stem, weights)
        out.weight_seconds = time.perf_counter() - started
    return out


def observer_matrix(second: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """A second observer's tracing scored against the reference label like a model's
    prediction: the (true, predicted) confusion matrix of the labelled pixels."""
    second = np.where(second == IGNORE_INDEX, 0, second)  # outside the FOV: the label ignores it
    valid = label != IGNORE_INDEX
    idx = label[valid].astype(np.int64) * num_classes + np.minimum(second[valid], num_classes - 1)
    return np.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def _call(args: tuple) -> Any:
    fn, *rest = args
    return fn(*rest)


@contextmanager
def worker_pool(
    workers: int, params: Params, ds: RawDataset
) -> Iterator[Callable[[Iterable[tuple]], Iterator]]:
    """`imap(jobs)` over (function, *args) tuples, results in order: in this process for one
    worker, else in `workers` fresh processes (spawned: no lock of this process's threads is
    inherited), each preparing one image at a time. Leaving the block stops the workers."""
    if workers <= 1:
        _use_dataset(ds)
        try:
            yield lambda jobs: map(_call, jobs)
        finally:
            _use_dataset(None)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, _start_worker, (paths.ROOT, params)) as pool:
        yield lambda jobs: pool.imap(_call, jobs, chunksize=4)


def _preprocess(params: Params) -> Path:
    pp, border = params.preprocess, params.preprocess.border_weights
    ds = open_dataset(params)
    names = ds.class_names
    jobs = [(split, i) for split, items in ds.splits.items() for i in range(len(items))]
    workers = preprocess_workers(params.preprocess.workers, len(jobs))
    started = time.perf_counter()
    # the workers stop before the temporary folder goes (on an error): none writes there after
    with atomic_path(paths.PROCESSED) as tmp, worker_pool(workers, params, ds) as imap:
        job = Job(tmp, pp.clahe, pp.scale, len(names))
        if border.enabled:  # w_c balances the classes of the whole training split
            counts = imap((_count_labels, "train", i) for i in range(len(ds.splits["train"])))
            class_weights = balanced_class_weights(sum(counts))
            if class_weights.max() + border.w0 > F16_MAX:
                log.warning("weight maps exceed float16 and are clipped to %g", F16_MAX)
            job = replace(job, class_weights=class_weights, w0=border.w0, sigma=border.sigma)
        stats = Stats(len(names), ds.in_channels)
        observer = np.zeros((len(names), len(names)), np.int64)  # DRIVE: a second human's
        weight_seconds = 0.0
        done = imap((_prepare, job, split, i) for split, i in jobs)
        bar = tqdm(done, total=len(jobs), desc="preprocess", unit="img", delay=2, disable=None)
        for image in bar:
            stats.add(image)
            weight_seconds += image.weight_seconds
            if image.observer is not None:
                observer += image.observer
        for split in ds.splits:
            check_classes(split, stats.hist.get(split), ds)
        mean, std = stats.mean_std()
        stats.write_csv(tmp / paths.CLASS_PIXELS.name, names)
        write_manifest(tmp, build_manifest(params, ds, mean, std, stats, observer, job))
    log.info(
        "processed %s: %s images in %.1f s with %d worker%s",
        ds.name,
        {k: len(v) for k, v in ds.splits.items()},
        time.perf_counter() - started,
        workers,
        "s" if workers > 1 else "",
    )
    if job.class_weights is not None:
        n_train = len(ds.splits["train"])
        log.info(
            "border weight maps (w0 %g, sigma %g, class weights %s) for %d training images: "
            "%.2f s of the workers' time (%.3f s per image)",
            border.w0,
            border.sigma,
            np.round(job.class_weights, 4).tolist(),
            n_train,
            weight_seconds,
            weight_seconds / max(n_train, 1),
        )
    track(params, ds)
    return paths.PROCESSED


def build_manifest(params, ds, mean, std, stats: Stats, observer: np.ndarray, job: Job):
    second = None
    if observer.any():
        from pipeline.inference.metrics import ConfusionMatrix  # imports torch: only for DRIVE

        cm = ConfusionMatrix(len(ds.class_names), IGNORE_INDEX)
        cm.matrix = observer
        second = {k: round(v, 6) for k, v in cm.compute(ds.class_names).items()}
    return Manifest(
        dataset=ds.name,
        num_classes=len(ds.class_names),
        class_names=ds.class_names,
        positive_class=ds.class_names[1] if len(ds.class_names) == 2 else None,
        in_channels=ds.in_channels,
        ignore_index=IGNORE_INDEX,
        mean=mean,
        std=std,
        train_class_pixels=stats.hist["train"][:-1].tolist(),
        clahe=job.clahe,
        scale=job.scale,
        bit_depth=params.dataset.folder.bit_depth if params.dataset.name == "folder" else 0,
        splits={s: [i.stem for i in items] for s, items in ds.splits.items()},
        second_observer=second,
        border_weights=None
        if job.class_weights is None
        else BorderWeights(
            w0=job.w0,
            sigma=job.sigma,
            class_weights=[round(float(w), 6) for w in job.class_weights],
        ),
    )


def track(params: Params, ds: RawDataset) -> None:
    used = declared("preprocess", params)
    with (
        timed("tracking"),
        mlflow_run(params, "preprocess", "preprocess", used=used, consumes="data/raw") as run,
    ):
        run.log_metrics({f"{k}_images": len(v) for k, v in ds.splits.items()})
        run.log_artifact(paths.MANIFEST)
        run.log_artifact(paths.CLASS_PIXELS)


main = lifecycle.stage_main("preprocess", preprocess, __doc__)

if __name__ == "__main__":
    lifecycle.run(main)
