"""Augmentation policies of the training patches (train.augment)."""

import numpy as np
import pytest

from pipeline.core.common import PipelineError
from pipeline.core.config import TrainParams
from pipeline.data.loading import transforms
from tests.fakes import fake_manifest

CROP = 32


def _scene():
    """A street-like crop: sky (class 0) in the top half, road (class 1) below, one ignored
    (255) pixel in the road; the image's brightness encodes the class."""
    label = np.zeros((CROP, CROP), np.uint8)
    label[CROP // 2 :] = 1
    label[-1, 5] = 255
    image = np.where(label[..., None] == 0, 200, 60).astype(np.uint8).repeat(3, axis=2)
    return image, label


def _apply(policy: str, seed: int):
    image, label = _scene()
    out = transforms(fake_manifest(), policy, CROP, seed)(image=image, mask=label)
    return out["image"], out["mask"]


def test_scene_keeps_the_up_of_a_photograph_and_the_label_values():
    for seed in range(40):
        image, label = _apply("scene", seed)
        assert image.shape == (CROP, CROP, 3) and label.shape == (CROP, CROP)
        # nearest-neighbour labels: no blended values, the ignore value survives as itself
        assert set(np.unique(label)) <= {0, 1, 255}
        # a zoom may show only sky or only road, but sky never ends up below road
        rows_sky = np.flatnonzero((label == 0).any(axis=1))
        rows_road = np.flatnonzero((label == 1).any(axis=1))
        if rows_sky.size and rows_road.size:
            assert rows_sky.max() < rows_road.min()


def test_scene_zooms_and_jitters_brightness_on_some_crops():
    zoomed = jittered = 0
    reference, _ = _apply("none", 0)
    for seed in range(40):
        image, label = _apply("scene", seed)
        zoomed += int((label == 0).sum() != (CROP // 2) * CROP)
        # the sky's normalised value moves only when brightness/contrast was jittered
        jittered += int(not np.isclose(image[0, 0, 0], reference[0, 0, 0], atol=1e-3))
    assert 5 <= zoomed <= 35 and 5 <= jittered <= 35


def test_dihedral_turns_the_scene_upside_down_on_some_crops():
    upside_down = sum(int(_apply("dihedral", seed)[1][0, CROP // 2] == 1) for seed in range(40))
    assert upside_down > 5


def test_none_only_normalises():
    image, label = _apply("none", 0)
    source, truth = _scene()
    np.testing.assert_array_equal(label, truth)
    np.testing.assert_allclose(image, (source / 255.0 - 0.5) / 0.25, atol=1e-5)


def test_the_same_seed_gives_the_same_crop():
    a, b = _apply("scene", 7), _apply("scene", 7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_params_written_as_booleans_keep_their_meaning():
    assert TrainParams(augment=True).augment == "dihedral"
    assert TrainParams(augment=False).augment == "none"
    with pytest.raises(ValueError, match="augment"):
        TrainParams(augment="mirror")


def test_an_unknown_policy_names_the_param():
    with pytest.raises(PipelineError, match="train.augment"):
        transforms(fake_manifest(), "mirror", CROP)
