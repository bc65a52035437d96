"""Preparing the raw images for `data/processed/`, one image at a time in worker processes:
read, equalise (preprocess.clahe), resize (preprocess.scale), store the arrays (images, labels,
class locations, border weight maps), and send back the statistics the manifest sums in order
(`Stats`), so memory does not grow with the dataset and any number of workers gives the same
files. The stage `pipeline.stages.preprocess` runs it."""

from __future__ import annotations

import csv
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core import paths
from pipeline.core.common import PipelineError, setup_logging
from pipeline.core.config import IGNORE_INDEX, Params
from pipeline.data.crops import resize
from pipeline.data.sources import RawDataset, equalize, open_dataset
from pipeline.data.store import class_locations, save_array
from pipeline.data.weightmap import border_weight_map


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


def count_labels(split: str, index: int) -> np.ndarray:
    """Per-class pixel counts of one label (the weight maps' class balance needs the split's)."""
    label = _DATASET.read(_DATASET.splits[split][index]).label
    return np.bincount(label.ravel(), minlength=256)[: len(_DATASET.class_names)]


def prepare_image(job: Job, split: str, index: int) -> Prepared:
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
