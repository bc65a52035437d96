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

import json
import logging
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.common import PipelineError, atomic_path, preprocess_workers, timed
from pipeline.core.config import IGNORE_INDEX, Params
from pipeline.data.archives import is_url
from pipeline.data.manifest import BorderWeights, Manifest, write_manifest
from pipeline.data.prepare import (
    F16_MAX,
    Job,
    Stats,
    count_labels,
    prepare_image,
    worker_pool,
)
from pipeline.data.sources import RawDataset, open_dataset
from pipeline.data.weightmap import balanced_class_weights
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared
from pipeline.tracking.runs import mlflow_run

log = logging.getLogger(__name__)


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
            counts = imap((count_labels, "train", i) for i in range(len(ds.splits["train"])))
            class_weights = balanced_class_weights(sum(counts))
            if class_weights.max() + border.w0 > F16_MAX:
                log.warning("weight maps exceed float16 and are clipped to %g", F16_MAX)
            job = replace(job, class_weights=class_weights, w0=border.w0, sigma=border.sigma)
        stats = Stats(len(names), ds.in_channels)
        observer = np.zeros((len(names), len(names)), np.int64)  # DRIVE: a second human's
        weight_seconds = 0.0
        done = imap((prepare_image, job, split, i) for split, i in jobs)
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
