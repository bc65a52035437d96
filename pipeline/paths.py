"""Every file and folder the pipeline reads or writes, in one place.

Paths are relative to the project root (the folder holding dvc.yaml), which is where DVC
runs each stage, also inside the temporary copies `dvc exp run --temp/--queue` makes.
The MLflow store is the exception: it lives in the *real* repository (see `store_root`).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"

DATA = ROOT / "data"
RAW = DATA / "raw"
PROCESSED = DATA / "processed"
MANIFEST = PROCESSED / "manifest.json"
CLASS_PIXELS = PROCESSED / "class_pixels.csv"

MODELS = ROOT / "models"
REPORTS = ROOT / "reports"
PRUNING_CSV = REPORTS / "pruning.csv"
PRUNING_JSON = REPORTS / "pruning.json"
REPORT_MD = REPORTS / "report.md"
REPORT_XLSX = REPORTS / "report.xlsx"
REPORT_HTML = REPORTS / "report.html"  # self-contained: images embedded, no external links
PANELS_PNG = REPORTS / "panels.png"
LEARNING_CURVES_PNG = REPORTS / "learning_curves.png"
PRUNING_PNG = REPORTS / "pruning_tradeoff.png"


def raw_dir(dataset: str) -> Path:
    return RAW / dataset


def split_dir(split: str, kind: str, processed: Path | None = None) -> Path:
    """`kind` is "images", "labels" or "second" (a second observer's labels, DRIVE test);
    `processed` defaults to PROCESSED (preprocess passes the temporary folder it builds
    before renaming it into place)."""
    return (processed or PROCESSED) / split / kind


def crops_dir(kind: str, processed: Path | None = None) -> Path:
    return (processed or PROCESSED) / "crops" / kind


def checkpoint(arch: str) -> Path:
    return MODELS / f"{arch}.pt"


def resume_state(arch: str) -> Path:
    """Per-epoch state of a running training stage; deleted when the stage completes."""
    return MODELS / "resume" / f"{arch}.pt"


ONNX = MODELS / "onnx"  # the prune stage's exports: unetpp.onnx and unetpp_L<k>.onnx


def arch_reports(arch: str) -> Path:
    return REPORTS / arch


def downloads() -> Path:
    """Verified URL downloads, kept between runs (and shared by DVC's temporary copies) so a
    dataset is fetched once."""
    return store_root() / "data" / "downloads"


def resolve_source(source: str) -> Path:
    """A local dataset.source: relative paths are relative to the repository root (the real
    one, also inside DVC's temporary experiment copies)."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else store_root() / path


def store_root() -> Path:
    """Folder of the MLflow sqlite store and artifacts: the real repo, even in DVC's temp copies.

    DVC sets DVC_ROOT to the repository root for every stage it runs, and to the *parent*
    repository for queued/temp experiments, whose working copy is thrown away afterwards.
    """
    return Path(os.environ.get("DVC_ROOT") or ROOT).resolve()
