"""pipeline.predict: label and overlay PNGs for images of any size, as predicted by hand."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.common import PipelineError, run_cli
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
