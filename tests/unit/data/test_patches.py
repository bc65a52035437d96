"""Training patches sampled from the stored full-size arrays (pipeline/data/loading.py): what
a patch holds, that it depends on (seed, epoch, index) alone, the foreground share, windows in
the ignore region, grid sampling, padding and the memory map."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from pipeline.core import paths
from pipeline.core.common import PipelineError
from pipeline.core.config import IGNORE_INDEX
from pipeline.data.loading import EpochSampler, PatchDataset
from pipeline.data.store import array_path, class_locations, open_array, save_array

SIZE = 16


def _store(stem: str, image: np.ndarray, label: np.ndarray, weights=None) -> None:
    save_array(paths.split_dir("train", "images"), stem, image)
    save_array(paths.split_dir("train", "labels"), stem, label)
    save_array(paths.split_dir("train", "locations"), stem, class_locations(label, 2, stem))
    if weights is not None:
        save_array(paths.split_dir("train", "weights"), stem, weights)


def _identity() -> A.Compose:
    """No augmentation, no normalisation: a patch shows the stored pixels as they are."""
    return A.Compose([], strict=True, additional_targets={"weight": "mask"})


@pytest.fixture
def coded(project):
    """Two 48x64 images whose pixel values encode their position (y, x, image), with a
    3x3 foreground blob in a corner of each."""
    stems = []
    for j in range(2):
        yy, xx = np.mgrid[0:48, 0:64]
        image = np.stack([yy, xx, np.full_like(yy, j)], axis=2).astype(np.uint8)
        label = np.zeros((48, 64), np.uint8)
        label[40:43, 2:5] = 1
        _store(f"im{j}", image, label)
        stems.append(f"im{j}")
    return stems


def _origin(image) -> tuple[int, int, int]:
    """(image index, y, x) of a patch cut from `coded`, read off its pixels."""
    return int(image[2, 0, 0]), int(image[0, 0, 0]), int(image[1, 0, 0])


def test_a_patch_is_the_window_of_its_image_and_label(coded):
    ds = PatchDataset(coded, _identity(), SIZE, per_epoch=10, seed=1)
    for k in range(10):
        image, label = ds[k]
        assert image.shape == (3, SIZE, SIZE) and label.shape == (SIZE, SIZE)
        j, y, x = _origin(image)
        assert j == k % 2  # the images take turns
        yy, xx = np.mgrid[y : y + SIZE, x : x + SIZE]
        assert (image[0].numpy() == yy).all() and (image[1].numpy() == xx).all()
        truth = np.load(array_path("train", "labels", coded[j]))[y : y + SIZE, x : x + SIZE]
        assert (label.numpy() == truth).all()


def test_patches_depend_on_seed_epoch_and_index_alone(coded):
    ds = PatchDataset(coded, _identity(), SIZE, per_epoch=8, seed=1)
    again = PatchDataset(coded, _identity(), SIZE, per_epoch=8, seed=1)
    keys = [3, 0, 12, 7, 5]  # any order, any process: the same patches
    first = [_origin(ds[k][0]) for k in keys]
    assert [_origin(again[k][0]) for k in reversed(keys)] == first[::-1]
    # a new epoch draws new windows (patch k of epoch 1 is index 8 + k)
    epoch0 = [_origin(ds[k][0]) for k in range(8)]
    epoch1 = [_origin(ds[8 + k][0]) for k in range(8)]
    assert epoch0 != epoch1
    other = PatchDataset(coded, _identity(), SIZE, per_epoch=8, seed=2)
    assert [_origin(other[k][0]) for k in range(8)] != epoch0


def test_the_foreground_share_centres_patches_on_the_positive_class(coded):
    def hits(share: float, n: int = 600) -> int:
        ds = PatchDataset(coded, _identity(), SIZE, per_epoch=n, foreground=share, seed=0)
        return sum(int((ds[k][1] == 1).any()) for k in range(n))

    assert hits(1.0, 100) == 100  # every patch holds foreground
    # a random window holds the corner blob in 6 x 5 of its 33 x 49 positions (1.9%)
    assert hits(0.0) < 25
    assert 160 < hits(0.33) < 250  # 0.33 + 0.67 x 0.019: ~206 of 600 (sd 12)


def test_multi_class_patches_centre_on_a_class_the_image_holds(project):
    label = np.zeros((64, 64), np.uint8)
    label[60:, 60:] = 2  # a rare class in the corner: 16 of 4,096 pixels
    image = np.zeros((64, 64, 1), np.uint8)
    save_array(paths.split_dir("train", "images"), "a", image)
    save_array(paths.split_dir("train", "labels"), "a", label)
    save_array(paths.split_dir("train", "locations"), "a", class_locations(label, 3, "a"))
    ds = PatchDataset(["a"], _identity(), SIZE, per_epoch=100, foreground=1.0, binary=False)
    rare = sum(int((ds[k][1] == 2).any()) for k in range(100))
    assert 35 < rare < 65  # half of the forced patches: classes 0 and 2 alike


def test_windows_entirely_in_the_ignore_region_are_redrawn(project):
    label = np.full((64, 64), IGNORE_INDEX, np.uint8)
    label[:20, :20] = 0  # labelled only in one corner
    _store("a", np.zeros((64, 64, 3), np.uint8), label)
    ds = PatchDataset(["a"], _identity(), SIZE, per_epoch=50, seed=0)
    assert all((ds[k][1] != IGNORE_INDEX).any() for k in range(50))


def test_grid_sampling_takes_the_same_windows_every_epoch(coded):
    ds = PatchDataset(coded, _identity(), SIZE, sampling="grid", stride=16, seed=0)
    assert len(ds) == 2 * 3 * 4  # 48 x 64 px in 16 px windows, two images
    first = sorted(_origin(ds[k][0]) for k in range(len(ds)))
    assert sorted(_origin(ds[len(ds) + k][0]) for k in range(len(ds))) == first
    assert first[:2] == [(0, 0, 0), (0, 0, 16)]


def test_grid_sampling_leaves_out_windows_with_only_ignored_pixels(project):
    label = np.zeros((32, 32), np.uint8)
    label[:16, :16] = IGNORE_INDEX
    _store("a", np.zeros((32, 32, 3), np.uint8), label)
    ds = PatchDataset(["a"], _identity(), SIZE, sampling="grid", stride=16)
    assert ds.windows == [(0, 0, 16), (0, 16, 0), (0, 16, 16)]


def test_the_patch_count_defaults_to_the_grids(coded):
    assert len(PatchDataset(coded, _identity(), SIZE, stride=8)) == 2 * 5 * 7
    assert len(PatchDataset(coded, _identity(), SIZE, per_epoch=33)) == 33


def test_images_smaller_than_a_patch_are_mirror_padded_and_the_padding_ignored(project):
    image = np.random.default_rng(0).integers(0, 256, (10, 12, 3), np.uint8)
    weights = np.ones((10, 12), np.float16)
    _store("a", image, np.ones((10, 12), np.uint8), weights)
    ds = PatchDataset(["a"], _identity(), SIZE, per_epoch=3, weights=True)
    img, label, w = ds[0]
    assert img.shape == (3, SIZE, SIZE)
    assert (img.numpy().transpose(1, 2, 0)[:10, :12] == image).all()
    assert (img.numpy().transpose(1, 2, 0)[10, :12] == image[8]).all()  # mirrored
    assert (label[:10, :12] == 1).all() and (label[10:] == IGNORE_INDEX).all()
    assert (w[:10, :12] == 1).all() and (w[10:] == 0).all()


def test_patches_are_read_through_the_memory_map(coded):
    array = open_array(array_path("train", "images", coded[0]))
    assert isinstance(array, np.memmap) and not array.flags.writeable


def test_an_unreadable_array_is_one_line_naming_it(coded):
    path = array_path("train", "images", coded[1])
    path.write_bytes(b"not an array")
    with pytest.raises(PipelineError, match=r"im1\.npy: unreadable .*dvc repro -f preprocess"):
        PatchDataset(coded, _identity(), SIZE)


def test_ddp_ranks_together_take_the_single_process_patches(coded):
    ds = PatchDataset(coded, _identity(), SIZE, per_epoch=12, seed=4)
    single = EpochSampler(len(ds), seed=4)
    ranks = [EpochSampler(len(ds), seed=4, rank=r, world=2) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(1)
    whole = sorted(_origin(ds[k][0]) for k in single)
    split = sorted(_origin(ds[k][0]) for r in ranks for k in r)
    assert whole == split


def test_a_split_dataset_reads_an_image_only_when_asked(project):
    from pipeline.data.loading import SplitDataset

    label = np.zeros((20, 30), np.uint8)
    save_array(paths.split_dir("val", "images"), "a", np.full((20, 30, 3), 7, np.uint8))
    save_array(paths.split_dir("val", "labels"), "a", label)
    ds = SplitDataset("val", ["a", "missing"], _identity())  # nothing is opened yet
    assert len(ds) == 2 and ds.shape(0) == (20, 30)
    image, truth = ds[0]
    assert image.shape == (3, 20, 30) and (image == 7).all() and truth.shape == (20, 30)
    with pytest.raises(PipelineError, match=r"missing\.npy: unreadable"):
        ds[1]


def test_open_maps_are_reused_bounded_and_left_out_of_pickles(coded, monkeypatch):
    import pickle

    monkeypatch.setattr(PatchDataset, "MAPS", 3)
    ds = PatchDataset(coded, _identity(), SIZE, per_epoch=20, seed=0)
    first = [_origin(ds[k][0]) for k in range(20)]
    assert 0 < len(ds._maps) <= 3
    clone = pickle.loads(pickle.dumps(ds))  # what a loader worker gets
    assert clone._maps == {} and [_origin(clone[k][0]) for k in range(20)] == first
