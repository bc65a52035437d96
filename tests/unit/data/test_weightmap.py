"""The U-Net border weight map by hand and against a brute-force reference, its speed, the class
balancing weights, and the weight maps the preprocess stage writes next to the crops."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from pipeline.core.config import parse_params
from pipeline.data.weightmap import (
    EPS_REL,
    balanced_class_weights,
    border_cutoff,
    border_weight_map,
)
from pipeline.stages import preprocess as pre
from pipeline.stages.download import download

log = logging.getLogger(__name__)

CW = np.array([1.0, 3.0, 5.0], np.float32)  # w_c of background, class 1, class 2
W0, SIGMA = 10.0, 5.0


def _term(d1: float, d2: float, w0: float = W0, sigma: float = SIGMA) -> float:
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def _two_squares(gap: int, classes=(1, 1)) -> np.ndarray:
    """64x64 background with two 10x10 squares in rows 10..19, `gap` px apart: the left one
    in columns 5..14, the right one from column 15 + gap."""
    label = np.zeros((64, 64), np.uint8)
    label[10:20, 5:15] = classes[0]
    label[10:20, 15 + gap : 25 + gap] = classes[1]
    return label


# --- by hand --------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [(1, 1), (1, 2)])
def test_one_pixel_gap(classes):
    """Gap column 15: its nearest pixel of either square is 1 px away, so d1 = d2 = 1."""
    w = border_weight_map(_two_squares(1, classes), CW, W0, SIGMA)
    assert w[10:20, 15] == pytest.approx(CW[0] + _term(1, 1), rel=1e-6)


def test_two_pixel_gap():
    """Gap columns 15, 16: column 15 is 1 px from the left square (column 14) and 2 px from the
    right one (column 17), column 16 the other way round: d1 + d2 = 3 for both, not 1 + 1."""
    w = border_weight_map(_two_squares(2), CW, W0, SIGMA)
    expected = CW[0] + _term(1, 2)
    assert w[10:20, 15] == pytest.approx(expected, rel=1e-6)
    assert w[10:20, 16] == pytest.approx(expected, rel=1e-6)
    # above the gap, row 9 column 15: the corners (10, 14) and (10, 17) are sqrt 2 and sqrt 5 away
    assert w[9, 15] == pytest.approx(CW[0] + _term(math.sqrt(2), math.sqrt(5)), rel=1e-6)


def test_objects_far_background_and_ignored_pixels():
    label = _two_squares(2, (1, 2))
    label[40:64, 40:64] = 255
    w = border_weight_map(label, CW, W0, SIGMA)
    assert w.dtype == np.float32 and w.shape == label.shape
    assert (w[10:20, 5:15] == CW[1]).all()  # object pixels: their class weight only
    assert (w[10:20, 17:27] == CW[2]).all()
    assert (w[40:, 40:] == 0).all()  # ignored
    # far from both squares: the border term is below EPS_REL * w0 (here exactly 0)
    assert w[63, 0] == pytest.approx(CW[0], abs=EPS_REL * W0)
    assert w[35, 35] == CW[0]
    # the border term only ever adds to the background
    background = label == 0
    assert (w[background] >= CW[0]).all()


def test_fewer_than_two_objects_give_no_border_term():
    label = np.zeros((32, 32), np.uint8)
    assert (border_weight_map(label, CW) == CW[0]).all()
    label[10:15, 10:15] = 1
    w = border_weight_map(label, CW)
    assert (w[label == 0] == CW[0]).all() and (w[label == 1] == CW[1]).all()


def test_diagonal_neighbours_are_one_object():
    """8-connectivity: two squares touching at a corner are one object, so no border term."""
    label = np.zeros((32, 32), np.uint8)
    label[5:10, 5:10] = 1
    label[10:15, 10:15] = 1
    assert (border_weight_map(label, CW)[label == 0] == CW[0]).all()


def test_w0_zero_gives_the_class_weights_only():
    label = _two_squares(1)
    assert np.array_equal(border_weight_map(label, CW, w0=0.0), CW[label])


def test_unknown_label_values_raise():
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        border_weight_map(np.full((4, 4), 7, np.uint8), CW)


# --- against a brute-force reference --------------------------------------------------------


def _blobs(shape, count: int, rng: np.random.Generator, radii=(2, 7)) -> np.ndarray:
    """Random discs of class 1 or 2 on background, with a few ignored ones."""
    label = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(count):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(*radii)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.choice([1, 1, 2, 255])
    return label


def _reference(label: np.ndarray, cw: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """Eq. 2 with a full-image distance transform per object and no cutoff."""
    distances = []
    for c in (1, 2):
        components, n = ndimage.label(label == c, structure=np.ones((3, 3)))
        distances += [ndimage.distance_transform_edt(components != i) for i in range(1, n + 1)]
    d = np.sort(np.stack(distances), axis=0)  # (objects, H, W)
    w = np.where(label == 255, 0.0, cw[np.minimum(label, len(cw) - 1)])
    term = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return np.where(label == 0, w + term, w)


@pytest.mark.parametrize(("w0", "sigma", "seed"), [(10.0, 5.0, 0), (10.0, 2.0, 1), (3.0, 8.0, 2)])
def test_cutoff_matches_the_brute_force_map_within_eps(w0, sigma, seed):
    label = _blobs((96, 120), 30, np.random.default_rng(seed))
    ours = border_weight_map(label, CW, w0, sigma)
    ref = _reference(label, CW, w0, sigma)
    error = np.abs(ours - ref)
    assert error.max() <= EPS_REL * w0 + 1e-4
    near = ref - CW[np.where(label == 255, 0, label)] > EPS_REL * w0
    assert near.sum() > 100  # a real test: many pixels carry a border term
    assert error[near].max() < 1e-4  # where the term counts, it is exact


def test_cutoff_is_where_the_term_drops_below_eps():
    m = border_cutoff(W0, SIGMA)
    assert _term(0, m) == pytest.approx(EPS_REL * W0)


def test_a_drive_sized_label_is_fast():
    label = _blobs((584, 565), 230, np.random.default_rng(3), radii=(2, 9))
    objects = sum(ndimage.label(label == c, structure=np.ones((3, 3)))[1] for c in (1, 2))
    assert objects > 150
    started = time.perf_counter()
    border_weight_map(label, CW, W0, SIGMA)
    seconds = time.perf_counter() - started
    log.info("584x565 label, %d objects: %.3f s", objects, seconds)
    print(f"weight map of a 584x565 label with {objects} objects: {seconds:.3f} s")
    assert seconds < 20


# --- class balancing ------------------------------------------------------------------------


def test_balanced_class_weights_by_hand():
    """total 1000, 2 classes present: 1000 / (2 * 900) and 1000 / (2 * 100), scaled so the most
    frequent class gets 1: 1 and 9; the absent class 0."""
    w = balanced_class_weights([900, 100, 0])
    assert w.dtype == np.float32
    assert w.tolist() == pytest.approx([1.0, 9.0, 0.0])


def test_balanced_class_weights_need_pixels():
    with pytest.raises(ValueError):
        balanced_class_weights([0, 0])


# --- the preprocess stage -------------------------------------------------------------------

TINY = {
    "seed": 3,
    "dataset": {"num_images": 6, "image_size": 64, "val_count": 1, "test_count": 1},
    "preprocess": {"crop_size": 32, "crop_stride": 16},
}


def _preprocess(border: dict | None) -> dict:
    preprocess = {**TINY["preprocess"], **({"border_weights": border} if border else {})}
    params = parse_params({**TINY, "preprocess": preprocess})
    download(params)
    processed = pre.preprocess(params)
    return json.loads((processed / "manifest.json").read_text())


def test_preprocess_writes_a_weight_map_per_training_image(project):
    manifest = _preprocess({"enabled": True, "w0": 5.0, "sigma": 3.0})
    processed = project / "data" / "processed"
    class_weights = balanced_class_weights(manifest["train_class_pixels"])
    assert manifest["border_weights"] == {
        "w0": 5.0,
        "sigma": 3.0,
        "class_weights": pytest.approx(class_weights.tolist(), rel=1e-6),
    }
    folder = processed / "train" / "weights"
    stems = manifest["splits"]["train"]
    assert sorted(p.stem for p in folder.iterdir()) == sorted(stems)
    border_term = 0.0  # the largest weight of a background pixel beyond w_c(background)
    for stem in stems:
        weights = np.load(folder / f"{stem}.npy")
        label = np.load(processed / "train" / "labels" / f"{stem}.npy")
        assert weights.dtype == np.float16 and weights.shape == label.shape == (64, 64)
        assert np.isfinite(weights).all() and (weights >= 0).all()
        assert ((weights == 0) == (label == 255)).all()  # 0 exactly where ignored
        expected = border_weight_map(label, class_weights, 5.0, 3.0)
        assert np.allclose(weights, expected, rtol=1e-3, atol=1e-3)
        background = weights[label == 0].astype(np.float32) - class_weights[0]
        border_term = max(border_term, float(background.max(initial=0)))
    assert border_term > 1.0  # gaps between vessel branches do get the border term


def test_weight_patches_are_windows_of_the_images_map(project):
    from pipeline.data.loading import train_dataset
    from pipeline.data.manifest import load_manifest

    _preprocess({"enabled": True, "w0": 5.0, "sigma": 3.0})
    params = parse_params(TINY)
    patches = train_dataset(load_manifest(), params)
    image, label, weights = patches[0]
    assert weights.shape == label.shape == (32, 32) and weights.dtype == torch.float32
    assert ((weights == 0) == (label == 255)).all()


def test_preprocess_without_border_weights_writes_none(project):
    manifest = _preprocess(None)
    assert manifest["border_weights"] is None
    assert not (project / "data" / "processed" / "train" / "weights").exists()
