"""pipeline.predict: label and overlay PNGs for images of any size, as predicted by hand."""

from __future__ import annotations

import logging
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.core.common import PipelineError, run_cli
from pipeline.engine.checkpoint import save_checkpoint
from pipeline.inference.forward import predict
from pipeline.inference.tiling import predict_tiled
from pipeline.models import build_model
from pipeline.predict import main, predict_files
from pipeline.report.palette import PALETTE

PROJECT = Path(__file__).resolve().parents[3]
OPTIONS = {"base_channels": 4, "depth": 2}
INFERENCE = {"tile_size": 32, "tile_overlap": 8, "blend": "gaussian"}


def save_model(
    path: Path, arch: str = "unetpp", in_channels: int = 3, num_classes: int = 2, **info
) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, in_channels, num_classes, **OPTIONS)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so eval-mode BN matters
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    centre_heads(model.eval(), in_channels)
    names = ["background", "vessel", "other"][:num_classes]
    info = {
        "params": {"inference": INFERENCE},
        "metrics": {},
        "best_epoch": 1,
        "data": {
            "dataset": "synthetic",
            "class_names": names,
            "mean": [0.5] * in_channels,
            "std": [0.2] * in_channels,
            "ignore_index": 255,
        },
        **info,
    }
    config = {"in_channels": in_channels, "num_classes": num_classes, "options": OPTIONS}
    save_checkpoint(path, model, arch=arch, model_config=config, **info)
    return model.eval()


def centre_heads(model: nn.Module, in_channels: int) -> None:
    """Shift every head's bias so its logits' median is 0 on a typical input: a random model
    then predicts every class somewhere, instead of its bias's class everywhere."""
    x = torch.from_numpy(smooth_image((64, 64), in_channels)).float().permute(2, 0, 1)[None]
    x = (x / 255 - 0.5) / 0.2
    with torch.no_grad():
        heads = model.forward_heads(x) if hasattr(model, "forward_heads") else {0: model(x)}
        convs = (
            [h.conv for h in model.heads.values()] if hasattr(model, "heads") else [model.head.conv]
        )
        for conv, logits in zip(convs, heads.values(), strict=True):
            conv.bias -= logits.flatten(2).median(2).values[0]


def smooth_image(size: tuple[int, int], channels: int, seed: int = 0) -> np.ndarray:
    """(H, W, channels) uint8 of random blobs, so predictions form regions."""
    rng = np.random.default_rng(seed)
    h, w = size
    coarse = rng.uniform(0, 255, (h // 4 + 2, w // 4 + 2, channels))
    big = np.kron(coarse, np.ones((4, 4, 1)))[:h, :w]
    return np.clip(big + rng.normal(0, 10, big.shape), 0, 255).astype(np.uint8)


def save_image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> np.ndarray:
    """A smooth random (H, W, 3) RGB or (H, W) "L" image, written to `path`."""
    image = smooth_image(size, 3 if mode == "RGB" else 1, seed)
    image = image[..., 0] if mode == "L" else image
    Image.fromarray(image).save(path)
    return image


def by_hand(model: nn.Module, image: np.ndarray, tile=32, overlap=8, tta="none") -> np.ndarray:
    x = torch.from_numpy(image).float()
    x = x[..., None] if x.ndim == 2 else x
    x = ((x / 255 - 0.5) / 0.2).permute(2, 0, 1)[None]
    logits = predict_tiled(model, x, tile, overlap, model.size_multiple, tta=tta)
    return predict(logits)[0].numpy()


def read_png(path: Path) -> tuple[np.ndarray, str]:
    with Image.open(path) as img:
        return np.array(img), img.mode


def png_claiming(width: int, height: int) -> bytes:
    """A greyscale PNG whose header says width x height, with one row of data: PIL judges an
    image's size by its header when it opens it, so this 94-byte file meets the very check a
    real 15000x15000 PNG (218 KB of zeros) does, without building 225 MB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\0" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("arch", "mode"), [("unetpp", "RGB"), ("unet", "L")])
def test_odd_sizes_give_labels_and_overlays_as_by_hand(tmp_path, arch, mode):
    model = save_model(tmp_path / "model.pt", arch, in_channels=3 if mode == "RGB" else 1)
    sizes = {"a": (37, 53), "b": (20, 9), "c": (70, 41)}
    images = {s: save_image(tmp_path / f"{s}.png", size, mode) for s, size in sizes.items()}
    out = tmp_path / "out"
    written = predict_files(
        tmp_path / "model.pt", [tmp_path / f"{s}.png" for s in sizes], out, device="cpu"
    )
    assert written == [out / f"{s}_{kind}.png" for s in sizes for kind in ("label", "overlay")]
    for stem, image in images.items():
        labels, label_mode = read_png(out / f"{stem}_label.png")
        assert label_mode == "P" and labels.shape == sizes[stem]
        np.testing.assert_array_equal(labels, by_hand(model, image))
        over, over_mode = read_png(out / f"{stem}_overlay.png")
        assert over_mode == "RGB" and over.shape == (*sizes[stem], 3)
        rgb = np.repeat(image[..., None], 3, 2) if image.ndim == 2 else image
        bg = labels == 0
        np.testing.assert_array_equal(over[bg], rgb[bg])  # background left as it is
        blended = (rgb[~bg].astype(int) + PALETTE[labels[~bg]]) // 2
        np.testing.assert_array_equal(over[~bg], blended)
    both = np.concatenate([read_png(out / f"{s}_label.png")[0].ravel() for s in sizes])
    assert set(np.unique(both)) == {0, 1}, "a random model still predicts both classes"


def test_label_png_palette_shows_class_colours(tmp_path):
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "x.png", (24, 24))
    predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], tmp_path / "out", device="cpu")
    with Image.open(tmp_path / "out" / "x_label.png") as img:
        colours = np.array(img.convert("RGB"))
        labels = np.array(img)
    np.testing.assert_array_equal(colours, PALETTE[labels])
    assert len({tuple(c) for c in PALETTE[:21]}) == 21, "distinct colours for 20 classes"


def test_depth_predicts_with_the_pruned_unetpp(tmp_path):
    model = save_model(tmp_path / "unetpp.pt")
    image = save_image(tmp_path / "x.png", (45, 27))
    predict_files(tmp_path / "unetpp.pt", [tmp_path / "x.png"], tmp_path / "out", depth=1)
    labels, _ = read_png(tmp_path / "out" / "x_label.png")
    np.testing.assert_array_equal(labels, by_hand(model.prune(1).eval(), image))
    assert not np.array_equal(labels, by_hand(model, image)), "head 1 is not head 2"


def test_three_classes_and_tile_arguments_override_the_checkpoint(tmp_path):
    model = save_model(tmp_path / "model.pt", num_classes=3)
    image = save_image(tmp_path / "x.png", (50, 66))
    out = tmp_path / "out"
    predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], out, tile=16, overlap=4)
    labels, _ = read_png(out / "x_label.png")
    assert labels.max() <= 2 and len(np.unique(labels)) >= 2
    np.testing.assert_array_equal(labels, by_hand(model, image, tile=16, overlap=4))
    predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], out, tile=0)
    labels, _ = read_png(out / "x_label.png")
    np.testing.assert_array_equal(labels, by_hand(model, image, tile=0))


def test_test_time_flips_follow_the_checkpoint_unless_tta_overrides_them(tmp_path):
    model = save_model(tmp_path / "model.pt", params={"inference": {**INFERENCE, "tta": "flips"}})
    image = save_image(tmp_path / "x.png", (50, 66))
    out = tmp_path / "out"
    predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], out)
    flips = read_png(out / "x_label.png")[0]
    np.testing.assert_array_equal(flips, by_hand(model, image, tta="flips"))
    predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], out, tta="none")
    plain = read_png(out / "x_label.png")[0]
    np.testing.assert_array_equal(plain, by_hand(model, image))
    assert not np.array_equal(flips, plain), "a random model is not flip-invariant"
    save_model(tmp_path / "bad.pt", params={"inference": {**INFERENCE, "tta": "rot90"}})
    with pytest.raises(PipelineError, match=r"bad\.pt: inference\.tta 'rot90'; valid: none, hflip"):
        predict_files(tmp_path / "bad.pt", [tmp_path / "x.png"], out)


def test_a_large_image_logs_tile_progress_with_the_time_left(tmp_path, monkeypatch, caplog):
    """Thousands of tiles take minutes: lines say how far it is and how long is left (here a
    line per batch of 8 tiles; by default every 10 s)."""
    from pipeline import predict as pr

    monkeypatch.setattr(pr.TileProgress, "PROGRESS_SECONDS", 0.0)
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "big.png", (100, 120))
    with caplog.at_level(logging.INFO, logger="pipeline.predict"):
        predict_files(tmp_path / "model.pt", [tmp_path / "big.png"], tmp_path / "out", tile=16)
    lines = [r.getMessage() for r in caplog.records if " tiles (" in r.getMessage()]
    from pipeline.inference.tiling import tile_count

    total = tile_count(100, 120, 16, 8, 4)
    assert total > 16 and len(lines) == -(-total // 8) - 1  # every batch but the last
    assert lines[0].startswith(f"big.png: 8 of {total} tiles (") and lines[0].endswith(" left")


def test_old_checkpoint_without_inference_params_predicts_the_whole_image(tmp_path):
    model = save_model(tmp_path / "model.pt", params={})
    image = save_image(tmp_path / "x.png", (30, 34))
    predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], tmp_path / "out")
    labels, _ = read_png(tmp_path / "out" / "x_label.png")
    np.testing.assert_array_equal(labels, by_hand(model, image, tile=0))


def test_cli_end_to_end_in_a_subprocess(tmp_path):
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "photo.jpg", (33, 47))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.predict", "--model", str(tmp_path / "model.pt")]
        + [str(tmp_path / "photo.jpg"), "--out", str(out), "--device", "cpu"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["photo_label.png", "photo_overlay.png"]
    assert read_png(out / "photo_label.png")[0].shape == (33, 47)
    assert "photo.jpg: 33x47" in proc.stderr and "predicted 1 image(s)" in proc.stderr


def test_help_describes_the_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = ("--model", "--depth", "--out", "--tile", "--overlap", "--tta", "--device", "IMAGE")
    for option in options:
        assert option in text


@pytest.mark.parametrize(
    ("arch", "case", "extra", "message"),
    [
        ("unetpp", "missing", [], r"nothere\.png: file not found"),
        ("unetpp", "corrupt", [], r"bad\.png: unreadable or corrupt image"),
        ("unet", "good", ["--depth", "1"], r"model\.pt: --depth needs a UNet\+\+, not unet"),
        ("unetpp", "good", ["--depth", "3"], r"model\.pt: --depth 3: no head at depth 3"),
        (None, "good", [], r"model\.pt: checkpoint not found"),
        ("unetpp", "good", ["--tile", "30"], r"--tile 30: must be 0 \(whole image\) or a mul"),
        ("unetpp", "good", ["--overlap", "32"], r"--overlap 32: must lie in 0\.\.31"),
        ("unetpp", "same stem", [], r"a\.png, .*a\.jpg: same name 'a'"),
    ],
)
def test_cli_errors_are_one_line_exit_1_and_write_nothing(
    tmp_path, caplog, arch, case, extra, message
):
    if arch:
        save_model(tmp_path / "model.pt", arch)
    good = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in good:
        save_image(path, (20, 20))
    bad = {
        "missing": [tmp_path / "nothere.png"],
        "corrupt": [tmp_path / "bad.png"],
        "good": [],
        "same stem": [tmp_path / "sub" / "a.jpg"],
    }[case]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "sub").mkdir()
    save_image(tmp_path / "sub" / "a.jpg", (20, 20))
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model.pt"), *map(str, good + bad), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [*argv, *extra])
    assert exit_info.value.code == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "\n" not in record.getMessage()
    assert re.search(message, record.getMessage()), record.getMessage()
    assert not out.exists(), "nothing written, not even for the good images"


def test_errors_are_pipeline_errors_for_callers(tmp_path):
    save_model(tmp_path / "model.pt")
    with pytest.raises(PipelineError, match="no images given"):
        predict_files(tmp_path / "model.pt", [], tmp_path / "out")
    (tmp_path / "file").write_text("")
    save_image(tmp_path / "x.png", (8, 8))
    with pytest.raises(PipelineError, match="file: --out exists and is not a folder"):
        predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], tmp_path / "file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "x.png", (8, 8))
    with pytest.raises(PipelineError, match="--device cuda: no CUDA device available"):
        predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], tmp_path / "out", device="cuda")


def test_the_checkpoints_contrast_equalisation_is_applied_before_predicting(tmp_path):
    """preprocess.clahe equalised the training images: predict equalises new images alike."""
    from pipeline.data.sources import equalize

    data = {"dataset": "folder", "class_names": ["background", "vessel"], "mean": [0.5] * 3,
            "std": [0.2] * 3, "ignore_index": 255, "clahe": 2.0}  # fmt: skip
    model = save_model(tmp_path / "model.pt", data=data)
    image = save_image(tmp_path / "a.png", (48, 40))
    predict_files(tmp_path / "model.pt", [tmp_path / "a.png"], tmp_path / "out", device="cpu")
    labels, _ = read_png(tmp_path / "out" / "a_label.png")
    equalised = equalize(image, 2.0)
    assert not np.array_equal(equalised, image)
    np.testing.assert_array_equal(labels, by_hand(model, equalised))


def test_a_model_trained_at_a_scale_predicts_at_it_and_labels_every_pixel(tmp_path):
    """preprocess.scale 0.5: the image is resized (antialiased bilinear) to what the model saw
    in training, and its logits upsampled back: one label per pixel of the input."""
    import torch.nn.functional as F

    model = save_model(tmp_path / "model.pt")
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    ckpt["data"]["scale"] = 0.5
    torch.save(ckpt, tmp_path / "model.pt")
    image = save_image(tmp_path / "x.png", (45, 62))
    predict_files(tmp_path / "model.pt", [tmp_path / "x.png"], tmp_path / "out", device="cpu")
    labels, _ = read_png(tmp_path / "out" / "x_label.png")
    assert labels.shape == (45, 62)

    x = ((torch.from_numpy(image).float() / 255 - 0.5) / 0.2).permute(2, 0, 1)[None]
    small = F.interpolate(x, size=(22, 31), mode="bilinear", antialias=True, align_corners=False)
    logits = predict_tiled(model, small, 32, 8, model.size_multiple)  # (1, 1, 22, 31)
    full = F.interpolate(logits, size=(45, 62), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(labels, predict(full)[0].numpy())
    assert not np.array_equal(labels, by_hand(model, image)), "the scale must matter"


def cli_error(caplog, argv: list[str]) -> str:
    """The one line run_cli logs for `python -m pipeline.predict argv`, which must exit 1."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "\n" not in record.getMessage()
    return record.getMessage()


def not_a_checkpoint(path: Path, case: str) -> None:
    model = build_model("unet", 3, 2, **OPTIONS)
    obj = {
        "a bare tensor": torch.zeros(3),
        "a list": [torch.zeros(3), 1],
        "bare weights": model.state_dict(),
        "a dict without the keys": {"weights": torch.zeros(1), "epoch": 3},
        "a resume state": {"fingerprint": "abc", "model": model.state_dict(), "epoch": 2},
    }[case]
    torch.save(obj, path)


@pytest.mark.parametrize(
    ("case", "holds"),
    [
        ("a bare tensor", "a tensor"),
        ("a list", "a list"),
        ("bare weights", r"bare weights \(a state_dict of \d+ tensors, no arch or model_config\)"),
        (
            "a dict without the keys",
            "a dict of 'weights', 'epoch', without arch, model_config, state_dict",
        ),
        (
            "a resume state",
            r"a training run's resume state \(models/resume/\), which training alone reads",
        ),
    ],
)
def test_a_model_file_that_is_no_checkpoint_is_one_line_saying_what_one_is(
    tmp_path, caplog, case, holds
):
    not_a_checkpoint(tmp_path / "model.pt", case)
    save_image(tmp_path / "a.png", (20, 20))
    argv = ["--model", str(tmp_path / "model.pt"), str(tmp_path / "a.png")]
    message = cli_error(caplog, [*argv, "--out", str(tmp_path / "out")])
    path = re.escape(str(tmp_path / "model.pt"))
    assert re.fullmatch(
        rf"{path}: not a checkpoint of this pipeline: it holds {holds}; a checkpoint is "
        r"the dict training saves as models/<arch>\.pt, with arch, model_config, state_dict",
        message,
    ), message
    assert not (tmp_path / "out").exists()


def test_an_image_pil_calls_a_decompression_bomb_is_one_line(tmp_path, caplog):
    """A PNG claiming 15000x15000 px (225 MP, over PIL's 179 MP limit): one line naming the
    file, and nothing written for the good image beside it."""
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "a.png", (20, 20))
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(png_claiming(15000, 15000))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(Image.DecompressionBombError):
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's own guard, which ours replaces
        Image.open(bomb)  # refuses it: the real case
    argv = ["--model", str(tmp_path / "model.pt"), str(tmp_path / "a.png"), str(bomb)]
    message = cli_error(caplog, [*argv, "--out", str(tmp_path / "out")])
    assert message.startswith(f"{bomb}: 15000x15000 image (225,000,000 pixels) is over "), message
    assert "raise PIPELINE_MAX_IMAGE_PIXELS (0 = no limit)" in message
    assert not (tmp_path / "out").exists()


def writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no file can be created in: mode 555, and for root (whom modes do not stop)
    the immutable attribute too; skipped where neither holds."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if writable(folder) and shutil.which("chattr"):
        chattr = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        immutable = chattr.returncode == 0
    try:
        if writable(folder):
            pytest.skip("no way to make a folder read-only here (root, and no chattr +i)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_an_out_folder_under_a_file_is_one_line_before_predicting(tmp_path, caplog):
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "a.png", (20, 20))
    (tmp_path / "notes.txt").write_text("a file where --out wants a folder")
    out = tmp_path / "notes.txt" / "predictions"
    argv = ["--model", str(tmp_path / "model.pt"), str(tmp_path / "a.png"), "--out", str(out)]
    message = cli_error(caplog, argv)
    assert message.startswith(f"{out}: not writable (Not a directory)"), message


def test_a_read_only_out_folder_is_one_line_before_predicting(tmp_path, caplog, read_only_folder):
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "a.png", (20, 20))
    out = read_only_folder / "predictions"  # created inside: refused
    argv = ["--model", str(tmp_path / "model.pt"), str(tmp_path / "a.png"), "--out", str(out)]
    message = cli_error(caplog, argv)
    assert re.match(
        rf"{re.escape(str(out))}: not writable \((Permission denied|Operation not permitted)\)",
        message,
    ), message
    argv[-1] = str(read_only_folder)  # the folder itself: exists, takes no file
    caplog.clear()
    message = cli_error(caplog, argv)
    assert message.startswith(f"{read_only_folder}: not writable"), message
    assert list(read_only_folder.iterdir()) == []


def test_a_folder_among_the_images_is_one_line(tmp_path, caplog):
    save_model(tmp_path / "model.pt")
    (tmp_path / "scans").mkdir()
    save_image(tmp_path / "scans" / "a.png", (20, 20))
    argv = ["--model", str(tmp_path / "model.pt"), str(tmp_path / "scans"), "--out", "out"]
    message = cli_error(caplog, argv)
    scans = tmp_path / "scans"
    assert message == f"{scans}: a folder, not an image file (give its images: {scans}/*)"


def test_a_non_image_file_among_the_images_stops_before_anything_is_written(tmp_path, caplog):
    """`predict scans/*` on a folder that also holds notes: one line naming the file."""
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "a.png", (20, 20))
    (tmp_path / "notes.txt").write_text("not an image")
    images = [str(tmp_path / "a.png"), str(tmp_path / "notes.txt")]
    message = cli_error(
        caplog, ["--model", str(tmp_path / "model.pt"), *images, "--out", str(tmp_path / "out")]
    )
    assert message.startswith(f"{tmp_path / 'notes.txt'}: unreadable or corrupt image"), message
    assert not (tmp_path / "out").exists()


def test_an_output_that_would_replace_an_input_is_one_line(tmp_path, caplog):
    """Predicting a.png and a_label.png into their own folder would write a.png's label over
    the input a_label.png before reading it."""
    save_model(tmp_path / "model.pt")
    save_image(tmp_path / "a.png", (20, 20))
    save_image(tmp_path / "a_label.png", (20, 20), seed=1)
    before = (tmp_path / "a_label.png").read_bytes()
    images = [str(tmp_path / "a.png"), str(tmp_path / "a_label.png")]
    message = cli_error(
        caplog, ["--model", str(tmp_path / "model.pt"), *images, "--out", str(tmp_path)]
    )
    assert message == (
        f"{tmp_path / 'a_label.png'}: an input, and where the output of a.png would go; "
        "choose another --out"
    )
    assert (tmp_path / "a_label.png").read_bytes() == before
    assert not (tmp_path / "a_overlay.png").exists()
