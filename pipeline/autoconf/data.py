"""The dataset autoconf measures: data/raw/<name> when the download stage made it from the
current `dataset.source`, else the source itself, unpacked into a temporary folder by the
download stage's own code (and removed afterwards)."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.autoconf.fingerprint import MAX_IMAGES, Fingerprint, measure
from pipeline.autoconf.labels import MappingCheck, check_mapping
from pipeline.core import paths
from pipeline.core.common import PipelineError
from pipeline.core.config import Params
from pipeline.data.sources import OPENERS, SIXTEEN_BIT, RawDataset, read_label

log = logging.getLogger(__name__)


@contextlib.contextmanager
def raw_root(params: Params) -> Iterator[Path]:
    """The folder holding the dataset's layout."""
    name = params.dataset.name
    root = paths.raw_dir(name)
    info = root / "source.json"
    if info.is_file():
        made = json.loads(info.read_text())
        if made.get("dataset") == name and made.get("source", "") == params.dataset.source:
            yield root
            return
    if name == "synthetic":
        from pipeline.stages.download import write_synthetic

        with tempfile.TemporaryDirectory(prefix="autoconf-") as tmp:
            write_synthetic(params, Path(tmp) / "root")
            yield Path(tmp) / "root"
        return
    if not params.dataset.source:
        raise PipelineError(f"dataset.source: empty; dataset {name} needs its archive or folder")
    from pipeline.stages.download import fetch_source

    with tempfile.TemporaryDirectory(prefix="autoconf-") as tmp:
        fetch_source(params, Path(tmp) / ".extract", Path(tmp) / "root")
        yield Path(tmp) / "root"


def _sample(items: list, seed: int) -> list:
    if len(items) <= MAX_IMAGES:
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))[:MAX_IMAGES]
    return [items[i] for i in sorted(order)]


def _bit_depth(path: Path) -> int:
    with Image.open(path) as img:
        return 16 if img.mode in SIXTEEN_BIT else 8


def label_check(params: Params, ds: RawDataset) -> MappingCheck | None:
    """A folder dataset's raw label values against dataset.folder.mapping (None otherwise)."""
    if params.dataset.name != "folder":
        return None
    values: dict[int, int] = {}
    for item in _sample(ds.splits["train"], params.dataset.seed):
        raw = read_label(item.label, params.dataset.max_image_pixels)
        found, counts = np.unique(raw, return_counts=True)
        for v, n in zip(found.tolist(), counts.tolist(), strict=True):
            values[int(v)] = values.get(int(v), 0) + int(n)
    fp = params.dataset.folder
    return check_mapping(values, dict(fp.mapping), list(fp.class_names))


def with_mapping(params: Params, check: MappingCheck) -> Params:
    """params with the proposed mapping (and class names) of `check`."""
    folder = params.dataset.folder.model_copy(
        update={"mapping": check.proposal, "class_names": check.class_names, "positive": ""}
    )
    return params.model_copy(
        update={"dataset": params.dataset.model_copy(update={"folder": folder})}
    )


def fingerprint(params: Params) -> tuple[Fingerprint, MappingCheck | None, Params]:
    """(the training split's fingerprint, the label check, params with its proposal)."""
    name = params.dataset.name
    with raw_root(params) as root:
        ds = OPENERS[name](params, root)
        ds.check()
        check = label_check(params, ds)
        if check is not None and not check.ok:
            if check.proposal is None:
                raise PipelineError(check.message())
            log.warning("%s", check.message())
            params = with_mapping(params, check)
            ds = OPENERS[name](params, root)
        items = _sample(ds.splits["train"], params.dataset.seed)
        if not items:
            raise PipelineError(f"{root}: no training images to measure")
        log.info("measuring %d of %d training images", len(items), len(ds.splits["train"]))
        samples = ((s.image, s.label) for s in map(ds.read, items))
        counts = {s: len(v) for s, v in ds.splits.items()}
        fp = measure(samples, ds.class_names, counts, name, _bit_depth(items[0].image))
        if check is not None:
            fp.label_values = check.values
    return fp, check, params
