"""The MLflow pyfunc model that segments images: `pipeline.predict` behind
`mlflow.pyfunc.load_model` and `mlflow models serve`.

Each training run logs it as `segmenter` (the prune stage once per UNet++ depth it serves). It
holds the checkpoint (weights, `inference` params, the training data's mean/std, CLAHE,
`preprocess.scale`, class names) and the pipeline's code, and predicts exactly as
`pipeline.predict` does (tested bit for bit on CPU).

- Input: a DataFrame with a binary column `image`, one image file per row (PNG, JPEG, TIFF as
  `pipeline.predict` reads them; base64 in a REST request).
- Params: `probabilities` (bool, default false).
- Output, one row per image: `mask`, a palette PNG whose pixel values are the class indices
  (the `<stem>_label.png` of `pipeline.predict`; base64 in a REST answer); `height`, `width`;
  with `probabilities`: `probabilities`, a .npy file of float32, (H, W) for the positive class
  of a binary task, (C, H, W) class probabilities otherwise.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipeline.common import PipelineError
from pipeline.report.palette import label_image
from pipeline.segmenter import Segmenter

CHECKPOINT = "checkpoint"  # the artifact key of the .pt file
# what loading the pipeline's code and predicting imports (opencv: CLAHE)
REQUIREMENTS = (
    "torch",
    "segmentation-models-pytorch",
    "numpy",
    "pandas",
    "pillow",
    "pydantic",
    "pyyaml",
    "tqdm",
    "opencv-python-headless",
)


def png_bytes(labels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    label_image(labels).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """Images in, label masks (and probabilities) out; see the module's docstring. `depth`
    prunes a UNet++ to that head on load. It runs where PIPELINE_SERVE_DEVICE says (cpu,
    cuda, or auto: CUDA when there is one)."""

    def __init__(self, depth: int | None = None):
        self.depth = depth

    def load_context(self, context: Any) -> None:
        device = os.environ.get("PIPELINE_SERVE_DEVICE", "auto")
        checkpoint = Path(context.artifacts[CHECKPOINT])
        self.segmenter = Segmenter.load(checkpoint, depth=self.depth, device=device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input:
            raise PipelineError("input: a table with an `image` column of image file bytes")
        want = bool((params or {}).get("probabilities", False))
        seg, rows = self.segmenter, []
        for i, data in enumerate(model_input["image"]):
            if not isinstance(data, bytes | bytearray):
                kind = type(data).__name__
                raise PipelineError(f"image {i}: {kind}, not the bytes of an image file")
            image = seg.read(io.BytesIO(data), name=f"image {i}")
            logits = seg.logits(image)  # (1, 1 | C, H, W)
            labels = seg.labels(logits)  # (H, W)
            row: dict[str, Any] = {
                "mask": png_bytes(labels),
                "height": labels.shape[0],
                "width": labels.shape[1],
            }
            if want:
                probs = seg.probabilities(logits)  # (C, H, W)
                row["probabilities"] = npy_bytes(probs[1] if seg.num_classes == 2 else probs)
            rows.append(row)
        return pd.DataFrame(rows)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema(
            [
                ColSpec(DataType.binary, "mask"),
                ColSpec(DataType.long, "height"),
                ColSpec(DataType.long, "width"),
                ColSpec(DataType.binary, "probabilities", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("probabilities", DataType.boolean, False)]),
    )


def log_segmenter(
    checkpoint: Path, example: Path, depth: int | None = None, name: str = "segmenter"
) -> str:
    """Log the checkpoint as a segmentation pyfunc model on the active run; its URI.

    `example` (an image file) becomes the input example; `depth` prunes a UNet++ on load."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in REQUIREMENTS:
        try:  # a local label (2.15.0+cu128) names no wheel on PyPI
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:  # e.g. opencv-python instead of the headless build
            continue
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=SegmentationModel(depth),
        artifacts={CHECKPOINT: str(checkpoint)},
        signature=signature(),
        input_example=pd.DataFrame({"image": [Path(example).read_bytes()]}),
        pip_requirements=requirements,
        code_paths=[str(Path(__file__).resolve().parent)],  # the pipeline package
    )
    return info.model_uri
