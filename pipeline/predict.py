"""Segment your own images with a trained checkpoint: a label PNG and an overlay per image.

    python -m pipeline.predict --model models/unetpp.pt [--depth 2] a.png b.jpg --out predictions/

Images of any size are predicted tile by tile as in validation (`inference` in the checkpoint's
params: mirror-padded borders, overlapping blended tiles; `--tile 0` predicts the whole image
at once; `inference.tta` or `--tta hflip|flips` averages the predictions of flipped copies).
For each image it writes `<stem>_label.png`, a palette PNG whose pixel values are the
class indices, and `<stem>_overlay.png`, the image with every non-background class blended in
its colour. Every input is read before anything is written, so a bad one leaves nothing behind.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.common import PipelineError, atomic_path, clock, run_cli, scaled_size
from pipeline.data.sources import equalize, read_image
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.distributed import pick_device
from pipeline.inference.forward import predict
from pipeline.inference.tiling import BLENDS, TTA_FLIPS, predict_tiled, tile_count
from pipeline.report.palette import PALETTE, overlay

log = logging.getLogger(__name__)


def predict_files(
    model_path: Path,
    images: list[Path],
    out_dir: Path,
    depth: int | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    device: str = "auto",
    tta: str | None = None,
) -> list[Path]:
    """Predict each image with the checkpoint at `model_path` (UNet++ pruned to `depth` if
    given) and write its label and overlay PNGs to `out_dir`. `tile`/`overlap`/`tta` default to
    the checkpoint's `inference` params (whole-image prediction for older checkpoints). Returns
    the files written, label and overlay per image in input order."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    images = [Path(p) for p in images]
    if not images:
        raise PipelineError("no images given")
    stems = Counter(p.stem for p in images)
    clash = next((s for s, n in stems.items() if n > 1), None)
    if clash is not None:
        same = ", ".join(str(p) for p in images if p.stem == clash)
        raise PipelineError(f"{same}: same name {clash!r}, their outputs would overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"{out_dir}: --out exists and is not a folder")

    dev = pick_device(device, name="--device")
    model, ckpt = load_checkpoint(model_path, dev)
    model, name = _select_depth(model, ckpt, model_path, depth)
    model = model.to(dev)  # prune() builds the sub-network on the CPU
    multiple = getattr(model, "size_multiple", None)
    if multiple is None:  # the valid-convolution UNet maps an image to a smaller one
        raise PipelineError(
            f"{model_path}: a valid-convolution UNet (padding 0) predicts a smaller map than "
            "its input; pipeline.predict needs a same-padding model"
        )
    tile, overlap, blend, tta = _tiling(ckpt, model_path, tile, overlap, multiple, tta)
    data = ckpt.get("data") or {}
    in_channels = ckpt["model_config"]["in_channels"]
    mean, std = _normalisation(data, in_channels, model_path)
    mode = {1: "L", 3: "RGB"}.get(in_channels)
    if mode is None:
        raise PipelineError(f"{model_path}: {in_channels} input channels; predict reads 1 or 3")
    num_classes = ckpt["model_config"]["num_classes"]
    if num_classes > 256:
        raise PipelineError(f"{model_path}: {num_classes} classes; a label PNG holds 256")
    class_names = data.get("class_names") or [str(i) for i in range(num_classes)]
    mean, std = mean.to(dev), std.to(dev)

    # read every image once before writing: a missing or corrupt one stops the run up front
    # (read again below, so only one image is held at a time)
    bit_depth = int(data.get("bit_depth", 0))  # 16-bit images scaled as in training
    scale = float(data.get("scale", 1.0))  # preprocess.scale of the training data
    for path in images:
        read_image(path, mode, bit_depth)

    start = time.perf_counter()
    written: list[Path] = []
    for path in images:
        image = read_image(path, mode, bit_depth)  # (H, W) or (H, W, 3) uint8
        # the contrast equalisation preprocess applied to the training images, if any
        x = torch.from_numpy(equalize(image, data.get("clahe", 0.0))).to(dev, torch.float32)
        x = x[..., None] if x.ndim == 2 else x  # (H, W, C)
        x = ((x / 255 - mean) / std).permute(2, 0, 1)[None]  # (1, C, H, W), as in training
        h, w = x.shape[-2:]
        if scale != 1.0:  # trained on images resized by preprocess.scale: predict at that size
            size = scaled_size(h, w, scale)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        bar = TileProgress(path.name)
        logits = predict_tiled(model, x, tile, overlap, multiple, blend, tta=tta, progress=bar)
        if scale != 1.0:  # a label for every pixel of the image
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        labels = predict(logits)[0].cpu().numpy().astype(np.uint8)  # (H, W) class indices

        label_path = out_dir / f"{path.stem}_label.png"
        overlay_path = out_dir / f"{path.stem}_overlay.png"
        with atomic_path(label_path) as tmp:
            img = Image.fromarray(labels)  # "L"; a palette makes it "P", values unchanged
            img.putpalette(PALETTE.tobytes())
            img.save(tmp, format="PNG")
        with atomic_path(overlay_path) as tmp:
            Image.fromarray(overlay(image, labels)).save(tmp, format="PNG")
        written += [label_path, overlay_path]

        h, w = labels.shape
        counts = np.bincount(labels.ravel(), minlength=len(class_names))
        shares = ", ".join(
            f"{n} {100 * c / labels.size:.1f}%"
            for n, c in zip(class_names, counts, strict=False)
            if c
        )
        log.info(
            "%s: %dx%d, %d tile(s) -> %s (%s)",
            path.name,
            h,
            w,
            tile_count(h, w, tile, overlap, multiple),
            label_path.name,
            shares,
        )
    how = f"tiles {tile} px, overlap {overlap}, {blend}" if tile else "whole image"
    how += f", tta {tta}" if tta != "none" else ""
    log.info(
        "predicted %d image(s) with %s (%s, %s) into %s in %.1f s",
        len(images),
        name,
        how,
        dev.type,
        out_dir,
        time.perf_counter() - start,
    )
    return written


def _select_depth(model, ckpt: dict[str, Any], model_path: Path, depth: int | None):
    """(the model, pruned to `depth` for UNet++; a name for the log)."""
    arch = ckpt["arch"]
    if depth is None:
        return model, arch
    if not hasattr(model, "prune"):
        raise PipelineError(f"{model_path}: --depth needs a UNet++, not {arch}")
    try:
        return model.prune(depth).eval(), f"{arch} L{depth}"
    except ValueError as exc:
        raise PipelineError(f"{model_path}: --depth {depth}: {exc}") from None


class TileProgress:
    """predict_tiled's progress callback: on a large image (thousands of tiles), a line every
    PROGRESS_SECONDS with the tiles done and the time left at the speed so far."""

    PROGRESS_SECONDS = 10.0

    def __init__(self, name: str):
        self.name = name
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.PROGRESS_SECONDS or done >= total:
            return
        self.last = now
        left = (now - self.start) / done * (total - done)
        log.info(
            "%s: %s of %s tiles (%d%%), about %s left",
            self.name,
            f"{done:,}",
            f"{total:,}",
            100 * done // total,
            clock(left),
        )


def _tiling(
    ckpt: dict[str, Any],
    model_path: Path,
    tile: int | None,
    overlap: int | None,
    multiple: int,
    tta: str | None = None,
) -> tuple[int, int, str, str]:
    """(tile, overlap, blend, tta): the arguments over the checkpoint's `inference` params."""
    params = ckpt.get("params") or {}
    inference = params.get("inference") or {}  # older checkpoints: whole-image prediction
    # name where a bad value came from: the argument, or the params saved with the model
    tile_from = "--tile" if tile is not None else f"{model_path}: inference.tile_size"
    overlap_from = "--overlap" if overlap is not None else f"{model_path}: inference.tile_overlap"
    tile = int(inference.get("tile_size", 0)) if tile is None else tile
    overlap = int(inference.get("tile_overlap", 0)) if overlap is None else overlap
    blend = inference.get("blend", "gaussian")
    if blend not in BLENDS:
        raise PipelineError(f"{model_path}: inference.blend {blend!r}; valid: {', '.join(BLENDS)}")
    tta_from = "--tta" if tta is not None else f"{model_path}: inference.tta"
    tta = inference.get("tta", "none") if tta is None else tta  # older checkpoints: none
    if tta not in TTA_FLIPS:
        raise PipelineError(f"{tta_from} {tta!r}; valid: {', '.join(TTA_FLIPS)}")
    if tile < 0 or tile % multiple:
        raise PipelineError(
            f"{tile_from} {tile}: must be 0 (whole image) or a multiple of {multiple}, "
            "the model's size multiple"
        )
    if overlap < 0 or (tile and overlap >= tile):
        raise PipelineError(
            f"{overlap_from} {overlap}: must lie in 0..{max(tile - 1, 0)} for tile {tile}"
        )
    return tile, overlap, blend, tta


def _normalisation(
    data: dict[str, Any], in_channels: int, model_path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's per-channel mean and std (of pixel / 255), or a one-line error."""
    mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None or len(mean) != in_channels or len(std) != in_channels:
        raise PipelineError(
            f"{model_path}: checkpoint lacks the data's mean/std for {in_channels} channel(s)"
        )
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="images to segment")
    parser.add_argument("--model", type=Path, required=True, help="checkpoint from training")
    parser.add_argument("--depth", type=int, help="UNet++: prune to the head at this depth")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument(
        "--tile", type=int, help="tile size in px, 0 = whole image (default: the checkpoint's)"
    )
    parser.add_argument(
        "--overlap", type=int, help="px shared by tiles (default: the checkpoint's)"
    )
    parser.add_argument(
        "--tta",
        choices=list(TTA_FLIPS),
        help="test-time flips, logits averaged (default: the checkpoint's inference.tta)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default="auto",
        help="where to run (default: auto, CUDA if available)",
    )
    args = parser.parse_args(argv)
    predict_files(
        args.model,
        args.images,
        args.out,
        args.depth,
        args.tile,
        args.overlap,
        args.device,
        args.tta,
    )


if __name__ == "__main__":
    run_cli(main)
