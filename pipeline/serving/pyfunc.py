"""The MLflow pyfunc model that segments images: `pipeline.predict` behind
`mlflow.pyfunc.load_model` and `mlflow models serve`.

Each training run logs it as `segmenter` (the prune stage once per UNet++ depth it serves). It
holds the checkpoint (weights, `inference` params, the training data's mean/std, CLAHE,
`preprocess.scale`, class names) and the pipeline's code, and predicts exactly as
`pipeline.predict` does (tested bit for bit on CPU).

- Input: a DataFrame with a binary column `image`, one image file per row (PNG, JPEG, TIFF as
  `pipeline.predict` reads them; base64 in a JSON request: `{"dataframe_split": {"columns":
  ["image"], "data": [["<base64>"]]}}` or `dataframe_records`; MLflow leaves base64 encoded in
  `inputs` and `instances` bodies, and a text/csv body carries text, not image bytes).
- Params: `probabilities` (bool, default false); `depth` (int, default: the model as logged):
  a UNet++ pruned to that head for this request, as `pipeline.predict --depth` (a UNet, or a
  depth the model has no head at, is a 400). The signature declares these two; MLflow drops
  any other param before the model sees it (a warning in the server's log, the answer as if
  it were absent), so the model cannot refuse a misspelt one.
- Output, one row per image: `mask`, a palette PNG whose pixel values are the class indices
  (the `<stem>_label.png` of `pipeline.predict`; base64 in a REST answer); `height`, `width`;
  with `probabilities`: `probabilities`, a .npy file of float32, (H, W) for the positive class
  of a binary task, (C, H, W) class probabilities otherwise.
- Errors: a bad image (not an image, empty, truncated, a decompression bomb, an animation or a
  stack, a float image outside [0, 1]), a bad param or a bad table is a `BadRequest`: to Python
  callers a PipelineError, from `mlflow models serve` an HTTP 400 whose JSON `message` is one
  line naming the row (`image 1: ...`), without a stack trace. What MLflow refuses before the
  model runs keeps MLflow's own answer: a 415 (text) for a content type other than JSON, CSV
  or Parquet; a 400 whose message quotes the input for bad JSON, a table without an `image`
  column or a param of the wrong type.
"""

from __future__ import annotations

import base64
import io
import os
import re
import threading
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.core.common import PipelineError
from pipeline.report.palette import label_image
from pipeline.serving.segmenter import Segmenter

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


class BadRequest(PipelineError, MlflowException):
    """A request the model refuses, in one line: a PipelineError to Python callers, an HTTP 400
    (INVALID_PARAMETER_VALUE) to REST clients, whose JSON `message` is that line alone."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @message.setter
    def message(self, value: str) -> None:
        # MLflow's scoring server rewrites the message of an MlflowException from predict into
        # "Failed to predict data '<the whole input>'. \nError: <message>" (invocations() in
        # mlflow/pyfunc/scoring_server): the client gets the one line, not its input echoed
        pass


class _Upload(io.BytesIO):
    """The bytes of one request row; PIL's errors quote the file as `<N bytes>`, not as a
    memory address."""

    def __repr__(self) -> str:
        return f"<{self.getbuffer().nbytes} bytes>"


def _text_row(i: int, data: bytes) -> str | None:
    """The error for a row of text that is no image (None if binary): base64 that MLflow left
    encoded (it decodes it in dataframe_split and dataframe_records bodies only), or text."""
    if not re.fullmatch(rb"[\x20-\x7e\t\r\n]*", data):
        return None
    compact = b"".join(data.split())
    try:
        decoded = len(compact) % 4 == 0 and base64.b64decode(compact, validate=True)
    except ValueError:  # binascii.Error: not base64
        decoded = False
    if decoded:
        return (
            f"image {i}: base64 text ({len(data)} bytes), not the bytes of an image file: MLflow "
            "decodes base64 in dataframe_split and dataframe_records bodies only, not in "
            "inputs or instances"
        )
    return f"image {i}: text ({len(data)} bytes), not an image file"


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
    prunes a UNet++ to that head on load (a request's `depth` param prunes it further). It
    runs where PIPELINE_SERVE_DEVICE says (cpu, cuda, or auto: CUDA when there is one)."""

    def __init__(self, depth: int | None = None):
        self.depth = depth

    def load_context(self, context: Any) -> None:
        device = os.environ.get("PIPELINE_SERVE_DEVICE", "auto")
        checkpoint = Path(context.artifacts[CHECKPOINT])
        self.segmenter = Segmenter.load(checkpoint, depth=self.depth, device=device)
        self._pruned = {self.depth: self.segmenter}  # per requested depth, made once
        self._lock = threading.Lock()  # the server predicts concurrent requests in threads

    def __getstate__(self) -> dict[str, Any]:
        # pickled as its depth alone: the weights travel as the checkpoint artifact, and a
        # loaded model's lock cannot be pickled
        return {"depth": self.depth}

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            return self._predict(model_input, params or {})
        except BadRequest:
            raise
        except PipelineError as exc:  # read_image's, Segmenter's: the request's fault
            raise BadRequest(str(exc)) from None

    def _segmenter(self, depth: int | None) -> Segmenter:
        if depth is None:
            return self.segmenter
        with self._lock:
            if depth not in self._pruned:
                self._pruned[depth] = self.segmenter.pruned(depth, "params.depth")
            return self._pruned[depth]

    def _predict(self, model_input: pd.DataFrame, params: dict[str, Any]) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input:
            raise BadRequest("input: a table with an `image` column of image file bytes")
        want = bool(params.get("probabilities", False))
        seg = self._segmenter(params.get("depth"))
        rows = []
        for i, data in enumerate(model_input["image"]):
            if data is None or (isinstance(data, float) and np.isnan(data)):
                raise BadRequest(f"image {i}: missing (null), not the bytes of an image file")
            if isinstance(data, str):
                raise BadRequest(
                    f"image {i}: text, not the bytes of an image file: send images base64-"
                    'encoded in a JSON body ({"dataframe_split": {"columns": ["image"], '
                    '"data": [["<base64>"]]}}); a CSV body carries text only'
                )
            if not isinstance(data, bytes | bytearray):
                kind = type(data).__name__
                raise BadRequest(f"image {i}: {kind}, not the bytes of an image file")
            if not data:
                raise BadRequest(f"image {i}: empty (0 bytes), not an image file")
            try:
                image = seg.read(_Upload(data), name=f"image {i}")
            except PipelineError as exc:  # text instead of an image: say so, not "corrupt"
                raise BadRequest(_text_row(i, bytes(data)) or str(exc)) from None
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
        columns = ["mask", "height", "width"] + (["probabilities"] if want else [])
        return pd.DataFrame(rows, columns=columns)


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
        params=ParamSchema(
            [
                ParamSpec("probabilities", DataType.boolean, False),
                ParamSpec("depth", DataType.long, None),  # None: the model as logged
            ]
        ),
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
        code_paths=[str(Path(__file__).resolve().parents[1])],  # the pipeline package
    )
    return info.model_uri
