"""Split-level metrics checked against scikit-learn: the confusion-matrix metrics (accuracy,
IoU, Dice, binary sensitivity / specificity / precision / F1) and the histogram-based AUC-ROC
and average precision, on random data with ignored pixels (255) accumulated over batches."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pipeline.inference.metrics import ConfusionMatrix, ScoreHistogram, split_metrics
from tests.fakes import random_target


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # random_target draws from torch's global generator


IGNORE = 255
BATCH_SIZES = (1, 3, 2, 4)  # batches of different sizes, accumulated one after the other


def _batches(seed: int, num_classes: int, hw=(16, 20), ignored: float = 0.2, skill=0.6):
    """[(pred, target, prob)] batches: targets with ~`ignored` pixels labelled 255, predictions
    right with probability ~`skill`, prob = a noisy foreground score (binary) correlated with
    the target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in BATCH_SIZES:
        target = torch.randint(0, num_classes, (n, *hw), generator=g)
        noise = torch.randint(0, num_classes, (n, *hw), generator=g)
        pred = torch.where(torch.rand(n, *hw, generator=g) < skill, target, noise)
        prob = (0.35 * target.float() + 0.65 * torch.rand(n, *hw, generator=g)).clamp(0, 1)
        target[torch.rand(n, *hw, generator=g) < ignored] = IGNORE
        out.append((pred, target, prob))
    return out


def _valid(batches):
    """The non-ignored pixels of all batches, flat numpy arrays (what sklearn sees)."""
    pred = torch.cat([p.flatten() for p, _, _ in batches])
    target = torch.cat([t.flatten() for _, t, _ in batches])
    prob = torch.cat([s.flatten() for _, _, s in batches])
    keep = target != IGNORE
    return pred[keep].numpy(), target[keep].numpy(), prob[keep].double().numpy()


def _accumulate(batches, num_classes, bins=1000):
    cm, sh = ConfusionMatrix(num_classes), ScoreHistogram(bins)
    for pred, target, prob in batches:
        cm.update(pred, target)
        if num_classes == 2:
            sh.update(prob, target)
    return cm, sh


def _quantised(scores: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum(np.floor(scores * bins), bins - 1) / bins


# --- ConfusionMatrix against sklearn --------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_confusion_matrix_metrics_match_sklearn(seed, num_classes):
    batches = _batches(seed, num_classes)
    cm, _ = _accumulate(batches, num_classes)
    y_pred, y_true, _ = _valid(batches)
    labels = list(range(num_classes))
    names = [f"c{c}" for c in labels]
    m = cm.compute(names)

    assert (cm.matrix == confusion_matrix(y_true, y_pred, labels=labels)).all()
    assert m["global_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["mean_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    iou = jaccard_score(y_true, y_pred, labels=labels, average=None)
    dice = f1_score(y_true, y_pred, labels=labels, average=None)
    for c, name in enumerate(names):
        assert m[f"iou_{name}"] == pytest.approx(iou[c], abs=1e-12)
        assert m[f"dice_{name}"] == pytest.approx(dice[c], abs=1e-12)
    assert m["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    expected_dice = dice[1] if num_classes == 2 else dice.mean()
    assert m["dice"] == pytest.approx(expected_dice, abs=1e-12)
    binary_keys = {"sensitivity", "specificity", "precision", "f1"}
    if num_classes == 2:
        assert m["sensitivity"] == pytest.approx(recall_score(y_true, y_pred), abs=1e-12)
        assert m["specificity"] == pytest.approx(
            recall_score(y_true, y_pred, pos_label=0), abs=1e-12
        )
        assert m["precision"] == pytest.approx(precision_score(y_true, y_pred), abs=1e-12)
        assert m["f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
        assert m["f1"] == m["dice"] == m["dice_c1"]
    else:
        assert not binary_keys & set(m)


def test_binary_metrics_by_hand():
    # true:  1 1 1 0 0 0 0 | ignored
    # pred:  1 1 0 1 0 0 0 | 1
    target = torch.tensor([1, 1, 1, 0, 0, 0, 0, IGNORE])
    pred = torch.tensor([1, 1, 0, 1, 0, 0, 0, 1])
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    m = cm.compute(["bg", "fg"])
    assert m["sensitivity"] == pytest.approx(2 / 3)  # tp / (tp + fn)
    assert m["specificity"] == pytest.approx(3 / 4)  # tn / (tn + fp)
    assert m["precision"] == pytest.approx(2 / 3)  # tp / (tp + fp)
    assert m["f1"] == pytest.approx(2 * 2 / (3 + 3))
    assert m["dice_bg"] == pytest.approx(2 * 3 / (4 + 4))


def test_zero_denominators_give_nan():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long))
    m = cm.compute()
    # no foreground in truth nor prediction: its recall, precision and Dice are undefined
    for key in ("sensitivity", "precision", "f1", "dice", "dice_1", "iou_1"):
        assert math.isnan(m[key]), key
    assert m["specificity"] == 1.0 and m["dice_0"] == 1.0 and m["global_accuracy"] == 1.0


def test_confusion_matrix_batch_accumulation_equals_one_update():
    batches = _batches(3, 5)
    acc, _ = _accumulate(batches, 5)
    once = ConfusionMatrix(5)
    once.update(torch.cat([p for p, _, _ in batches]), torch.cat([t for _, t, _ in batches]))
    assert (acc.matrix == once.matrix).all()
    assert acc.compute() == pytest.approx(once.compute(), nan_ok=True)


# --- ScoreHistogram against sklearn ---------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("bins", [1000, 10_000])
def test_auc_matches_sklearn_on_quantised_and_raw_scores(seed, bins):
    batches = _batches(seed, 2, hw=(24, 32))
    _, sh = _accumulate(batches, 2, bins)
    _, y_true, scores = _valid(batches)
    got = sh.compute()
    quantised = _quantised(scores, bins)
    # exactly sklearn on the scores quantised to their bins
    assert got["auc_roc"] == pytest.approx(roc_auc_score(y_true, quantised), abs=1e-9)
    assert got["auc_pr"] == pytest.approx(average_precision_score(y_true, quantised), abs=1e-9)
    # and close to sklearn on the raw scores
    assert got["auc_roc"] == pytest.approx(roc_auc_score(y_true, scores), abs=1e-3)
    assert got["auc_pr"] == pytest.approx(average_precision_score(y_true, scores), abs=1e-3)
    assert 0.5 < got["auc_roc"] < 1  # the scores carry signal


def test_auc_with_many_ties_and_scores_of_exactly_0_and_1():
    """Coarse bins: many ties in one bin; score 1.0 goes to the last bin."""
    g = torch.Generator().manual_seed(7)
    target = torch.randint(0, 2, (3, 10, 10), generator=g)
    prob = torch.randint(0, 5, (3, 10, 10), generator=g).float() / 4  # 0, .25, .5, .75, 1
    target[0, 0] = IGNORE
    sh = ScoreHistogram(bins=4)
    sh.update(prob, target)
    keep = target != IGNORE
    y, s = target[keep].numpy(), prob[keep].double().numpy()
    assert sh.hist.sum() == keep.sum()
    assert sh.hist[:, 3].sum() == ((s >= 0.75) & keep[keep].numpy()).sum()
    q = _quantised(s, 4)
    assert sh.compute()["auc_roc"] == pytest.approx(roc_auc_score(y, q), abs=1e-12)
    assert sh.compute()["auc_pr"] == pytest.approx(average_precision_score(y, q), abs=1e-12)


def test_binning_rule():
    sh = ScoreHistogram(bins=10)
    prob = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.99, 1.0, 0.5])
    target = torch.tensor([0, 0, 0, 1, 1, 1, IGNORE])
    sh.update(prob, target)
    assert sh.hist.dtype == np.int64 and sh.hist.shape == (2, 10)
    assert sh.hist[0].tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert sh.hist[1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0, 2]  # 0.99 and 1.0 share bin 9


def test_score_histogram_batch_accumulation_equals_one_update():
    batches = _batches(4, 2)
    _, acc = _accumulate(batches, 2)
    once = ScoreHistogram(1000)
    once.update(torch.cat([s for _, _, s in batches]), torch.cat([t for _, t, _ in batches]))
    assert (acc.hist == once.hist).all()
    assert acc.compute() == once.compute()


def test_summed_histograms_equal_one_histogram_over_both_halves():
    """What a DDP all-reduce (sum of `hist` over ranks) relies on."""
    batches = _batches(5, 2)
    _, rank0 = _accumulate(batches[:2], 2)
    _, rank1 = _accumulate(batches[2:], 2)
    _, whole = _accumulate(batches, 2)
    reduced = ScoreHistogram(1000)
    reduced.hist = rank0.hist + rank1.hist
    assert (reduced.hist == whole.hist).all()
    assert reduced.compute() == whole.compute()


def test_perfect_scores_give_auc_1_and_reversed_give_0():
    target = torch.tensor([[0, 1, 1, 0], [1, IGNORE, 0, 0]])
    good = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.0, 0.3, 0.05]])
    sh = ScoreHistogram()
    sh.update(good, target)
    assert sh.compute() == {"auc_roc": 1.0, "auc_pr": 1.0}
    bad = ScoreHistogram()
    bad.update(1 - good, target)
    assert bad.compute()["auc_roc"] == 0.0


def test_constant_scores_give_auc_half_and_ap_the_prevalence():
    target = torch.tensor([0, 1, 1, 0, 0, IGNORE])
    sh = ScoreHistogram()
    sh.update(torch.full((6,), 0.5), target)
    assert sh.compute()["auc_roc"] == pytest.approx(0.5)
    assert sh.compute()["auc_pr"] == pytest.approx(2 / 5)


@pytest.mark.parametrize("label", [0, 1, None])
def test_auc_is_nan_when_a_class_is_absent(label):
    sh = ScoreHistogram()
    if label is not None:
        sh.update(torch.rand(2, 4, 4), torch.full((2, 4, 4), label))
    got = sh.compute()
    assert math.isnan(got["auc_roc"]) and math.isnan(got["auc_pr"])


def test_low_precision_scores_are_accepted():
    target = torch.randint(0, 2, (2, 8, 8))
    prob = torch.rand(2, 8, 8)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        sh, ref = ScoreHistogram(100), ScoreHistogram(100)
        sh.update(prob.to(dtype), target)
        ref.update(prob.to(dtype).float(), target)
        assert (sh.hist == ref.hist).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_scores_match_cpu():
    target = torch.randint(0, 2, (2, 64, 64))
    target[0, :4] = IGNORE
    prob = torch.rand(2, 64, 64).bfloat16()
    gpu, cpu = ScoreHistogram(), ScoreHistogram()
    gpu.update(prob.cuda(), target.cuda())
    cpu.update(prob.float(), target)
    assert (gpu.hist == cpu.hist).all()


def test_large_split_is_fast():
    """~7M pixels (a few full-size images) in well under a second per update."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (4, 1200, 1460), generator=g, dtype=torch.uint8)
    prob = torch.rand(4, 1200, 1460, generator=g)
    sh = ScoreHistogram()
    start = time.perf_counter()
    sh.update(prob, target)
    sh.compute()
    assert time.perf_counter() - start < 2.0
    assert sh.hist.sum() == target.numel()


@pytest.mark.parametrize(
    ("prob", "target", "match"),
    [
        (torch.tensor([0.2, 1.5]), torch.tensor([0, 1]), r"prob value 1\.5 outside \[0, 1\]"),
        (torch.tensor([-0.1, 0.5]), torch.tensor([0, 1]), r"outside \[0, 1\]"),
        (torch.tensor([float("nan"), 0.5]), torch.tensor([0, 1]), "NaN"),
        (torch.tensor([0.2, 0.5]), torch.tensor([0, 2]), "label value 2"),
        (torch.tensor([0.2, 0.5]), torch.tensor([-1, 0]), "label value -1"),
        (torch.tensor([0.2, 0.5]), torch.tensor([[0, 1]]), "differ"),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), "floating-point"),
    ],
)
def test_bad_inputs_raise(prob, target, match):
    sh = ScoreHistogram()
    with pytest.raises(ValueError, match=match):
        sh.update(prob, target)
    assert sh.hist.sum() == 0  # nothing half-counted


def test_scores_of_ignored_pixels_are_not_looked_at():
    sh = ScoreHistogram()
    sh.update(torch.tensor([0.2, 7.0, float("nan")]), torch.tensor([0, IGNORE, IGNORE]))
    assert sh.hist.sum() == 1


def test_bins_must_be_positive():
    with pytest.raises(ValueError, match="bins"):
        ScoreHistogram(bins=0)


# --- split_metrics --------------------------------------------------------------------------


def test_split_metrics_merges_both():
    batches = _batches(6, 2)
    cm, sh = _accumulate(batches, 2)
    names = ["background", "vessel"]
    merged = split_metrics(cm, sh, names)
    assert merged == {**cm.compute(names), **sh.compute()}
    assert {"auc_roc", "auc_pr", "sensitivity", "dice_vessel"} <= set(merged)
    without = split_metrics(cm, None, names)
    assert without == cm.compute(names)
    assert "auc_roc" not in without


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
