"""The segmentation loss (CE + Dice), deep supervision, the logits conventions, the
confusion-matrix metrics, full-image inference and the model statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipeline.config import InferenceParams
from pipeline.inference import evaluate, pad_to_multiple, predict_logits
from pipeline.losses import DeepSupervisionLoss, SegmentationLoss, predict, probabilities
from pipeline.metrics import ConfusionMatrix
from pipeline.models import build_model
from pipeline.stats import count_params, gflops, latency_ms
from tests.fakes import random_target

IGNORE = 255


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perfect_logits(target: torch.Tensor, channels: int, margin: float = 20.0) -> torch.Tensor:
    safe = torch.where(target == IGNORE, 0, target)
    if channels == 1:
        return (safe.float() * 2 - 1)[:, None] * margin
    onehot = nn.functional.one_hot(safe, channels).permute(0, 3, 1, 2).float()
    return (onehot * 2 - 1) * margin


# --- SegmentationLoss -----------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "num_classes"), [(1, 2), (4, 4)])
def test_loss_ignores_pixels_labelled_255(channels, num_classes):
    loss_fn = SegmentationLoss()
    target = random_target(num_classes)
    ignored = (target == IGNORE)[:, None].expand(-1, channels, -1, -1)
    assert ignored.any() and not ignored.all()
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    changed = torch.where(ignored, torch.randn_like(logits) * 50, logits.detach())

    loss = loss_fn(logits, target)
    assert torch.allclose(loss, loss_fn(changed, target), rtol=0, atol=1e-6)
    loss.backward()
    assert (logits.grad[ignored] == 0).all()
    assert (logits.grad[~ignored] != 0).any()


@pytest.mark.parametrize("channels", [1, 4])
def test_all_ignored_batch_gives_zero_loss_with_a_gradient(channels):
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE)
    loss = SegmentationLoss()(logits, target)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and (logits.grad == 0).all()


@pytest.mark.parametrize(("channels", "num_classes"), [(1, 2), (4, 4)])
def test_near_perfect_logits_give_a_loss_near_zero(channels, num_classes):
    loss_fn = SegmentationLoss()
    target = random_target(num_classes)
    perfect = loss_fn(_perfect_logits(target, channels), target)
    unsure = loss_fn(torch.zeros(2, channels, 8, 8), target)
    wrong = loss_fn(-_perfect_logits(target, channels), target)
    assert 0 <= perfect.item() < 1e-3
    assert perfect < unsure < wrong


def test_binary_loss_by_hand():
    """Zero logits: p = 0.5 everywhere, so BCE = ln 2, and with 2 vessel pixels out of 4 valid
    ones, soft Dice = 1 - 2 * 1 / (2 + 2) = 0.5 (smp's DiceLoss, smooth 0)."""
    target = torch.tensor([[[1, 1], [0, 0]], [[IGNORE, IGNORE], [IGNORE, IGNORE]]])
    logits = torch.zeros(2, 1, 2, 2)
    assert SegmentationLoss(1.0, 0.0)(logits, target).item() == pytest.approx(math.log(2))
    assert SegmentationLoss(0.0, 1.0)(logits, target).item() == pytest.approx(0.5)
    assert SegmentationLoss()(logits, target).item() == pytest.approx(math.log(2) + 0.5)


@pytest.mark.parametrize(("channels", "num_classes"), [(1, 2), (3, 3)])
def test_loss_is_the_weighted_sum_of_ce_and_dice(channels, num_classes):
    target = random_target(num_classes)
    logits = torch.randn(2, channels, 8, 8)
    ce = SegmentationLoss(1.0, 0.0)(logits, target)
    dice = SegmentationLoss(0.0, 1.0)(logits, target)
    assert torch.allclose(SegmentationLoss(0.3, 2.0)(logits, target), 0.3 * ce + 2.0 * dice)


def test_deep_supervision_loss_is_the_weighted_sum_over_heads():
    base = SegmentationLoss()
    target = random_target(2)
    outputs = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    expected = sum(w * base(o, target) for w, o in zip(weights, outputs, strict=True))
    assert torch.allclose(DeepSupervisionLoss(base, weights)(outputs, target), expected)


def test_deep_supervision_loss_on_a_single_tensor_is_the_plain_loss():
    base = SegmentationLoss()
    target = random_target(2)
    logits = torch.randn(2, 1, 8, 8)
    assert torch.equal(DeepSupervisionLoss(base, [0.5, 0.5])(logits, target), base(logits, target))


def test_deep_supervision_loss_needs_one_weight_per_head():
    loss = DeepSupervisionLoss(SegmentationLoss(), [0.5, 0.5])
    with pytest.raises(ValueError, match="3 heads but 2 weights"):
        loss([torch.randn(1, 1, 4, 4)] * 3, random_target(2, (1, 4, 4)))


# --- probabilities and predictions ----------------------------------------------------------


def test_binary_probabilities_are_sigmoid_background_then_vessel():
    logits = torch.tensor([-2.0, 0.0, 3.0]).view(1, 1, 1, 3)
    probs = probabilities(logits)
    assert probs.shape == (1, 2, 1, 3)
    assert torch.allclose(probs[:, 1], torch.sigmoid(logits[:, 0]))
    assert torch.allclose(probs.sum(1), torch.ones(1, 1, 3))
    assert predict(logits).tolist() == [[[0, 0, 1]]]  # logit 0 (p = 0.5) is background


def test_multiclass_probabilities_are_softmax():
    logits = torch.randn(2, 5, 4, 4)
    probs = probabilities(logits)
    assert torch.allclose(probs, torch.softmax(logits, 1))
    assert torch.allclose(probs.sum(1), torch.ones(2, 4, 4))
    assert torch.equal(predict(logits), logits.argmax(1))


@pytest.mark.parametrize("channels", [1, 3])
def test_predict_is_the_most_probable_class(channels):
    logits = torch.randn(2, channels, 6, 6)
    pred = predict(logits)
    assert pred.shape == (2, 6, 6) and pred.dtype == torch.int64
    assert torch.equal(pred, probabilities(logits).argmax(1))


# --- ConfusionMatrix ------------------------------------------------------------------------


def test_confusion_matrix_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 2, IGNORE, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # the ignored pixel (label 255, predicted 0) is not counted
    assert cm.matrix.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 1]]
    m = cm.compute(["a", "b", "c"])
    # 4 of 7 pixels right; per-class recall 2/3, 1/2, 1/2
    assert m["global_accuracy"] == pytest.approx(4 / 7)
    assert m["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    # IoU = tp / (true + pred - tp): 2 / (3 + 3 - 2), 1 / (2 + 2 - 1), 1 / (2 + 2 - 1)
    assert m["iou_a"] == pytest.approx(1 / 2)
    assert m["iou_b"] == pytest.approx(1 / 3)
    assert m["iou_c"] == pytest.approx(1 / 3)
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 3) / 3)
    # multi-class dice: mean of 2 tp / (true + pred) = 4/6, 2/4, 2/4
    assert m["dice"] == pytest.approx((4 / 6 + 2 / 4 + 2 / 4) / 3)


def test_binary_dice_is_the_foreground_dice():
    target = torch.tensor([[1, 1, 1, 0], [0, 0, IGNORE, IGNORE]])
    pred = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]])
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[2, 1], [1, 2]]
    m = cm.compute(["background", "vessel"])
    assert m["dice"] == pytest.approx(2 * 2 / (3 + 3))
    assert m["iou_vessel"] == pytest.approx(2 / 4)
    assert m["iou_background"] == pytest.approx(2 / 4)
    assert m["global_accuracy"] == pytest.approx(4 / 6)


def test_classes_absent_from_truth_and_prediction_are_left_out_of_the_means():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    m = cm.compute()
    assert math.isnan(m["iou_2"])
    assert m["miou"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)


def test_only_ignored_pixels_count_nothing():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(2, 3, 3, dtype=torch.long), torch.full((2, 3, 3), IGNORE))
    assert cm.matrix.sum() == 0
    assert math.isnan(cm.compute()["miou"])


def test_confusion_matrix_accumulates_pixels_not_batch_averages():
    batches = [(torch.randint(0, 3, (n, 5, 5)), random_target(3, (n, 5, 5))) for n in (1, 2, 4)]
    acc = ConfusionMatrix(3)
    for pred, target in batches:
        acc.update(pred, target)
    once = ConfusionMatrix(3)
    once.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    assert (acc.matrix == once.matrix).all()
    assert acc.compute() == pytest.approx(once.compute(), nan_ok=True)


def test_split_metrics_differ_from_an_average_of_batch_metrics():
    """One confusion matrix over the split: a 1-pixel batch weighs 1 pixel, not one batch."""
    small = (torch.tensor([1]), torch.tensor([1]))  # perfect
    big = (torch.tensor([0] * 9), torch.tensor([1] * 9))  # all wrong
    cm = ConfusionMatrix(2)
    for pred, target in (small, big):
        cm.update(pred, target)
    assert cm.compute()["global_accuracy"] == pytest.approx(1 / 10)  # batch average: 0.5


def test_label_values_out_of_range_raise():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="label value 2"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="differ"):
        cm.update(torch.tensor([0, 1]), torch.tensor([[0, 1]]))


def test_prediction_values_out_of_range_raise():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError):
        cm.update(torch.tensor([2]), torch.tensor([0]))


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
    cpu = torch.device("cpu")
    results = [
        evaluate(model, data, ["bg", "fg"], cpu, 4, tiles, batch_size=bs) for bs in (1, 2, 5)
    ]
    assert not model.training
    for other in results[1:]:
        assert other == pytest.approx(results[0], nan_ok=True)
    assert {"global_accuracy", "mean_accuracy", "miou", "dice", "iou_bg", "iou_fg"} <= set(
        results[0]
    )
    assert {"auc_roc", "auc_pr", "sensitivity", "specificity", "precision"} <= set(results[0])


def test_evaluate_reports_the_loss_when_given_one():
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    data = TensorDataset(torch.randn(2, 3, 8, 8), random_target(2, (2, 8, 8)))
    metrics = evaluate(model, data, ["bg", "fg"], torch.device("cpu"), 4, TILES, SegmentationLoss())
    assert metrics["loss"] > 0


# --- model statistics -----------------------------------------------------------------------


def test_count_params_of_a_single_conv():
    assert count_params(nn.Conv2d(1, 1, 3)) == 9 + 1
    assert count_params(nn.Conv2d(3, 8, 3, bias=False)) == 3 * 8 * 9


def test_gflops_of_a_single_conv_by_hand():
    """torch's flop counter counts 2 FLOPs per multiply-accumulate and ignores the bias.
    Conv 1->1 3x3 without padding on 8x8: 6x6 outputs x 9 MACs = 324 MACs = 648 FLOPs."""
    assert gflops(nn.Conv2d(1, 1, 3), (1, 1, 8, 8)) == pytest.approx(648e-9)
    # same padding: 8x8 outputs x 9 MACs x 2
    assert gflops(nn.Conv2d(1, 1, 3, padding=1), (1, 1, 8, 8)) == pytest.approx(1152e-9)


def test_gflops_are_per_image():
    conv = nn.Conv2d(1, 1, 3)
    assert gflops(conv, (4, 1, 8, 8)) == pytest.approx(gflops(conv, (1, 1, 8, 8)))


def test_pruned_unetpp_needs_fewer_flops():
    model = build_model("unetpp", 3, 2, base_channels=4, depth=3)
    flops = [gflops(model.prune(k), (1, 3, 32, 32)) for k in (1, 2, 3)]
    assert 0 < flops[0] < flops[1] < flops[2]


def test_latency_ms_is_a_positive_float():
    ms = latency_ms(nn.Conv2d(1, 1, 3), (1, 1, 8, 8), runs=3, warmup=1)
    assert isinstance(ms, float)
    assert ms > 0
