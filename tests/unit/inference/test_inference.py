"""Full-image inference: mirror padding to the model's size multiple, odd sizes kept, and
split evaluation that does not depend on the batch size and weights the loss by pixels."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from pipeline.core.config import InferenceParams
from pipeline.engine.losses import SegmentationLoss
from pipeline.inference.evaluate import evaluate
from pipeline.inference.forward import pad_to_multiple, predict_logits
from pipeline.models import build_model
from tests.fakes import random_target


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- full-image inference -------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(37, 45), (32, 32), (3, 5)])
def test_pad_to_multiple(h, w):
    x = torch.randn(1, 3, h, w)
    padded, size = pad_to_multiple(x, 8)
    assert size == (h, w)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert padded.shape[-2] - h < 8 and padded.shape[-1] - w < 8
    assert torch.equal(padded[..., :h, :w], x)


def test_pad_to_multiple_mirrors_the_border():
    x = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 6, 6)
    padded, _ = pad_to_multiple(x, 8)
    assert padded[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5, 4, 3]


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_predict_logits_keeps_odd_sizes(arch):
    model = build_model(arch, 3, 2, base_channels=4, depth=3).eval()
    images = torch.randn(2, 3, 37, 45)
    logits = predict_logits(model, images, multiple=8)
    assert logits.shape == (2, 1, 37, 45)
    assert not logits.requires_grad
    padded, _ = pad_to_multiple(images, 8)
    with torch.no_grad():
        assert torch.equal(logits, model(padded)[..., :37, :45])


TILES = InferenceParams(tile_size=8, tile_overlap=4)


@pytest.mark.parametrize("tiles", [TILES, InferenceParams(tile_size=0)], ids=["tiled", "whole"])
def test_evaluate_does_not_depend_on_the_batch_size(tiles):
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    data = TensorDataset(torch.randn(5, 3, 12, 12), random_target(2, (5, 12, 12)))
    results = [evaluate(model, data, ["bg", "fg"], tiles, batch_size=bs) for bs in (1, 2, 5)]
    assert not model.training
    for other in results[1:]:
        assert other == pytest.approx(results[0], nan_ok=True)
    assert {"global_accuracy", "mean_accuracy", "miou", "dice", "iou_bg", "iou_fg"} <= set(
        results[0]
    )
    assert {"auc_roc", "auc_pr", "sensitivity", "specificity", "precision"} <= set(results[0])


def test_evaluate_reports_the_pixel_weighted_mean_loss_over_images():
    """Images with different numbers of scored pixels: the split's loss is each image's loss
    weighted by its scored pixels, not a plain mean over images."""
    torch.manual_seed(0)
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    images = torch.randn(2, 3, 8, 8)
    labels = random_target(2, (2, 8, 8))
    labels[1, :6] = 255  # the second image has far fewer scored pixels than the first
    n0, n1 = (int((labels[i] != 255).sum()) for i in (0, 1))

    def loss_of(idx: list[int]) -> float:
        data = TensorDataset(images[idx], labels[idx])
        return evaluate(model, data, ["bg", "fg"], TILES, loss_fn=SegmentationLoss())["loss"]

    first, second = loss_of([0]), loss_of([1])
    assert first != pytest.approx(second)  # else the weighting would not show
    assert loss_of([0, 1]) == pytest.approx((first * n0 + second * n1) / (n0 + n1), rel=1e-6)
