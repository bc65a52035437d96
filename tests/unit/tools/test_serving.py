"""pipeline.serving.pyfunc: the MLflow pyfunc model takes image files and answers exactly as
`pipeline.predict` does, bit for bit on CPU; its signature, input example and errors."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.common import PipelineError
from pipeline.predict import predict_files
from pipeline.serving.pyfunc import CHECKPOINT, SegmentationModel, log_segmenter
from tests.unit.tools.test_predict import INFERENCE, save_image, save_model


@pytest.fixture
def store(tmp_path):
    """A private sqlite MLflow store with its artifacts under tmp_path (the tracking URI is
    put back after the test by conftest's `_mlflow_uri_restored`)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("serving", (tmp_path / "artifacts").as_uri())
    return SimpleNamespace(mlflow=mlflow, experiment_id=exp)


def _data(in_channels: int, num_classes: int, **extra) -> dict:
    names = ["background", "vessel", "other"][:num_classes]
    return {
        "dataset": "synthetic",
        "class_names": names,
        "mean": [0.5] * in_channels,
        "std": [0.2] * in_channels,
        "ignore_index": 255,
        **extra,
    }


def _served(store, checkpoint: Path, example: Path, depth: int | None = None):
    with store.mlflow.start_run(experiment_id=store.experiment_id):
        uri = log_segmenter(checkpoint, example, depth=depth)
    return uri, store.mlflow.pyfunc.load_model(uri)


CASES = {  # (arch, classes, depth, inference, data): every step predict takes
    "binary UNet++, tiles": ("unetpp", 2, None, INFERENCE, {}),
    "binary UNet++ L1, flips": ("unetpp", 2, 1, {**INFERENCE, "tta": "flips"}, {}),
    "3 classes, scale 0.5, CLAHE": ("unet", 3, None, {"tile_size": 0}, {"scale": 0.5, "clahe": 2}),
}


@pytest.mark.parametrize("case", CASES)
def test_served_masks_are_pipeline_predicts_labels_bit_for_bit(tmp_path, store, case):
    arch, classes, depth, inference, extra = CASES[case]
    checkpoint = tmp_path / "model.pt"
    save_model(
        checkpoint,
        arch=arch,
        num_classes=classes,
        params={"inference": inference},
        data=_data(3, classes, **extra),
    )
    images = [tmp_path / "a.png", tmp_path / "b.jpg"]  # odd sizes: padded, tiled, cropped
    save_image(images[0], (45, 70))
    save_image(images[1], (64, 50), seed=1)
    _, model = _served(store, checkpoint, images[0], depth)

    out = model.predict(
        pd.DataFrame({"image": [p.read_bytes() for p in images]}), params={"probabilities": True}
    )
    predict_files(checkpoint, images, tmp_path / "out", depth=depth, device="cpu")
    for i, path in enumerate(images):
        label_png = tmp_path / "out" / f"{path.stem}_label.png"
        assert out["mask"][i] == label_png.read_bytes()  # the very file predict writes
        labels = np.asarray(Image.open(label_png))
        assert (out["height"][i], out["width"][i]) == labels.shape
        probs = np.load(io.BytesIO(out["probabilities"][i]))
        assert probs.dtype == np.float32
        if classes == 2:  # the positive class's probability
            assert probs.shape == labels.shape
            np.testing.assert_array_equal(probs > 0.5, labels == 1)
        else:
            assert probs.shape == (classes, *labels.shape)
            np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
            np.testing.assert_array_equal(probs.argmax(0), labels)
        assert len(np.unique(labels)) > 1, "a constant mask would prove little"


def test_masks_only_unless_probabilities_are_asked_for(tmp_path, store):
    checkpoint, image = tmp_path / "model.pt", tmp_path / "a.png"
    save_model(checkpoint, arch="unet")
    save_image(image, (32, 40))
    _, model = _served(store, checkpoint, image)
    out = model.predict(pd.DataFrame({"image": [image.read_bytes()]}))
    assert list(out.columns) == ["mask", "height", "width"]


def test_the_model_carries_its_signature_example_checkpoint_and_code(tmp_path, store):
    from mlflow.models import Model

    checkpoint, image = tmp_path / "model.pt", tmp_path / "a.png"
    save_model(checkpoint, arch="unetpp")
    save_image(image, (32, 40))
    uri, _ = _served(store, checkpoint, image, depth=1)
    local = Path(store.mlflow.artifacts.download_artifacts(uri))
    meta = Model.load(local)
    assert meta.signature.inputs.input_names() == ["image"]
    assert [p.name for p in meta.signature.params] == ["probabilities", "depth"]
    assert {"mask", "height", "width", "probabilities"} == set(meta.signature.outputs.input_names())
    example = meta.load_input_example(local)
    assert example["image"][0] == image.read_bytes()
    code = local / "code" / "pipeline"
    assert (code / "serving" / "segmenter.py").is_file()  # loads without a checkout
    assert any(p.suffix == ".pt" for p in (local / "artifacts").rglob("*"))
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "segmentation-models-pytorch==" in requirements


def test_a_bad_image_names_its_row(tmp_path, store):
    """To Python callers a PipelineError; to the server an MLflow INVALID_PARAMETER_VALUE (an
    HTTP 400, see test_serving_attacks)."""
    from mlflow.exceptions import MlflowException

    checkpoint, image = tmp_path / "model.pt", tmp_path / "a.png"
    save_model(checkpoint, arch="unet")
    save_image(image, (32, 40))
    _, model = _served(store, checkpoint, image)
    half = image.read_bytes()[:200]
    with pytest.raises(PipelineError, match=r"^image 1: unreadable or corrupt image") as error:
        model.predict(pd.DataFrame({"image": [image.read_bytes(), half]}))
    assert isinstance(error.value, MlflowException)
    assert error.value.get_http_status_code() == 400


def test_a_request_prunes_a_unetpp_to_its_depth_param_as_predict_does(tmp_path, store):
    checkpoint, image = tmp_path / "model.pt", tmp_path / "a.png"
    save_model(checkpoint, arch="unetpp")  # heads at depths 1 and 2
    save_image(image, (45, 70))
    _, model = _served(store, checkpoint, image)
    table = pd.DataFrame({"image": [image.read_bytes()]})

    predict_files(checkpoint, [image], tmp_path / "L1", depth=1, device="cpu")
    predict_files(checkpoint, [image], tmp_path / "L2", device="cpu")
    pruned = model.predict(table, params={"depth": 1})["mask"][0]
    assert pruned == (tmp_path / "L1" / "a_label.png").read_bytes()
    full = model.predict(table)["mask"][0]
    assert full == (tmp_path / "L2" / "a_label.png").read_bytes() != pruned
    with pytest.raises(
        PipelineError, match=r"^params\.depth 3: no head at depth 3; heads: \[1, 2\]$"
    ):
        model.predict(table, params={"depth": 3})


def test_the_depth_param_needs_a_unetpp(tmp_path):
    save_model(tmp_path / "model.pt", arch="unet")
    save_image(tmp_path / "a.png", (32, 40))
    model = SegmentationModel()  # the pyfunc class as the server loads it, without a store
    model.load_context(SimpleNamespace(artifacts={CHECKPOINT: str(tmp_path / "model.pt")}))
    table = pd.DataFrame({"image": [(tmp_path / "a.png").read_bytes()]})
    with pytest.raises(PipelineError, match=r"^params\.depth needs a UNet\+\+, not unet$"):
        model.predict(None, table, params={"depth": 1})
