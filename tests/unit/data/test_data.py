"""Synthetic data, the preprocessing helpers, and the download + preprocess stages end to end in a
temporary project (tiny sizes, no DVC)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.common import PipelineError
from pipeline.core.config import IGNORE_INDEX, Params, parse_params
from pipeline.data import loading as data
from pipeline.data.crops import crop_origins, pad_to_size
from pipeline.data.manifest import load_manifest
from pipeline.data.prepare import save_example
from pipeline.data.sources import merge_vessel_label, read_image, split_stems
from pipeline.data.synthetic import generate
from pipeline.stages import preprocess as pre
from pipeline.stages.download import download

TINY = {
    "seed": 3,
    "dataset": {"num_images": 6, "image_size": 64, "val_count": 1, "test_count": 1, "seed": 3},
    "preprocess": {"crop_size": 32, "crop_stride": 32},
}


# --- synthetic data -------------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed():
    a, b = generate(7, 3, 64), generate(7, 3, 64)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image)
        assert np.array_equal(x.vessels, y.vessels)
        assert np.array_equal(x.fov, y.fov)


def test_generation_differs_between_seeds():
    a, b = generate(1, 2, 64), generate(2, 2, 64)
    for x, y in zip(a, b, strict=True):
        assert not np.array_equal(x.image, y.image)
        assert not np.array_equal(x.vessels, y.vessels)


def test_samples_within_a_dataset_differ():
    a, b = generate(1, 2, 64)
    assert not np.array_equal(a.vessels, b.vessels)


def test_more_images_keep_the_first_ones():
    """Each sample has its own child seed, so num_images does not change earlier samples."""
    few, many = generate(5, 2, 48), generate(5, 4, 48)
    for x, y in zip(few, many[:2], strict=True):
        assert np.array_equal(x.image, y.image)


@pytest.mark.parametrize("size", [48, 64])
def test_sample_shapes_and_dtypes(size):
    (s,) = generate(0, 1, size)
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.vessels.shape == (size, size) and s.vessels.dtype == np.uint8
    assert s.fov.shape == (size, size) and s.fov.dtype == np.uint8
    assert set(np.unique(s.vessels)) <= {0, 255}
    assert set(np.unique(s.fov)) == {0, 255}


def test_vessel_fraction_inside_the_fov_is_plausible():
    for s in generate(11, 8, 64):
        inside = s.fov > 0
        fraction = (s.vessels[inside] > 0).mean()
        assert 0.03 <= fraction <= 0.30


def test_vessels_lie_inside_the_fov():
    for s in generate(11, 4, 64):
        assert not ((s.vessels > 0) & (s.fov == 0)).any()


def test_fov_is_a_centred_disc():
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    for s in generate(4, 4, size):
        inside = s.fov > 0
        # corners are outside, the centre is inside
        for y, x in itertools.product((0, size - 1), repeat=2):
            assert not inside[y, x]
        assert inside[size // 2, size // 2]
        # radius 0.43..0.48 of the size, centre close to the image centre
        cy, cx = yy[inside].mean(), xx[inside].mean()
        r = np.hypot(yy - cy, xx - cx)
        assert abs(cy - (size - 1) / 2) < 3 and abs(cx - (size - 1) / 2) < 3
        assert inside[r < 0.40 * size].all()
        assert not inside[r > 0.52 * size].any()
        assert 0.40 * size < np.sqrt(inside.sum() / np.pi) < 0.50 * size


def test_outside_the_fov_is_nearly_black():
    (s,) = generate(2, 1, 64)
    assert s.image[s.fov == 0].max() <= 8
    assert s.image[s.fov > 0].mean() > 30


# --- labels, splits, crops ------------------------------------------------------------------


def test_merge_vessel_label_by_hand():
    manual = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    fov = np.array([[255, 255, 0], [0, 255, 255]], np.uint8)
    expected = np.array([[0, 1, 255], [255, 0, 1]], np.uint8)
    label = merge_vessel_label(manual, fov)
    assert label.dtype == np.uint8
    assert np.array_equal(label, expected)


def test_merge_vessel_label_on_a_synthetic_sample():
    (s,) = generate(9, 1, 64)
    label = merge_vessel_label(s.vessels, s.fov)
    assert set(np.unique(label)) == {0, 1, 255}
    assert np.array_equal(label == IGNORE_INDEX, s.fov == 0)
    assert np.array_equal(label == 1, (s.vessels > 0) & (s.fov > 0))


STEMS = [f"{i:03d}" for i in range(12)]


def test_split_stems_is_seeded():
    assert split_stems(STEMS, 2, 3, seed=0) == split_stems(STEMS, 2, 3, seed=0)
    assert split_stems(STEMS, 2, 3, seed=0) != split_stems(STEMS, 2, 3, seed=1)


def test_split_stems_is_disjoint_and_covers_all():
    splits = split_stems(STEMS, 2, 3, seed=0)
    assert set(splits) == {"train", "val", "test"}
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (7, 2, 3)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == STEMS
    for stems in splits.values():
        assert stems == sorted(stems)


@pytest.mark.parametrize(
    ("length", "size", "stride", "expected"),
    [
        (64, 32, 32, [0, 32]),
        (64, 32, 16, [0, 16, 32]),
        (70, 32, 32, [0, 32, 38]),  # one more window, flush with the far border
        (33, 32, 32, [0, 1]),
        (32, 32, 16, [0]),
        (20, 32, 16, [0]),  # shorter than a crop: one (padded) window
    ],
)
def test_crop_origins(length, size, stride, expected):
    assert crop_origins(length, size, stride) == expected


def test_crop_origins_cover_every_pixel_and_stay_inside():
    for length, size, stride in itertools.product(range(16, 80, 7), (16, 32), (8, 16, 32)):
        if stride > size or length < size:
            continue
        starts = crop_origins(length, size, stride)
        assert starts == sorted(set(starts))
        assert starts[0] == 0 and starts[-1] == length - size
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + size] = True
        assert covered.all()


def test_pad_to_size_mirrors_images_and_fills_labels():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    label = rng.integers(0, 2, (20, 24), dtype=np.uint8)
    img_p, lab_p = pad_to_size(image, 32), pad_to_size(label, 32, IGNORE_INDEX)
    assert img_p.shape == (32, 32, 3) and lab_p.shape == (32, 32)
    assert np.array_equal(img_p[:20, :24], image) and np.array_equal(lab_p[:20, :24], label)
    assert (lab_p[20:] == IGNORE_INDEX).all() and (lab_p[:, 24:] == IGNORE_INDEX).all()
    # the image is mirror-padded, not zero-padded
    assert np.array_equal(img_p[20, :24], image[18])
    assert np.array_equal(img_p[:20, 24], image[:, 22])
    assert pad_to_size(image, 16) is image  # large enough: untouched


# --- reading images -------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_read_image_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    path = _png(tmp_path / "a.png", rgb)
    assert np.array_equal(read_image(path, "RGB"), rgb)
    gray = read_image(path, "L")
    assert gray.shape == (10, 12) and gray.dtype == np.uint8
    gray[0, 0] = 1  # a writable copy


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_read_image_on_a_corrupt_png_names_the_file(tmp_path, damage):
    path = _png(tmp_path / "img.png", np.full((64, 64, 3), 128, np.uint8))
    raw = path.read_bytes()
    path.write_bytes(
        {"truncate": raw[: len(raw) // 2], "garbage": b"not a png at all", "empty": b""}[damage]
    )
    with pytest.raises(PipelineError) as info:
        read_image(path, "RGB")
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)
    assert "\n" not in str(info.value)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="file not found"):
        read_image(tmp_path / "missing.png", "L")


# --- the download and preprocess stages in a temporary project ------------------------------


@pytest.fixture
def tiny() -> Params:
    return parse_params(TINY)


def _read_manifest(root: Path) -> dict:
    return json.loads((root / "data" / "processed" / "manifest.json").read_text())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_download_writes_the_drive_layout(project, tiny):
    target = download(tiny)
    raw = project / "data" / "raw" / "synthetic"
    assert target == raw
    stems = [f"{i:03d}" for i in range(6)]
    for sub in ("images", "manual", "mask"):
        assert sorted(p.stem for p in (raw / sub).glob("*.png")) == stems
    source = json.loads((raw / "source.json").read_text())
    assert source == {"dataset": "synthetic", "seed": 3, "num_images": 6, "size": 64, "files": 18}
    image = read_image(raw / "images" / "000.png", "RGB")
    assert image.shape == (64, 64, 3)
    assert set(np.unique(read_image(raw / "manual" / "000.png", "L"))) <= {0, 255}
    assert sorted(p.name for p in (project / "data" / "raw").iterdir()) == ["synthetic"]


def test_download_is_reproducible(project, tiny):
    raw = project / "data" / "raw" / "synthetic"
    download(tiny)
    first = _snapshot(raw)
    download(tiny)
    assert _snapshot(raw) == first


def test_preprocess_writes_split_arrays_and_manifest(project, tiny):
    download(tiny)
    target = pre.preprocess(tiny)
    processed = project / "data" / "processed"
    assert target == processed
    manifest = _read_manifest(project)
    assert set(manifest) == {
        "dataset",
        "num_classes",
        "class_names",
        "in_channels",
        "ignore_index",
        "mean",
        "std",
        "train_class_pixels",
        "border_weights",
        "splits",
        "second_observer",
        "positive_class",
        "clahe",
        "scale",
        "bit_depth",
    }
    assert manifest["scale"] == 1.0  # preprocess.scale: the images as they are
    assert manifest["num_classes"] == 2 and manifest["class_names"] == ["background", "vessel"]
    assert manifest["in_channels"] == 3 and manifest["ignore_index"] == 255

    splits = manifest["splits"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 1, "test": 1}
    assert sorted(sum(splits.values(), [])) == [f"{i:03d}" for i in range(6)]
    for split, stems in splits.items():
        kinds = ["images", "labels"] + (["locations"] if split == "train" else [])
        assert sorted(p.name for p in (processed / split).iterdir()) == kinds
        for kind in kinds:
            assert sorted(p.name for p in (processed / split / kind).iterdir()) == [
                f"{s}.npy" for s in stems
            ]
        for stem in stems:
            image = np.load(processed / split / "images" / f"{stem}.npy", mmap_mode="r")
            label = np.load(processed / split / "labels" / f"{stem}.npy")
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            assert label.shape == (64, 64) and label.dtype == np.uint8
            assert set(np.unique(label)) <= {0, 1, 255}
            assert {0, 1, 255} <= set(np.unique(label))  # background, vessels and outside FOV
    for stem in splits["train"]:  # where forced patches centre: pixels of each class
        label = np.load(processed / "train" / "labels" / f"{stem}.npy")
        rows = np.load(processed / "train" / "locations" / f"{stem}.npy")
        assert rows.ndim == 2 and rows.shape[1] == 3 and len(rows)
        assert (label[rows[:, 1], rows[:, 2]] == rows[:, 0]).all()
        assert set(rows[:, 0]) == {0, 1}

    assert len(manifest["mean"]) == 3 and len(manifest["std"]) == 3
    assert all(0 < m < 1 for m in manifest["mean"]) and all(s > 0 for s in manifest["std"])
    labels = [np.load(processed / "train" / "labels" / f"{s}.npy") for s in splits["train"]]
    expected_counts = [sum(int((lab == c).sum()) for lab in labels) for c in (0, 1)]
    assert manifest["train_class_pixels"] == expected_counts

    assert sorted(p.name for p in (project / "data").iterdir()) == ["processed", "raw"]


def test_preprocess_outputs_do_not_depend_on_the_workers(project, tiny):
    download(tiny)
    snapshots = []
    for workers in (1, 2):
        params = tiny.model_copy(
            update={"preprocess": tiny.preprocess.model_copy(update={"workers": workers})}
        )
        pre.preprocess(params)
        snapshots.append(_snapshot(project / "data" / "processed"))
    assert snapshots[0] == snapshots[1]


def test_processed_labels_merge_the_raw_tracing_and_mask(project, tiny):
    download(tiny)
    pre.preprocess(tiny)
    raw = project / "data" / "raw" / "synthetic"
    stem = _read_manifest(project)["splits"]["test"][0]
    label = np.load(project / "data" / "processed" / "test" / "labels" / f"{stem}.npy")
    manual = read_image(raw / "manual" / f"{stem}.png", "L")
    fov = read_image(raw / "mask" / f"{stem}.png", "L")
    assert np.array_equal(label, merge_vessel_label(manual, fov))


def test_the_served_models_example_is_the_first_raw_test_image(project, tiny):
    download(tiny)
    pre.preprocess(tiny)
    stem = _read_manifest(project)["splits"]["test"][0]
    raw = read_image(project / "data" / "raw" / "synthetic" / "images" / f"{stem}.png", "RGB")
    example = read_image(project / "data" / "processed" / "example.png", "RGB")
    assert np.array_equal(example, raw)  # untouched: what a user would send


def test_the_example_is_cut_to_its_central_512_px(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (600, 700, 3), np.uint8)
    save_example(tmp_path / "example.png", image)
    assert np.array_equal(read_image(tmp_path / "example.png", "RGB"), image[44:556, 94:606])


def test_datasets_read_the_processed_data(project, tiny):
    download(tiny)
    pre.preprocess(tiny)
    manifest = load_manifest()
    patches = data.train_dataset(manifest, tiny)
    assert len(patches) == 4 * 4  # 0 patches per epoch: the 32 px grid's 4 windows x 4 images
    image, label = patches[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.shape == (32, 32) and label.dtype == torch.int64
    test = data.split_dataset(manifest, "test")
    assert test.shape(0) == (64, 64)
    image, label = test[0]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64)
    assert set(label.unique().tolist()) <= {0, 1, 255}


def test_preprocess_needs_enough_raw_images(project, tiny):
    download(tiny)  # 6 images
    dataset = {**TINY["dataset"], "num_images": 9, "val_count": 3, "test_count": 3}
    more = parse_params({**TINY, "dataset": dataset})  # needs 3 + 3 + 1 images
    with pytest.raises(PipelineError, match="6 images"):
        pre.preprocess(more)


def test_preprocess_without_raw_data_says_run_download(project, tiny):
    with pytest.raises(PipelineError, match="download"):
        pre.preprocess(tiny)


def _assert_previous_output_kept(project: Path, before: dict[str, bytes]) -> None:
    processed = project / "data" / "processed"
    assert _snapshot(processed) == before
    leftovers = [p.name for p in (project / "data").iterdir() if p.name not in {"raw", "processed"}]
    assert leftovers == [], "temporary folders left behind"


def test_failed_preprocess_on_a_corrupt_image_keeps_the_previous_output(project, tiny):
    download(tiny)
    pre.preprocess(tiny)
    before = _snapshot(project / "data" / "processed")

    bad = project / "data" / "raw" / "synthetic" / "images" / "002.png"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(PipelineError) as info:
        pre.preprocess(tiny)
    assert str(bad) in str(info.value)
    _assert_previous_output_kept(project, before)


def test_the_run_seed_keeps_the_data_and_dataset_seed_changes_it(project, tiny):
    """Runs over `seed` are scored on the same images; `dataset.seed` is what the data is."""
    download(tiny)
    pre.preprocess(tiny)
    raw, manifest = _snapshot(project / "data" / "raw"), _read_manifest(project)
    other_run = parse_params({**TINY, "seed": 4})
    download(other_run)
    pre.preprocess(other_run)
    assert _snapshot(project / "data" / "raw") == raw
    assert _read_manifest(project)["splits"] == manifest["splits"]
    other_data = parse_params({**TINY, "dataset": {**TINY["dataset"], "seed": 4}})
    download(other_data)
    pre.preprocess(other_data)
    assert _snapshot(project / "data" / "raw") != raw
    assert _read_manifest(project)["splits"] != manifest["splits"]


def test_preprocess_failing_while_writing_keeps_the_previous_output(project, tiny, monkeypatch):
    """A failure after the new output is half written (here: writing the manifest) must not
    replace or damage the previous data/processed, nor leave the temporary folder behind."""
    download(tiny)
    pre.preprocess(tiny)
    before = _snapshot(project / "data" / "processed")

    def broken_write_manifest(folder, manifest):
        raise OSError("disk full")

    monkeypatch.setattr(pre, "write_manifest", broken_write_manifest)
    with pytest.raises(OSError, match="disk full"):
        pre.preprocess(parse_params({**TINY, "seed": 4}))
    _assert_previous_output_kept(project, before)
