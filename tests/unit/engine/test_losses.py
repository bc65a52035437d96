"""SegmentationLoss against torch, smp and hand formulas; class and pixel weights; ignored pixels;
median-frequency weights; build_loss; deep supervision with a weight map."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss

from pipeline.core.common import PipelineError
from pipeline.core.config import LossParams
from pipeline.engine.losses import (
    DeepSupervisionLoss,
    SegmentationLoss,
    build_eval_loss,
    build_loss,
    median_frequency_weights,
)
from pipeline.inference.forward import predict, probabilities
from tests.fakes import fake_manifest, random_target

IGNORE = 255
MODES = [(1, 2), (4, 4)]  # (channels, num_classes): binary, multi-class


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _perfect_logits(target: torch.Tensor, channels: int, margin: float = 20.0) -> torch.Tensor:
    safe = torch.where(target == IGNORE, 0, target)
    if channels == 1:
        return (safe.float() * 2 - 1)[:, None] * margin
    onehot = F.one_hot(safe, channels).permute(0, 3, 1, 2).float()
    return (onehot * 2 - 1) * margin


def _ce(**kw) -> SegmentationLoss:
    return SegmentationLoss(1.0, 0.0, **kw)


def _manifest(num_classes=2, pixels=(900, 100)):
    return fake_manifest(num_classes, ignore_index=IGNORE, train_class_pixels=list(pixels))


# --- CE with class and pixel weights --------------------------------------------------------


def test_ce_with_class_weights_equals_torch():
    target = random_target(4)
    logits = torch.randn(2, 4, 8, 8)
    weights = [0.5, 2.0, 1.0, 3.0]
    expected = F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=IGNORE)
    assert torch.allclose(_ce(class_weights=weights)(logits, target), expected)


def test_binary_ce_with_class_weights_by_hand():
    """Binary class weights are [background, foreground]: sum(w_t * bce) / sum(w_t)."""
    target = random_target(2)
    logits = torch.randn(2, 1, 8, 8)
    valid = target != IGNORE
    bce = F.binary_cross_entropy_with_logits(
        logits[:, 0][valid], target[valid].float(), reduction="none"
    )
    w = torch.tensor([0.3, 4.0])[target[valid]]
    expected = (w * bce).sum() / w.sum()
    assert torch.allclose(_ce(class_weights=[0.3, 4.0])(logits, target), expected)


@pytest.mark.parametrize(("channels", "num_classes"), MODES)
def test_pixel_weights_of_ones_give_the_unweighted_loss(channels, num_classes):
    target = random_target(num_classes)
    logits = torch.randn(2, channels, 8, 8)
    loss = SegmentationLoss(focal_weight=0.5)
    ones = torch.ones(2, 8, 8)
    assert torch.allclose(loss(logits, target, ones), loss(logits, target))


@pytest.mark.parametrize(("channels", "num_classes"), MODES)
def test_doubling_one_pixels_weight_counts_it_twice(channels, num_classes):
    target = random_target(num_classes, ignored=0.0)
    logits = torch.randn(2, channels, 8, 8)
    per_pixel = (
        F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
        if channels == 1
        else F.cross_entropy(logits, target, reduction="none")
    )  # (B, H, W)
    weight = torch.ones(2, 8, 8)
    weight[1, 3, 4] = 2.0
    n = per_pixel.numel()
    expected = (per_pixel.sum() + per_pixel[1, 3, 4]) / (n + 1)
    assert torch.allclose(_ce()(logits, target, weight), expected)


def test_pixel_and_class_weights_multiply():
    target = random_target(3)
    logits = torch.randn(2, 3, 8, 8)
    weight = torch.rand(2, 8, 8) * 5
    cw = torch.tensor([1.0, 2.0, 0.5])
    valid = target != IGNORE
    ce = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none")[valid]
    w = cw[target[valid]] * weight[valid]
    expected = (w * ce).sum() / w.sum()
    assert torch.allclose(_ce(class_weights=cw.tolist())(logits, target, weight), expected)


# --- ignored pixels -------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "num_classes"), MODES)
def test_ignored_pixels_never_matter(channels, num_classes):
    """All terms and weights on: changing logits (and weights) at 255 pixels changes nothing,
    and their gradient is exactly zero."""
    loss_fn = SegmentationLoss(1.0, 1.0, 1.0, 2.0, [1.0 + i for i in range(num_classes)])
    target = random_target(num_classes)
    ignored = (target == IGNORE)[:, None].expand(-1, channels, -1, -1)
    assert ignored.any() and not ignored.all()
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    changed = torch.where(ignored, torch.randn_like(logits) * 50, logits.detach())
    weight = torch.rand(2, 8, 8) + 0.5
    other_weight = torch.where(target == IGNORE, 100.0, weight)

    loss = loss_fn(logits, target, weight)
    assert torch.allclose(loss, loss_fn(changed, target, other_weight), rtol=0, atol=1e-6)
    loss.backward()
    assert (logits.grad[ignored] == 0).all()
    assert (logits.grad[~ignored] != 0).any()


@pytest.mark.parametrize("channels", [1, 4])
def test_only_ignored_pixels_give_zero_with_a_graph(channels):
    logits = torch.randn(2, channels, 8, 8, requires_grad=True)
    loss = SegmentationLoss(focal_weight=1.0)(logits, torch.full((2, 8, 8), IGNORE))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


# --- Dice (smp) against the hand formula ----------------------------------------------------


def _hand_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - 2 sum(p t) / (sum p + sum t) over the valid pixels of the whole batch; binary: the
    foreground only; multi-class: the mean over all classes, a class without labelled pixels
    counting 0 (smp's convention)."""
    valid = target != IGNORE
    t = target[valid]  # (N,)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])[valid]
        return 1 - 2 * (p * t).sum() / (p.sum() + t.sum())
    probs = torch.softmax(logits, 1).permute(0, 2, 3, 1)[valid]  # (N, C)
    losses = []
    for c in range(logits.shape[1]):
        p, tc = probs[:, c], (t == c).float()
        present = tc.sum() > 0
        losses.append(1 - 2 * (p * tc).sum() / (p.sum() + tc.sum()) if present else p.sum() * 0)
    return torch.stack(losses).mean()


@pytest.mark.parametrize(("channels", "num_classes"), MODES)
def test_dice_equals_the_hand_formula_on_valid_pixels(channels, num_classes):
    target = random_target(num_classes)
    logits = torch.randn(2, channels, 8, 8) * 3
    dice = SegmentationLoss(0.0, 1.0)(logits, target)
    assert torch.allclose(dice, _hand_dice(logits, target), atol=1e-6)


@pytest.mark.parametrize(("channels", "num_classes"), [*MODES, (5, 3)])  # (5, 3): 2 absent
def test_dice_equals_smp_dice_loss_in_value_and_gradient(channels, num_classes):
    """Our one-hot-free Dice is smp's DiceLoss(from_logits, smooth 0, ignore_index), the
    reference it replaced for speed: the same value and the same gradient."""
    target = random_target(num_classes, shape=(2, 16, 16))
    target[0, :3] = IGNORE
    ours_in = (torch.randn(2, channels, 16, 16) * 3).requires_grad_()
    smp_in = ours_in.detach().clone().requires_grad_()
    ours = SegmentationLoss(0.0, 1.0)(ours_in, target)
    mode = "binary" if channels == 1 else "multiclass"
    ref = DiceLoss(mode, from_logits=True, ignore_index=IGNORE)(smp_in, target)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(ours_in.grad, smp_in.grad, atol=1e-6)


def test_multiclass_dice_counts_an_absent_class_as_zero():
    target = random_target(2)  # classes 0, 1 of 3 channels
    logits = torch.randn(2, 3, 8, 8)
    dice = SegmentationLoss(0.0, 1.0)(logits, target)
    assert torch.allclose(dice, _hand_dice(logits, target), atol=1e-6)


# --- focal ----------------------------------------------------------------------------------


def _hand_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    valid = target != IGNORE
    t = target[valid]
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])[valid]
        pt = torch.where(t == 1, p1, 1 - p1)
    else:
        probs = torch.softmax(logits, 1).permute(0, 2, 3, 1)[valid]  # (N, C)
        pt = probs.gather(1, t[:, None])[:, 0]
    return (-((1 - pt) ** gamma) * torch.log(pt)).mean()


@pytest.mark.parametrize(("channels", "num_classes"), MODES)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_equals_the_hand_formula(channels, num_classes, gamma):
    target = random_target(num_classes)
    logits = torch.randn(2, channels, 8, 8) * 2
    focal = SegmentationLoss(0.0, 0.0, 1.0, gamma)(logits, target)
    assert torch.allclose(focal, _hand_focal(logits, target, gamma), atol=1e-6)


def test_binary_focal_equals_smp():
    target = random_target(2)
    logits = torch.randn(2, 1, 8, 8) * 2
    smp = FocalLoss("binary", gamma=2.0, ignore_index=IGNORE)(logits, target)
    assert torch.allclose(SegmentationLoss(0.0, 0.0, 1.0, 2.0)(logits, target), smp, atol=1e-6)


@pytest.mark.parametrize(("channels", "num_classes"), MODES)
def test_focal_with_gamma_zero_is_ce(channels, num_classes):
    target = random_target(num_classes)
    logits = torch.randn(2, channels, 8, 8)
    focal = SegmentationLoss(0.0, 0.0, 1.0, 0.0)(logits, target)
    assert torch.allclose(focal, _ce()(logits, target), atol=1e-6)


def test_loss_is_the_weighted_sum_of_its_terms():
    target = random_target(3)
    logits = torch.randn(2, 3, 8, 8)
    weight = torch.rand(2, 8, 8)
    ce = SegmentationLoss(1.0, 0.0, class_weights=[1.0, 2.0, 3.0])(logits, target, weight)
    dice = SegmentationLoss(0.0, 1.0)(logits, target)
    focal = SegmentationLoss(0.0, 0.0, 1.0, 1.5)(logits, target)
    both = SegmentationLoss(0.3, 2.0, 0.7, 1.5, [1.0, 2.0, 3.0])(logits, target, weight)
    assert torch.allclose(both, 0.3 * ce + 2.0 * dice + 0.7 * focal)


# --- dtypes and shapes ----------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "num_classes"), MODES)
def test_bf16_logits_give_a_float32_loss(channels, num_classes):
    target = random_target(num_classes)
    logits = torch.randn(2, channels, 8, 8).bfloat16().requires_grad_()
    loss_fn = SegmentationLoss(focal_weight=1.0)
    loss = loss_fn(logits, target, torch.ones(2, 8, 8, dtype=torch.float16))
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, loss_fn(logits.detach().float(), target), atol=1e-6)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_mismatched_shapes_raise():
    loss = SegmentationLoss()
    with pytest.raises(ValueError, match="target"):
        loss(torch.randn(2, 1, 8, 8), torch.zeros(2, 8, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        loss(torch.randn(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long), torch.ones(2, 8))
    with pytest.raises(ValueError, match="3 class weights for 2 classes"):
        _ce(class_weights=[1, 2, 3])(torch.randn(1, 1, 4, 4), torch.zeros(1, 4, 4).long())


# --- median-frequency weights and build_loss ------------------------------------------------


def test_median_frequency_weights_by_hand():
    """freq = 0.6, 0.3, 0.1 (the empty class left out); median 0.3 -> 0.5, 1, 3; empty -> 0."""
    assert median_frequency_weights([600, 300, 0, 100]) == pytest.approx([0.5, 1.0, 0.0, 3.0])
    # even count: the median is the mean of the middle two (0.25 + 0.15) / 2 = 0.2
    assert median_frequency_weights([50, 25, 15, 10]) == pytest.approx([0.4, 0.8, 4 / 3, 2.0])


def test_median_frequency_weights_need_pixels():
    with pytest.raises(PipelineError, match="median_frequency"):
        median_frequency_weights([0, 0])


def test_build_loss_resolves_class_weights():
    manifest = _manifest(2, (900, 100))
    loss = build_eval_loss(LossParams(class_weights="median_frequency"), manifest)
    assert loss.class_weights.tolist() == pytest.approx([0.5 / 0.9, 0.5 / 0.1])
    loss = build_eval_loss(LossParams(class_weights="sqrt_median_frequency"), manifest)
    assert loss.class_weights.tolist() == pytest.approx([(0.5 / 0.9) ** 0.5, (0.5 / 0.1) ** 0.5])
    loss = build_eval_loss(LossParams(class_weights=[1.0, 3.0]), manifest)
    assert loss.class_weights.tolist() == [1.0, 3.0]
    assert build_eval_loss(LossParams(), manifest).class_weights is None
    plain = build_loss(LossParams(focal_weight=0.5, focal_gamma=1.0), False, manifest)
    assert isinstance(plain, SegmentationLoss)
    assert (plain.focal_weight, plain.focal_gamma) == (0.5, 1.0)


def test_build_loss_needs_one_class_weight_per_class():
    manifest = _manifest(3, (5, 3, 2))
    with pytest.raises(PipelineError, match=r"loss.class_weights: 2 weights for 3 classes \(c0"):
        build_loss(LossParams(class_weights=[1.0, 2.0]), False, manifest)
    with pytest.raises(PipelineError, match="all weights are 0"):
        build_loss(LossParams(class_weights=[0.0, 0.0, 0.0]), False, manifest)


# --- deep supervision -----------------------------------------------------------------------


def test_deep_supervision_passes_the_weight_map_to_every_head():
    manifest = _manifest()
    heads = [0.2, 0.3, 0.5]
    loss = build_loss(LossParams(ds_weights=heads), True, manifest)
    assert isinstance(loss, DeepSupervisionLoss)
    base = build_eval_loss(LossParams(), manifest)
    target = random_target(2)
    weight = torch.rand(2, 8, 8) * 3
    outputs = [torch.randn(2, 1, 8, 8) for _ in range(3)]
    expected = sum(w * base(o, target, weight) for w, o in zip(heads, outputs, strict=True))
    assert torch.allclose(loss(outputs, target, weight), expected)
    assert not torch.allclose(loss(outputs, target), expected)  # the weights did count
    assert torch.equal(loss(outputs[0], target, weight), base(outputs[0], target, weight))
    with pytest.raises(ValueError, match="2 heads but 3 weights"):
        loss(outputs[:2], target, weight)


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
