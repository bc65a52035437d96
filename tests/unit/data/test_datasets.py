"""Real dataset layouts (DRIVE, CamVid, a folder of your own) through download + preprocess, on
tiny fakes built in the test, and every kind of bad input naming its culprit."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.common import PipelineError
from pipeline.core.config import parse_params
from pipeline.data import loading as data
from pipeline.data.manifest import load_manifest
from pipeline.data.sources import CAMVID_CLASSES, map_labels, read_image, read_label
from pipeline.engine.distributed import SINGLE
from pipeline.inference.evaluate import eval_shard
from pipeline.stages.download import download
from pipeline.stages.preprocess import preprocess
from tests.fakes import (
    SIZE,
    fov_mask,
    make_camvid,
    make_drive,
    make_folder,
    random_image,
    save_image,
    zip_dir,
)


def params(name: str, source: Path, **dataset):
    folder = dataset.pop("folder", {})
    return parse_params(
        {
            "seed": 1,
            "dataset": {"name": name, "source": str(source), "val_count": 1, **dataset}
            | ({"folder": folder} if folder else {}),
            "preprocess": {"crop_size": 32, "crop_stride": 16},
        }
    )


def run(p) -> dict:
    download(p)
    processed = preprocess(p)
    return json.loads((processed / "manifest.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def png(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def npy(path: Path) -> np.ndarray:
    """A processed array (pipeline/data/store.py)."""
    return np.load(path)


# --- DRIVE -----------------------------------------------------------------------------------


def test_drive_from_its_zip(project, tmp_path):
    archive = zip_dir(make_drive(tmp_path / "src"), tmp_path / "DRIVE.zip")
    manifest = run(params("drive", archive))
    processed = project / "data" / "processed"
    assert manifest["class_names"] == ["background", "vessel"] and manifest["in_channels"] == 3
    assert {k: len(v) for k, v in manifest["splits"].items()} == {"train": 4, "val": 1, "test": 3}
    assert manifest["splits"]["test"] == ["01_test", "02_test", "03_test"]
    raw = project / "data" / "raw" / "drive"
    for stem in manifest["splits"]["test"]:
        n = stem[:2]
        label = npy(processed / "test" / "labels" / f"{stem}.npy")
        fov = png(raw / "test" / "mask" / f"{n}_test_mask.gif")
        manual = np.array(Image.open(raw / "test" / "1st_manual" / f"{n}_manual1.gif").convert("L"))
        assert set(np.unique(label)) <= {0, 1, 255}
        assert np.array_equal(label == 255, fov == 0)  # ignored exactly outside the FOV
        assert np.array_equal(label == 1, (manual > 127) & (fov > 0))
        second = npy(processed / "test" / "second" / f"{stem}.npy")
        assert np.array_equal(second == 255, fov == 0)
    assert not (processed / "train" / "second").exists()
    observer = manifest["second_observer"]
    assert 0 < observer["dice"] < 1 and 0 < observer["global_accuracy"] < 1


def test_drive_validation_images_are_drawn_from_training_by_seed(project, tmp_path):
    archive = zip_dir(make_drive(tmp_path / "src", train=8), tmp_path / "DRIVE.zip")
    a = run(params("drive", archive, val_count=3))["splits"]
    b = run(params("drive", archive, val_count=3))["splits"]
    assert a == b and len(a["val"]) == 3 and not set(a["val"]) & set(a["train"])
    assert all(s.endswith("_training") for s in a["train"] + a["val"])


def test_drive_image_without_its_tracing_is_named(project, tmp_path):
    top = make_drive(tmp_path / "src")
    (top / "training" / "1st_manual" / "22_manual1.gif").unlink()
    download(params("drive", top))
    with pytest.raises(PipelineError, match=r"22_training\.tif: no label for this image") as err:
        preprocess(params("drive", top))
    # the file to fix is the original, not data/raw's copy of it
    original = top / "training" / "images" / "22_training.tif"
    assert str(err.value).endswith(f"(the copy of {original})"), str(err.value)
    archive = zip_dir(top, tmp_path / "DRIVE.zip")
    download(params("drive", archive))
    with pytest.raises(PipelineError) as err:
        preprocess(params("drive", archive))
    inside = f"{top.name}/training/images/22_training.tif inside {archive})"
    assert str(err.value).endswith(f"(the copy of {inside}"), str(err.value)


# --- CamVid ----------------------------------------------------------------------------------


def test_camvid_pairs_by_stem_and_maps_void_to_ignore(project, tmp_path):
    top = make_camvid(tmp_path / "src")
    manifest = run(params("camvid", zip_dir(top, tmp_path / "CamVid.zip")))
    assert manifest["class_names"] == CAMVID_CLASSES and manifest["num_classes"] == 11
    assert {k: len(v) for k, v in manifest["splits"].items()} == {"train": 4, "val": 2, "test": 2}
    processed = project / "data" / "processed"
    for split, stems in manifest["splits"].items():
        for stem in stems:
            raw = png(top / f"{split}annot" / f"{stem}.png")
            label = npy(processed / split / "labels" / f"{stem}.npy")
            assert np.array_equal(label == 255, raw == 11)
            assert np.array_equal(label[raw != 11], raw[raw != 11])
            assert npy(processed / split / "images" / f"{stem}.npy").shape == (*SIZE, 3)


def test_class_histogram_is_written_with_the_processed_data(project, tmp_path):
    top = make_camvid(tmp_path / "src")
    manifest = run(params("camvid", top))
    with open(project / "data" / "processed" / "class_pixels.csv") as f:
        rows = list(csv.DictReader(f))
    for split, stems in manifest["splits"].items():
        raw = np.concatenate([png(top / f"{split}annot" / f"{s}.png").ravel() for s in stems])
        mine = {int(r["class_index"]): int(r["pixels"]) for r in rows if r["split"] == split}
        assert mine == {
            **{c: int((raw == c).sum()) for c in range(11)},
            255: int((raw == 11).sum()),
        }
        names = [r["class_name"] for r in rows if r["split"] == split]
        assert names == [*CAMVID_CLASSES, "ignore"]
    train = {int(r["class_index"]): int(r["pixels"]) for r in rows if r["split"] == "train"}
    assert manifest["train_class_pixels"] == [train[c] for c in range(11)]


def test_camvid_label_value_outside_its_classes_is_named(project, tmp_path):
    top = make_camvid(tmp_path / "src")
    bad = top / "valannot" / "0001TP_val_001.png"
    save_image(bad, np.full(SIZE, 12, np.uint8))
    download(params("camvid", top))
    with pytest.raises(PipelineError, match=r"0001TP_val_001\.png: label value 12 is not in"):
        preprocess(params("camvid", top))


def test_camvid_empty_split_is_named(project, tmp_path):
    top = make_camvid(tmp_path / "src")
    for p in (top / "test").iterdir():
        p.unlink()
    download(params("camvid", top))
    with pytest.raises(PipelineError, match=r"camvid/test: no images \(empty split\)"):
        preprocess(params("camvid", top))


# --- a folder of your own ----------------------------------------------------------------------


def test_folder_with_mapping_fractions_and_ignore_masks(project, tmp_path):
    top = make_folder(tmp_path / "src", count=10, masks=True)
    p = params(
        "folder",
        top,
        folder={"masks": "masks", "class_names": ["bg", "cell"], "mapping": {0: 0, 255: 1}},
    )
    manifest = run(p)
    assert {k: len(v) for k, v in manifest["splits"].items()} == {"train": 7, "val": 1, "test": 2}
    assert manifest["class_names"] == ["bg", "cell"] and manifest["num_classes"] == 2
    processed = project / "data" / "processed"
    stem = manifest["splits"]["val"][0]
    label = npy(processed / "val" / "labels" / f"{stem}.npy")
    raw = png(top / "labels" / f"{stem}.png")
    assert np.array_equal(label == 255, fov_mask() == 0)
    assert np.array_equal(label[fov_mask() > 0], (raw[fov_mask() > 0] == 255).astype(np.uint8))


def test_folder_split_folders_and_grayscale_inputs(project, tmp_path):
    top = make_folder(tmp_path / "src", count=3, gray=True, splits=True)
    manifest = run(params("folder", top, folder={"split": "folders"}))
    assert manifest["in_channels"] == 1 and len(manifest["mean"]) == 1
    assert manifest["splits"]["train"] == ["train00", "train01", "train02"]
    assert manifest["splits"]["val"] == ["val00", "val01"]
    image, label = data.train_dataset(load_manifest(), params("folder", top))[0]
    assert image.shape == (1, 32, 32) and label.shape == (32, 32)
    image, _ = data.split_dataset(load_manifest(), "test")[0]
    assert image.shape == (1, *SIZE)


def test_folder_label_value_missing_from_the_mapping_is_named(project, tmp_path):
    top = make_folder(tmp_path / "src")
    save_image(top / "labels" / "img03.png", np.full(SIZE, 128, np.uint8))
    download(params("folder", top))
    with pytest.raises(PipelineError) as err:
        preprocess(params("folder", top))
    assert "img03.png: label value 128 is not in dataset.folder.mapping {0: 0, 255: 1}" in str(
        err.value
    )


def test_folder_image_and_label_of_different_sizes_are_named(project, tmp_path):
    top = make_folder(tmp_path / "src")
    save_image(top / "labels" / "img04.png", np.zeros((20, 20), np.uint8))
    download(params("folder", top))
    with pytest.raises(PipelineError, match=r"img04\.png: image is 36x40 but img04\.png is 20x20"):
        preprocess(params("folder", top))


def test_folder_image_without_a_label_is_named(project, tmp_path):
    top = make_folder(tmp_path / "src")
    (top / "labels" / "img05.png").unlink()
    download(params("folder", top))
    with pytest.raises(PipelineError, match=r"images/img05\.png: no label for this image"):
        preprocess(params("folder", top))


def test_folder_corrupt_and_truncated_images_are_named(project, tmp_path):
    top = make_folder(tmp_path / "src")
    (top / "images" / "img01.png").write_bytes(b"not an image at all")
    good = (top / "images" / "img02.png").read_bytes()
    (top / "images" / "img02.png").write_bytes(good[: len(good) // 2])
    download(params("folder", top))
    with pytest.raises(PipelineError, match=r"img0[12]\.png: unreadable or corrupt image"):
        preprocess(params("folder", top))
    (top / "images" / "img01.png").write_bytes(good)
    download(params("folder", top))
    with pytest.raises(PipelineError, match=r"img02\.png: unreadable or corrupt image"):
        preprocess(params("folder", top))


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width x height grey pixels (a decompression bomb's
    header: PIL reads it on open, before any pixel)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_folder_image_claiming_15000x15000_pixels_is_one_line_naming_it(project, tmp_path):
    """The issue's case: PIL's DecompressionBombError came out as a traceback."""
    top = make_folder(tmp_path / "src")
    (top / "images" / "img03.png").write_bytes(png_claiming(15000, 15000))
    p = params("folder", top)
    download(p)
    with pytest.raises(PipelineError) as err:
        preprocess(p)
    bomb = project / "data" / "raw" / "folder" / "images" / "img03.png"
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(  # preprocess may add which source file it copies
        f"{bomb}: 15000x15000 image (225,000,000 pixels) is over dataset.max_image_pixels "
        "(178,956,970), refused before decoding (a decompression bomb?); raise "
        "dataset.max_image_pixels (0 = no limit) if the image is genuine"
    )
    assert not (project / "data" / "processed").exists()
    assert Image.MAX_IMAGE_PIXELS is None  # PIL's own guard: replaced by this one


def test_max_image_pixels_is_the_limit_for_images_and_labels(project, tmp_path):
    top = make_folder(tmp_path / "src")
    p = params("folder", top, max_image_pixels=1000)  # the images are 36x40 = 1,440 pixels
    download(p)
    with pytest.raises(PipelineError, match=r"img\d\d\.png: 36x40 image \(1,440 pixels\) is over "):
        preprocess(p)
    label = top / "labels" / "img00.png"
    with pytest.raises(PipelineError, match=r"dataset\.max_image_pixels \(1,000\)"):
        read_label(label, max_pixels=1000)
    assert read_label(label, max_pixels=0).shape == SIZE  # 0: no limit
    assert preprocess(params("folder", top, max_image_pixels=1440)).is_dir()


def test_an_image_bomb_sent_to_a_model_is_one_line_naming_it():
    """pipeline.predict and the served model read images with the same guard."""
    with pytest.raises(PipelineError, match=r"^image 0: 15000x15000 image \(225,000,000 pixels\)"):
        read_image(io.BytesIO(png_claiming(15000, 15000)), "RGB", name="image 0")


@pytest.mark.parametrize(
    ("fractions", "key"),
    [((0.01, 0.2), "val_fraction"), ((0.25, 0.0), "test_fraction"), ((0.5, 0.49), "val_fraction")],
)
def test_folder_empty_split_from_fractions_is_named(project, tmp_path, fractions, key):
    top = make_folder(tmp_path / "src", count=4)
    p = params("folder", top, folder={"val_fraction": fractions[0], "test_fraction": fractions[1]})
    download(p)
    with pytest.raises(PipelineError, match=rf"dataset\.folder\.{key}"):
        preprocess(p)


def test_folder_empty_split_folder_is_named(project, tmp_path):
    top = make_folder(tmp_path / "src", count=3, splits=True)
    for p in (top / "images" / "val").iterdir():
        p.unlink()
    download(params("folder", top, folder={"split": "folders"}))
    with pytest.raises(PipelineError, match=r"images/val: no images \(empty split\)"):
        preprocess(params("folder", top, folder={"split": "folders"}))


def test_failed_preprocess_leaves_raw_and_previous_processed_data_intact(project, tmp_path):
    top = make_folder(tmp_path / "src")
    run(params("folder", top))
    raw, processed = project / "data" / "raw", project / "data" / "processed"
    before_raw, before_processed = snapshot(raw), snapshot(processed)
    shutil.copy(raw / "folder" / "labels" / "img00.png", tmp_path / "keep.png")
    save_image(raw / "folder" / "labels" / "img06.png", np.full(SIZE, 7, np.uint8))
    with pytest.raises(PipelineError, match="label value 7"):
        preprocess(params("folder", top))
    assert snapshot(processed) == before_processed
    changed = {k for k in snapshot(raw) if snapshot(raw)[k] != before_raw[k]}
    assert changed == {"folder/labels/img06.png"}  # only what the test itself damaged
    assert sorted(p.name for p in (project / "data").iterdir()) == ["processed", "raw"]


# --- labels and crops ----------------------------------------------------------------------------


def test_read_label_keeps_palette_indices_and_refuses_colour(tmp_path):
    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    assert read_label(tmp_path / "pal.png").tolist() == [[0, 1], [2, 1]]
    grey_rgb = np.stack([np.array([[0, 255]], np.uint8)] * 3, -1)
    save_image(tmp_path / "grey.png", grey_rgb)
    assert read_label(tmp_path / "grey.png").tolist() == [[0, 255]]
    colour = np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)
    save_image(tmp_path / "colour.png", colour)
    with pytest.raises(PipelineError, match="colour.png: colour label image"):
        read_label(tmp_path / "colour.png")


def test_map_labels_handles_16_bit_values(tmp_path):
    raw = np.array([[0, 1000], [65535, 1000]], np.uint16)
    out = map_labels(raw, {0: 0, 1000: 1, 65535: 255}, tmp_path / "x.png", "key")
    assert out.dtype == np.uint8 and out.tolist() == [[0, 1], [255, 1]]


def test_patches_per_epoch_spread_over_the_training_images(project, tmp_path):
    top = make_folder(tmp_path / "src")
    p = params("folder", top)
    pp = p.preprocess.model_copy(update={"patches_per_epoch": 9})
    p = p.model_copy(update={"preprocess": pp})
    run(p)
    patches = data.train_dataset(load_manifest(), p)
    assert len(patches) == 9
    assert all(image.shape == (3, 32, 32) for image, _ in (patches[k] for k in range(9)))


def test_images_of_mixed_sizes_are_evaluated_one_at_a_time(project, tmp_path):
    top = make_folder(tmp_path / "src", count=10)
    for i, stem in enumerate(["img00", "img01", "img02"]):
        h, w = 30 + 7 * i, 50 - 5 * i
        save_image(top / "images" / f"{stem}.png", random_image(h, w))
        save_image(top / "labels" / f"{stem}.png", np.zeros((h, w), np.uint8))
    run(params("folder", top))
    sizes = set()
    for split in ("train", "val", "test"):
        ds = data.split_dataset(load_manifest(), split)
        shapes = {ds.read(i)[0].shape[:2] for i in range(len(ds))}
        assert shapes == {ds.shape(i) for i in range(len(ds))}  # from the headers alone
        sizes |= shapes
        loader = eval_shard(ds, SINGLE, batch_size=4)
        same = len(shapes) == 1
        assert loader.batch_size == (4 if same else 1)
        for image, label in loader:  # collates without error
            assert image.shape[-2:] == label.shape[-2:]
    assert len(sizes) > 1


def test_cpu_evaluation_batches_stop_at_a_pixel_budget():
    """Large images go one at a time on a CPU (faster there); small ones still batch."""
    big = [(torch.zeros(3, 584, 565), torch.zeros(584, 565)) for _ in range(3)]
    small = [(torch.zeros(3, 64, 64), torch.zeros(64, 64)) for _ in range(3)]
    assert eval_shard(big, SINGLE, 8, max_pixels=2**18).batch_size == 1
    assert eval_shard(small, SINGLE, 8, max_pixels=2**18).batch_size == 8
    assert eval_shard(small, SINGLE, 8, max_pixels=2 * 64 * 64).batch_size == 2
    assert eval_shard(big, SINGLE, 8).batch_size == 8  # no budget (CUDA)


# --- the positive class and the folder params ---------------------------------------------------


def test_folder_positive_class_is_the_sigmoid_channel_and_is_recorded(project, tmp_path):
    top = make_folder(tmp_path / "src", count=6)
    manifest = run(
        params("folder", top, folder={"class_names": ["bg", "cell"], "positive": "cell"})
    )
    assert manifest["positive_class"] == "cell" and manifest["class_names"] == ["bg", "cell"]
    stem = manifest["splits"]["train"][0]
    raw = png(top / "labels" / f"{stem}.png")
    label = npy(project / "data" / "processed" / "train" / "labels" / f"{stem}.npy")
    assert np.array_equal(label, (raw == 255).astype(np.uint8))


def test_naming_the_first_class_positive_swaps_the_class_indices(project, tmp_path):
    """Raw 0 (black) becomes the positive class: index 1, the sigmoid channel."""
    top = make_folder(tmp_path / "src", count=6)
    folder = {"class_names": ["pore", "solid"], "mapping": {0: 0, 255: 1}, "positive": "pore"}
    manifest = run(params("folder", top, folder=folder))
    assert manifest["class_names"] == ["solid", "pore"] and manifest["positive_class"] == "pore"
    stem = manifest["splits"]["train"][0]
    raw = png(top / "labels" / f"{stem}.png")
    label = npy(project / "data" / "processed" / "train" / "labels" / f"{stem}.npy")
    assert np.array_equal(label, (raw == 0).astype(np.uint8))


def test_a_positive_class_that_is_not_a_class_name_is_one_line():
    with pytest.raises(PipelineError) as err:
        params("folder", Path("x"), folder={"class_names": ["bg", "cell"], "positive": "Cell"})
    assert str(err.value) == (
        "params.yaml: dataset.folder.positive: 'Cell' is not one of "
        "dataset.folder.class_names ['bg', 'cell']"
    )


def test_by_default_the_second_class_is_positive(project, tmp_path):
    top = make_folder(tmp_path / "src", count=6)
    manifest = run(params("folder", top, folder={"class_names": ["bg", "cell"]}))
    assert manifest["positive_class"] == "cell"


def test_multiclass_folders_have_no_positive_class(project, tmp_path):
    top = make_folder(tmp_path / "src", count=6)
    folder = {"class_names": ["bg", "a", "b"], "mapping": {0: 0, 128: 1, 255: 2}}
    assert run(params("folder", top, folder=folder))["positive_class"] is None


def test_drive_like_data_names_vessel_positive(project, tmp_path):
    manifest = run(params("drive", zip_dir(make_drive(tmp_path / "src"), tmp_path / "d.zip")))
    assert manifest["positive_class"] == "vessel"


@pytest.mark.parametrize("key", ["images", "labels"])
def test_folder_layout_errors_name_the_param_to_change(project, tmp_path, key):
    top = make_folder(tmp_path / "src", count=6)
    (top / key).rename(top / key.removesuffix("s"))  # image/ and label/, as a user had them
    message = str(pytest.raises(PipelineError, run, params("folder", top)).value)
    assert f"dataset.folder.{key}" in message and "\n" not in message


def test_clahe_equalises_every_split_and_is_recorded(project, tmp_path):
    from pipeline.data.sources import equalize

    top = make_folder(tmp_path / "src", count=6)
    pre = {"crop_size": 32, "crop_stride": 16, "clahe": 2.0}
    p = parse_params({**params("folder", top).model_dump(), "preprocess": pre})
    manifest = run(p)
    assert manifest["clahe"] == 2.0
    for split in ("train", "val", "test"):
        stem = manifest["splits"][split][0]
        raw = np.array(Image.open(top / "images" / f"{stem}.png").convert("RGB"))
        got = npy(project / "data" / "processed" / split / "images" / f"{stem}.npy")
        np.testing.assert_array_equal(got, equalize(raw, 2.0))
        assert not np.array_equal(got, raw)
    assert np.array_equal(equalize(raw[..., 0], 0.0), raw[..., 0])  # 0: off


# --- image modes: 16-bit and float images by their range, never clipped ----------------------


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_16_bit_images_are_scaled_by_their_range_not_clipped(tmp_path, caplog):
    from pipeline.data.sources import read_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    tif = _save(tmp_path / "a.tif", ramp)
    assert Image.open(tif).mode == "I;16"
    grey = read_image(tif, "L")
    np.testing.assert_array_equal(grey, np.rint(ramp / 257).astype(np.uint8))
    assert grey.mean() == pytest.approx(127.5, abs=0.6)  # convert("L") gave 98% at 255
    rgb = read_image(tif, "RGB")
    assert rgb.shape == (64, 64, 3) and (rgb == grey[..., None]).all()
    # 12-bit camera data in a 16-bit file: bit_depth 12 spans 0..4095
    twelve = _save(tmp_path / "b.tif", (ramp // 16).astype(np.uint16))
    with caplog.at_level("WARNING", logger="pipeline.data.sources"):
        dark = read_image(twelve, "L")
    assert dark.max() == 16 and "dataset.folder.bit_depth: 12" in caplog.text
    np.testing.assert_array_equal(read_image(twelve, "L", 12), np.rint((ramp // 16) * (255 / 4095)))
    with pytest.raises(
        PipelineError, match=r"a\.tif: 16-bit values up to 65535 exceed .*bit_depth"
    ):
        read_image(tif, "L", 12)


def test_float_images_must_hold_values_in_0_1_and_other_modes_are_refused(tmp_path):
    from pipeline.data.sources import read_image

    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    ok = _save(tmp_path / "f.tif", values)
    np.testing.assert_array_equal(read_image(ok, "L"), np.rint(values * 255).astype(np.uint8))
    hot = _save(tmp_path / "hot.tif", values * 1000)
    with pytest.raises(PipelineError, match=r"hot\.tif: float image with values in \[0, 1000\]"):
        read_image(hot, "L")
    signed = _save(tmp_path / "i32.tif", (values * 1e6 - 5e5).astype(np.int32))
    with pytest.raises(PipelineError, match=r"i32\.tif: image mode I is not supported"):
        read_image(signed, "L")


def test_a_folder_of_16_bit_tiffs_trains_on_their_real_contrast(project, tmp_path):
    """The issue's case: 16-bit microscopy TIFFs gave a manifest mean of 0.992."""
    top = make_folder(tmp_path / "src", gray=True)
    for png_path in sorted((top / "images").glob("*.png")):
        eight = np.array(Image.open(png_path))
        _save(png_path.with_suffix(".tif"), eight.astype(np.uint16) * 257)
        png_path.unlink()
    manifest = run(params("folder", top))
    assert 0.3 < manifest["mean"][0] < 0.7 and manifest["bit_depth"] == 0


# --- preprocess.scale: train and predict on resized images, score every original pixel ---------


def test_scale_resizes_every_image_but_only_the_training_labels(project, tmp_path):
    top = make_folder(tmp_path / "src", count=8)
    pre = {"crop_size": 16, "crop_stride": 8, "scale": 0.5}
    p = parse_params({**params("folder", top).model_dump(), "preprocess": pre})
    manifest = run(p)
    assert manifest["scale"] == 0.5
    small = (round(SIZE[0] / 2), round(SIZE[1] / 2))
    processed = project / "data" / "processed"
    for split in ("train", "val", "test"):
        stem = manifest["splits"][split][0]
        raw = np.array(Image.open(top / "images" / f"{stem}.png").convert("RGB"))
        got = npy(processed / split / "images" / f"{stem}.npy")
        resized = Image.fromarray(raw).resize(small[::-1], Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(got, np.asarray(resized))  # antialiased, as predict's
        label = npy(processed / split / "labels" / f"{stem}.npy")
        assert label.shape == (small if split == "train" else SIZE)  # val/test: full-size
    image, _ = data.train_dataset(load_manifest(), p)[0]
    assert image.shape[1:] == (16, 16)
    image, label = data.split_dataset(load_manifest(), "val")[0]
    assert image.shape == (3, *small) and label.shape == SIZE


def test_scaled_splits_are_scored_on_their_full_size_labels(project, tmp_path):
    """evaluate upsamples the logits of a resized image to its label: every original pixel
    counts, as scoring by hand at full size does."""
    import torch.nn.functional as F

    from pipeline.core.config import InferenceParams
    from pipeline.inference.evaluate import evaluate
    from pipeline.inference.forward import predict as to_classes
    from pipeline.inference.metrics import ConfusionMatrix
    from pipeline.inference.tiling import predict_tiled
    from pipeline.models import build_model

    top = make_folder(tmp_path / "src", count=8)
    pre = {"crop_size": 16, "crop_stride": 8, "scale": 0.5}
    manifest = run(parse_params({**params("folder", top).model_dump(), "preprocess": pre}))
    test = data.split_dataset(load_manifest(), "test")
    torch.manual_seed(0)
    model = build_model("unet", 3, 2, base_channels=4, depth=2).eval()
    whole = InferenceParams(tile_size=0)
    got = evaluate(model, test, manifest["class_names"], whole)
    cm = ConfusionMatrix(2)
    for i in range(len(test)):  # the dataset wraps around (epoch * n + i), never ends
        image, label = test[i]
        logits = predict_tiled(model, image[None], 0, 0, 4)
        full = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
        cm.update(to_classes(full), label[None])
    expected = cm.compute(manifest["class_names"])
    assert got["miou"] == pytest.approx(expected["miou"])
    assert got["global_accuracy"] == pytest.approx(expected["global_accuracy"])
