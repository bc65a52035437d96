"""Every file and folder the pipeline reads or writes, in one place: a `Paths` object for a
project root, and this module's names (`paths.MANIFEST`, `paths.checkpoint("unet")`, ...)
reading the current one.

Paths are relative to the project root (the folder holding dvc.yaml), which is where DVC
runs each stage, also inside the temporary copies `dvc exp run --temp/--queue` makes.
The MLflow store is the exception: it lives in the *real* repository (see `store_root`).
Tests point the pipeline at a temporary project with `rooted(root)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def raw(self) -> Path:
        return self.data / "raw"

    @property
    def processed(self) -> Path:
        return self.data / "processed"

    @property
    def manifest(self) -> Path:
        return self.processed / "manifest.json"

    @property
    def class_pixels(self) -> Path:
        return self.processed / "class_pixels.csv"

    @property
    def example_image(self) -> Path:
        # a raw test image (its central 512 px at most): the served model's input example
        return self.processed / "example.png"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def onnx(self) -> Path:
        return self.models / "onnx"  # the prune stage's exports: unetpp.onnx, unetpp_L<k>.onnx

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, name: str) -> Path:
        return self.reports / name

    def raw_dir(self, dataset: str) -> Path:
        return self.raw / dataset

    def split_dir(self, split: str, kind: str, processed: Path | None = None) -> Path:
        """`kind` is "images", "labels", "second" (a second observer's labels, DRIVE test),
        "weights" or "locations" (train; see pipeline/data/store.py);
        `processed` defaults to data/processed (preprocess passes the temporary folder it
        builds before renaming it into place)."""
        return (processed or self.processed) / split / kind

    def checkpoint(self, arch: str) -> Path:
        return self.models / f"{arch}.pt"

    def resume_state(self, arch: str) -> Path:
        """Per-epoch state of a running training stage; deleted when the stage completes."""
        return self.models / "resume" / f"{arch}.pt"

    def arch_reports(self, arch: str) -> Path:
        return self.reports / arch


_current = Paths(Path(__file__).resolve().parents[2])


def current() -> Paths:
    return _current


def use_root(root: Path) -> None:
    """Every path under `root` from now on (a worker process of a stage run inside `rooted`)."""
    global _current
    _current = Paths(Path(root))


@contextmanager
def rooted(root: Path) -> Iterator[Paths]:
    """Every path under `root` inside the block (tests: a temporary project)."""
    global _current
    before, _current = _current, Paths(Path(root))
    try:
        yield _current
    finally:
        _current = before


# module-level names, read from the current Paths on every access
_NAMES = {
    "ROOT": lambda p: p.root,
    "PARAMS": lambda p: p.params,
    "DATA": lambda p: p.data,
    "RAW": lambda p: p.raw,
    "PROCESSED": lambda p: p.processed,
    "MANIFEST": lambda p: p.manifest,
    "CLASS_PIXELS": lambda p: p.class_pixels,
    "EXAMPLE_IMAGE": lambda p: p.example_image,
    "MODELS": lambda p: p.models,
    "ONNX": lambda p: p.onnx,
    "REPORTS": lambda p: p.reports,
    "PRUNING_CSV": lambda p: p.report("pruning.csv"),
    "PRUNING_JSON": lambda p: p.report("pruning.json"),
    "REPORT_MD": lambda p: p.report("report.md"),
    "REPORT_XLSX": lambda p: p.report("report.xlsx"),
    # self-contained: images embedded, no external links
    "REPORT_HTML": lambda p: p.report("report.html"),
    "PANELS_PNG": lambda p: p.report("panels.png"),
    "LEARNING_CURVES_PNG": lambda p: p.report("learning_curves.png"),
    "PRUNING_PNG": lambda p: p.report("pruning_tradeoff.png"),
    # held by the stage DVC runs (see stages/lifecycle.py): a stage orphaned by a killed
    # `dvc repro` and the re-run's stage never write at once
    "STAGE_LOCK": lambda p: p.root / ".dvc" / "tmp" / "pipeline-stage.lock",
}


def __getattr__(name: str) -> Path:
    if name in _NAMES:
        return _NAMES[name](_current)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def raw_dir(dataset: str) -> Path:
    return _current.raw_dir(dataset)


def split_dir(split: str, kind: str, processed: Path | None = None) -> Path:
    return _current.split_dir(split, kind, processed)


def checkpoint(arch: str) -> Path:
    return _current.checkpoint(arch)


def resume_state(arch: str) -> Path:
    return _current.resume_state(arch)


def arch_reports(arch: str) -> Path:
    return _current.arch_reports(arch)


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
    return Path(os.environ.get("DVC_ROOT") or _current.root).resolve()
