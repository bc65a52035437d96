"""Segment your own images with a trained checkpoint: a label PNG and an overlay per image.

    python -m pipeline.predict --model models/unetpp.pt [--depth 2] a.png b.jpg --out predictions/

Images of any size are predicted tile by tile as in validation (`inference` in the checkpoint's
params: mirror-padded borders, overlapping blended tiles; `--tile 0` predicts the whole image
at once; `inference.tta` or `--tta hflip|flips` averages the predictions of flipped copies).
For each image it writes `<stem>_label.png`, a palette PNG whose pixel values are the
class indices, and `<stem>_overlay.png`, the image with every non-background class blended in
its colour. Every input is read, and `--out` checked writable, before anything is written, so a
bad one leaves nothing behind; no output may replace an input.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.common import PipelineError, atomic_path, check_writable, clock, run_cli
from pipeline.inference.tiling import TTA_FLIPS
from pipeline.report.palette import label_image, overlay
from pipeline.serving.segmenter import Segmenter

log = logging.getLogger(__name__)


def check_paths(images: list[Path], out_dir: Path) -> None:
    """The inputs and --out make sense before anything is loaded: images given, no two of one
    stem, no folder among them, --out a folder (or new), and no output replacing an input."""
    if not images:
        raise PipelineError("no images given")
    stems = Counter(p.stem for p in images)
    clash = next((s for s, n in stems.items() if n > 1), None)
    if clash is not None:
        same = ", ".join(str(p) for p in images if p.stem == clash)
        raise PipelineError(f"{same}: same name {clash!r}, their outputs would overwrite")
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"{out_dir}: --out exists and is not a folder")
    folder = next((p for p in images if p.is_dir()), None)
    if folder is not None:
        raise PipelineError(f"{folder}: a folder, not an image file (give its images: {folder}/*)")
    inputs = {p.resolve(): p for p in images}
    for path in images:  # a.png's label would replace an input named a_label.png
        for output in (out_dir / f"{path.stem}_label.png", out_dir / f"{path.stem}_overlay.png"):
            if output.resolve() in inputs:
                raise PipelineError(
                    f"{inputs[output.resolve()]}: an input, and where the output of "
                    f"{path.name} would go; choose another --out"
                )


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
    check_paths(images, out_dir)

    seg = Segmenter.load(model_path, depth, device, tile=tile, overlap=overlap, tta=tta)
    # read every image once before writing: a missing or corrupt one stops the run up front
    # (read again below, so only one image is held at a time)
    for path in images:
        seg.read(path)
    check_writable(out_dir)  # a read-only or impossible --out before any prediction

    start = time.perf_counter()
    written: list[Path] = []
    for path in images:
        image = seg.read(path)  # (H, W) or (H, W, 3) uint8
        labels = seg.labels(seg.logits(image, progress=TileProgress(path.name)))  # (H, W)

        label_path = out_dir / f"{path.stem}_label.png"
        overlay_path = out_dir / f"{path.stem}_overlay.png"
        with atomic_path(label_path) as tmp:
            label_image(labels).save(tmp, format="PNG")
        with atomic_path(overlay_path) as tmp:
            Image.fromarray(overlay(image, labels)).save(tmp, format="PNG")
        written += [label_path, overlay_path]

        h, w = labels.shape
        counts = np.bincount(labels.ravel(), minlength=len(seg.class_names))
        shares = ", ".join(
            f"{n} {100 * c / labels.size:.1f}%"
            for n, c in zip(seg.class_names, counts, strict=False)
            if c
        )
        log.info(
            "%s: %dx%d, %d tile(s) -> %s (%s)",
            path.name,
            h,
            w,
            seg.tiles(h, w),
            label_path.name,
            shares,
        )
    log.info(
        "predicted %d image(s) with %s (%s, %s) into %s in %.1f s",
        len(images),
        seg.name,
        seg.how,
        seg.device.type,
        out_dir,
        time.perf_counter() - start,
    )
    return written


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
