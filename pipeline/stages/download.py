"""Stage `download`: put the raw dataset named in params under data/raw/<name>/.

- `synthetic` (the default) is generated offline and deterministically from `dataset.seed`, in
  DRIVE's three-file layout: images/<stem>.png (RGB), manual/<stem>.png (vessel tracing,
  0/255) and mask/<stem>.png (field of view, 0/255).
- `drive`, `camvid` and `folder` come from `dataset.source`: an http(s) URL (streamed to
  data/downloads/<name>/, verified, then reused), a local .zip/.tar/.tar.gz archive, or a local
  folder. `dataset.sha256`, when set, is checked before anything is extracted; archive members
  that would land outside the target are refused, and so are archive bombs (over
  `dataset.max_unpacked_gb` unpacked, or at an absurd compression ratio) and, in a folder,
  links that loop or leave it. The folder holding the dataset's layout
  (e.g. DRIVE/ inside DRIVE.zip) becomes data/raw/<name>/.

data/raw/ is replaced only once the new raw data is complete: a failure leaves it as it was.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.core import paths
from pipeline.core.common import PipelineError, atomic_path, timed, write_json
from pipeline.core.config import Params
from pipeline.data.archives import (
    copy_folder,
    fetch_url,
    find_root,
    is_url,
    safe_extract,
    verify_sha256,
)
from pipeline.data.sources import ROOT_HINTS, ROOT_MARKERS
from pipeline.data.synthetic import generate
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared
from pipeline.tracking.runs import mlflow_run

log = logging.getLogger(__name__)


def write_synthetic(params: Params, target: Path) -> dict:
    ds = params.dataset
    log.info(
        "generating %d synthetic %dx%d images (dataset.seed %d)",
        ds.num_images,
        ds.image_size,
        ds.image_size,
        ds.seed,
    )
    for sub in ("images", "manual", "mask"):
        (target / sub).mkdir(parents=True)
    samples = generate(ds.seed, ds.num_images, ds.image_size)
    for i, sample in enumerate(tqdm(samples, desc="synthetic", unit="img", delay=2, disable=None)):
        stem = f"{i:03d}"
        Image.fromarray(sample.image).save(target / "images" / f"{stem}.png")
        Image.fromarray(sample.vessels).save(target / "manual" / f"{stem}.png")
        Image.fromarray(sample.fov).save(target / "mask" / f"{stem}.png")
    return {"seed": ds.seed, "num_images": ds.num_images, "size": ds.image_size}


def fetch_source(params: Params, scratch: Path, target: Path) -> dict:
    """URL, archive or folder -> the dataset's layout at `target`; returns provenance."""
    ds = params.dataset
    sha256 = ""
    if is_url(ds.source):
        local = fetch_url(ds.source, paths.downloads() / ds.name, ds.sha256)
    else:
        local = paths.resolve_source(ds.source)
        if not local.exists():
            raise PipelineError(f"dataset.source: {local} not found (a URL, archive or folder)")
        if not (local.is_dir() or local.is_file()):  # reading a fifo or /dev/zero never ends
            raise PipelineError(
                f"dataset.source: {local} is not a regular file or folder (a URL, archive or "
                "folder)"
            )
    if local.is_dir():
        if ds.sha256:
            raise PipelineError(
                f"dataset.sha256: checks an archive or a download, but {local} is a folder"
            )
        log.info("copying %s", local)
        copy_folder(local, scratch)
    else:
        sha256 = verify_sha256(local, ds.sha256)
        log.info("extracting %s (sha256 %s)", local, sha256[:12])
        safe_extract(local, scratch, round(ds.max_unpacked_gb * 1e9))
    root = find_root(scratch, ROOT_MARKERS[ds.name](params), ds.source, ROOT_HINTS[ds.name])
    inside = root.relative_to(scratch).as_posix()  # where the layout sat in the source
    root.rename(target)
    return {"source": ds.source, "sha256": sha256, "root": "" if inside == "." else inside}


def download(params: Params) -> Path:
    name = params.dataset.name
    target = paths.raw_dir(name)
    with atomic_path(paths.RAW) as tmp:
        tmp.mkdir()
        dest = tmp / target.name
        if name == "synthetic":
            info = write_synthetic(params, dest)
        else:
            scratch = tmp / ".extract"
            info = fetch_source(params, scratch, dest)
            shutil.rmtree(scratch, ignore_errors=True)
        files = sum(1 for p in dest.rglob("*") if p.is_file())
        write_json(dest / "source.json", {"dataset": name, **info, "files": files})
    log.info("wrote %s (%d files)", target.relative_to(paths.ROOT), files)
    used = declared("download", params)
    with timed("tracking"), mlflow_run(params, "download", "download", used=used) as run:
        run.log_metric("files", files)
        run.log_artifact(target / "source.json")
    return target


main = lifecycle.stage_main("download", download, __doc__)

if __name__ == "__main__":
    lifecycle.run(main)
