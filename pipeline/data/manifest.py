"""data/processed/manifest.json as a typed object: what preprocess wrote and every later stage
reads (classes, channels, normalisation, splits, the resize scale, ...). A manifest
with a missing, unknown or mistyped field is one line naming it, not a KeyError later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core import paths
from pipeline.core.common import PipelineError, read_json, write_json
from pipeline.core.config import IGNORE_INDEX


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BorderWeights(_Frozen):
    """The U-Net paper's weight maps in train/weights/: w_c(x) + w0 exp(-(d1 + d2)^2 / 2s^2)."""

    w0: float
    sigma: float
    class_weights: list[float]


class Manifest(_Frozen):
    dataset: str
    num_classes: int
    class_names: list[str]
    # binary tasks: the class the binary metrics score (the sigmoid channel, index 1)
    positive_class: str | None = None
    in_channels: int
    ignore_index: int = IGNORE_INDEX
    mean: list[float]  # the train split's, per channel, on [0, 1]
    std: list[float]
    train_class_pixels: list[int]
    clahe: float = 0.0  # applied to every image before anything else (and by predict)
    # images (all splits) resized by this before the model sees them, train labels too;
    # val/test labels stay full-size, so the logits are upsampled to score them
    scale: float = 1.0
    bit_depth: int = 0  # 16-bit images were scaled by 2**bit_depth - 1 (0: 16 bits)
    splits: dict[str, list[str]]  # split -> image stems (their arrays: pipeline/data/store.py)
    # DRIVE: a second human's tracing of the test images, scored like a model
    second_observer: dict[str, float | None] | None = None
    border_weights: BorderWeights | None = None

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def checkpoint_data(self) -> dict[str, Any]:
        """What `pipeline.predict` needs to treat a new image as training did."""
        keys = ("dataset", "class_names", "mean", "std", "ignore_index", "clahe", "scale")
        return {k: getattr(self, k) for k in (*keys, "bit_depth")}


def load_manifest(path: Path | None = None) -> Manifest:
    path = path or paths.MANIFEST
    data = read_json(path, "processed-data manifest")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise PipelineError(
            f"{path}: {where}: {err['msg']} (written by another version of preprocess? "
            "re-run it: dvc repro -f preprocess)"
        ) from None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json(folder / paths.MANIFEST.name, manifest.model_dump(mode="json"))


def empty_classes(split: str, path: Path | None = None) -> tuple[list[str], int]:
    """The classes no label of `split` holds a pixel of, from class_pixels.csv (preprocess
    writes it), and the number of classes: metrics that are undefined (or meaningless: an
    all-background test split scores a perfect mIoU) for them."""
    import csv

    path = path or paths.CLASS_PIXELS
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["split"] == split]
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run the preprocess stage first)") from None
    classes = [r for r in rows if int(r["class_index"]) != IGNORE_INDEX]
    return [r["class_name"] for r in classes if int(r["pixels"]) == 0], len(classes)
