"""Attacks with what users feed a segmentation pipeline: odd image files, odd names, odd
params. Each gets either the right result or a one-line error naming the culprit.

| attack                                                  | outcome                          |
|---------------------------------------------------------|----------------------------------|
| phone JPEG stored sideways with an EXIF orientation tag | read upright, as its label       |
| a TIFF stack / animated GIF as one image                | one line: frames, one per file   |
| RGBA PNG images                                          | alpha dropped, RGB as shown      |
| CMYK JPEG images                                         | converted to RGB                 |
| a zero-byte image file                                   | one line: unreadable or corrupt  |
| labels 0/1 where the mapping expects 0/255               | one line naming file and mapping |
| image `IMG01.JPG`, label `IMG01.png` (case, extension)   | paired by stem                   |
| file names with spaces and non-ASCII letters             | read and paired                  |
| a key written twice in params.yaml                      | one line naming key and lines    |
| `dvc exp run -S lr=abc` (a string for a float)           | one line naming lr               |
| `-S dataset.folder.bit_depth=20`                         | one line naming the bound        |
| a 16-bit PNG given to pipeline.predict                  | scaled like training, not clipped|
| a float TIFF holding NaN                                 | one line: values and NaN         |
| a 1x1 image given to pipeline.predict                   | a 1x1 label                      |
| a folder whose images differ in size                    | each evaluated at its own size   |

Issue 30's 110 attacks and our own further ones, each with its outcome and test: ATTACKS.md
beside this module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import load_params, parse_params
from pipeline.data.sources import read_image, read_label
from pipeline.engine.distributed import SINGLE
from pipeline.inference.evaluate import eval_shard
from tests.fakes import make_folder, random_image, save_image
from tests.unit.data.test_archives import error_of
from tests.unit.data.test_datasets import params, run
from tests.unit.tools.test_predict import read_png, save_model

# --- image files ------------------------------------------------------------------------------


def test_a_jpeg_stored_sideways_with_an_exif_tag_is_read_upright(tmp_path):
    # what the camera app shows: 30 high, 50 wide, bright at the top, a ramp left to right
    ramp = np.linspace(0, 120, 50)[None, :] + np.where(np.arange(30) < 15, 120, 0)[:, None]
    shown = np.repeat(ramp[..., None], 3, axis=2).astype(np.uint8)
    stored = np.ascontiguousarray(np.rot90(shown, 1))  # stored 50 x 30, tag 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    path = save_image(tmp_path / "photo.jpg", stored, exif=exif, quality=100, subsampling=0)
    image = read_image(path, "RGB")
    assert image.shape == (30, 50, 3)
    assert np.abs(image.astype(int) - shown).mean() < 3  # JPEG, not bit-exact


@pytest.mark.parametrize("suffix", [".tif", ".gif"])
def test_a_stack_of_frames_is_refused_not_cut_to_its_first(tmp_path, suffix):
    frames = [Image.fromarray(random_image(16, 16, gray=True)) for _ in range(3)]
    path = tmp_path / f"stack{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    message = error_of(lambda: read_image(path, "L"))
    assert message == f"{path}: 3 frames (a stack or an animation); give one image per file"


def test_rgba_and_cmyk_images_read_as_the_rgb_they_show(tmp_path):
    rgb = random_image(12, 10)
    rgba = np.dstack([rgb, np.full((12, 10), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(save_image(tmp_path / "a.png", rgba), "RGB"), rgb)
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, quality=100)
    image = read_image(cmyk, "RGB")
    assert image.shape == (12, 10, 3) and np.abs(image.astype(int) - rgb).mean() < 12


def test_a_zero_byte_image_is_one_line(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert error_of(lambda: read_image(empty, "RGB")).startswith(f"{empty}: unreadable or corrupt")
    assert error_of(lambda: read_label(empty)).startswith(f"{empty}: unreadable or corrupt")


def test_a_float_tiff_with_nan_is_refused(tmp_path):
    values = np.full((8, 8), 0.5, np.float32)
    values[2, 3] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(values).save(path)
    message = error_of(lambda: read_image(path, "L"))
    assert message.startswith(f"{path}: float image with values in [0.5, 0.5] and NaN/inf")


# --- folders of your own ----------------------------------------------------------------------


def test_labels_0_1_under_a_0_255_mapping_name_the_file_and_the_param(project, tmp_path):
    top = make_folder(tmp_path / "src")
    first = sorted((top / "labels").glob("*.png"))[0]
    save_image(first, (np.array(Image.open(first)) > 0).astype(np.uint8))  # 0/1
    message = error_of(lambda: run(params("folder", top)))
    assert first.name in message and "dataset.folder.mapping" in message


def blank_labels(top: Path, split: str = "") -> None:
    for label in (top / "labels" / split).rglob("*.png"):
        save_image(label, np.zeros_like(np.array(Image.open(label))))


def test_all_empty_training_masks_stop_preprocess_in_one_line(project, tmp_path):
    top = make_folder(tmp_path / "src", splits=True)
    blank_labels(top, "train")
    message = error_of(lambda: run(params("folder", top, folder={"split": "folders"})))
    assert "the train labels hold no pixel of class 'foreground': nothing to learn" in message
    assert "dataset.folder.mapping" in message
    assert not (project / "data" / "processed").exists()  # nothing half-written


def test_a_test_split_without_foreground_is_a_warning_and_counted(project, tmp_path, caplog):
    from pipeline.data.manifest import empty_classes

    top = make_folder(tmp_path / "src", splits=True)
    blank_labels(top, "test")
    with caplog.at_level(logging.WARNING):
        run(params("folder", top, folder={"split": "folders"}))
    assert "the test labels hold no pixel of class 'foreground'; its metrics are undefined" in (
        caplog.text
    )
    # what the registry reads to register nothing (tests/unit/tracking/test_registry.py)
    assert empty_classes("test") == (["foreground"], 2)
    assert empty_classes("train") == ([], 2)


def test_names_with_other_case_extensions_spaces_and_accents_pair_by_stem(project, tmp_path):
    top = make_folder(tmp_path / "src")
    images, labels = sorted((top / "images").iterdir()), sorted((top / "labels").iterdir())
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        stem = f"Zellkultur Bild é{i:02d}"
        save_image(top / "images" / f"{stem}.JPG", np.array(Image.open(image)), quality=95)
        label.rename(top / "labels" / f"{stem}.png")
        image.unlink()
    manifest = run(params("folder", top))
    stems = sorted(s for split in manifest["splits"].values() for s in split)
    assert stems == [f"Zellkultur Bild é{i:02d}" for i in range(len(images))]


def test_images_of_different_sizes_are_evaluated_one_by_one_at_their_own_size():
    class Sized(torch.utils.data.Dataset):
        shapes = [(20, 30), (20, 30), (24, 16)]

        def __len__(self):
            return len(self.shapes)

        def __getitem__(self, i):
            return torch.zeros(3, *self.shapes[i]), torch.zeros(self.shapes[i], dtype=torch.long)

    batches = list(eval_shard(Sized(), SINGLE, batch_size=4))
    assert [tuple(b[0].shape[-2:]) for b in batches] == Sized.shapes  # never stacked


# --- params -----------------------------------------------------------------------------------


def test_a_key_written_twice_in_params_yaml_names_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nlr: 0.1\nepochs: 3\nlr: 0.001\n")
    message = error_of(lambda: load_params(path, complete=False))
    assert message == (f"{path}: not valid YAML ('lr' is written twice (lines 2 and 4); keep one)")
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  amp: bf16\n  amp: none\n")
    assert "'amp' is written twice (lines 2 and 3)" in error_of(
        lambda: load_params(nested, complete=False)
    )


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"lr": "abc"}, "lr"),
        ({"dataset": {"folder": {"bit_depth": 20}}}, "dataset.folder.bit_depth"),
    ],
)
def test_bad_values_from_dvc_exp_run_name_the_key(data, key):
    message = error_of(lambda: parse_params(data))
    assert message.startswith(f"params.yaml: {key}: ")


# --- pipeline.predict -------------------------------------------------------------------------


def test_predict_scales_a_16_bit_png_like_training_and_takes_a_1x1_image(tmp_path):
    from pipeline.predict import predict_files

    save_model(tmp_path / "model.pt", in_channels=1)
    eight = random_image(20, 24, gray=True)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    save_image(tmp_path / "flat.png", eight)
    save_image(tmp_path / "dot.png", np.array([[200]], np.uint8))
    images = [tmp_path / "deep.png", tmp_path / "flat.png", tmp_path / "dot.png"]
    predict_files(tmp_path / "model.pt", images, tmp_path / "out", device="cpu")
    deep, _ = read_png(tmp_path / "out" / "deep_label.png")
    flat, _ = read_png(tmp_path / "out" / "flat_label.png")
    np.testing.assert_array_equal(deep, flat)  # 16-bit x 257 == the same 8-bit image
    assert read_png(tmp_path / "out" / "dot_label.png")[0].shape == (1, 1)
