"""What the data layer costs as a dataset grows: time and peak memory of download, preprocess and
one training epoch for N synthetic images (issue 32's scale benchmark).

    uv run python bench/scale.py --images 1000       # RGB 512x512, 2,000 patches of 256
    uv run python bench/scale.py --images 250 --keep /tmp/scale-250

Writes N images of --size px (--channels 3 or 1: smooth shapes plus mild noise) and 0/255
masks (about a third foreground, in discs) as a folder dataset, into a temporary copy of the
project whose params.yaml takes it (`dataset.name: folder`, 70/10/20 split, --patches patches
of --crop-size per epoch whatever N is, so that only the data grows; a tiny UNet for one epoch:
this measures the data, not the model; MLflow off). Then it runs the stages download,
preprocess (once per --preprocess-workers count) and train_unet one after the other, as DVC
would (`python -m pipeline.stages.<stage>` in the copy), and reports for each: wall time, peak
RSS of the stage's process tree (sampled every 0.1 s, worker processes included) and, for
training, the time from its start to its first step (its "data ready" line); plus the size and
file count of data/processed. Writes reports/benchmarks/scale_<N>.{json,md}.

Run it with nothing else on the machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench.benchlib import environment, out_stem, write_outputs

ROOT = Path(__file__).resolve().parent.parent
STAGES = {
    "download": ["pipeline.stages.download"],
    "preprocess": ["pipeline.stages.preprocess"],
    "train_unet": ["pipeline.stages.train", "unet"],
}
READY = "data ready:"  # the training stage's line once its data is loaded


def synthetic_pair(rng: np.random.Generator, size: int, channels: int):
    """An image of smooth shapes with mild noise and its 0/255 mask (discs, ~1/3 foreground)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(6, 14)):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.14)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    layers = []
    for _ in range(channels):
        phase = rng.uniform(0, 2 * np.pi, 2)
        base = 90 + 40 * np.sin(6 * yy + phase[0]) * np.cos(5 * xx + phase[1])
        layers.append(base + 70 * mask + rng.normal(0, 4, (size, size)))
    image = np.clip(np.stack(layers, -1), 0, 255).astype(np.uint8)
    return (image[..., 0] if channels == 1 else image), mask.astype(np.uint8) * 255


def _write_pair(args: tuple) -> None:
    folder, i, size, channels, seed = args
    image, mask = synthetic_pair(np.random.default_rng([seed, i]), size, channels)
    Image.fromarray(image).save(folder / "images" / f"img{i:05d}.png", compress_level=1)
    Image.fromarray(mask).save(folder / "labels" / f"img{i:05d}.png", compress_level=1)


def write_dataset(folder: Path, n: int, size: int, channels: int, seed: int = 0) -> float:
    """N image/mask PNG pairs under folder/{images,labels} (image i from seed (seed, i), on
    every core); seconds spent."""
    import multiprocessing

    started = time.perf_counter()
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i, size, channels, seed) for i in range(n)]
    with multiprocessing.get_context("spawn").Pool() as pool:
        for _ in pool.imap_unordered(_write_pair, jobs, chunksize=16):
            pass
    return time.perf_counter() - started


def project_copy(root: Path, source: Path, args: argparse.Namespace) -> None:
    """The project's tracked files under `root`, with params.yaml taking the folder dataset."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in files:
        if rel.startswith(("pipeline/", "params.yaml", "dvc.yaml")) and (ROOT / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["epochs"] = 1
    params["dataset"].update(name="folder", source=str(source), sha256="")
    params["dataset"]["folder"].update(val_fraction=0.1, test_fraction=0.2)
    pp = params["preprocess"]
    pp.update(crop_size=args.crop_size, sampling="random", patches_per_epoch=args.patches)
    pp["border_weights"]["enabled"] = False
    params["unet"].update(base_channels=4, depth=2, encoder="none")
    params["inference"].update(tile_size=0, tta="none")  # whole images: the quickest on a CPU
    params["train"].update(num_workers=args.workers)
    params["mlflow"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (0 once it is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def set_workers(root: Path, workers: int) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["preprocess"]["workers"] = workers
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(name: str, root: Path, label: str | None = None) -> dict:
    """One stage in `root`: wall seconds, peak tree RSS (MB), seconds to its 'data ready'."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", *STAGES[name]],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready: list[float] = []
    log: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            log.append(line)
            if READY in line and not ready:
                ready.append(time.perf_counter() - started)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    reader.join()
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n{''.join(log[-30:])}")
    seconds = time.perf_counter() - started
    row = {"stage": label or name, "seconds": seconds, "peak_rss_mb": peak / 2**20}
    row["first_step_s"] = ready[0] if ready else None
    return row


def folder_size(folder: Path) -> tuple[float, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20, len(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, required=True, help="how many images (N)")
    parser.add_argument("--size", type=int, default=512, help="image side, px")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=3)
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--patches", type=int, default=2000, help="training patches per epoch")
    parser.add_argument(
        "--preprocess-workers",
        type=int,
        nargs="+",
        default=[1, 2],
        help="run preprocess once per count (the last one's output trains)",
    )
    parser.add_argument("--workers", type=int, default=0, help="train.num_workers")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/scale_<N>)")
    args = parser.parse_args(argv)
    if args.images < 5:
        sys.exit(f"--images {args.images}: at least 5 (training, validation and test images)")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        source, root = work / "source", work / "project"
        root.mkdir(parents=True, exist_ok=True)
        made = write_dataset(source, args.images, args.size, args.channels)
        print(f"{args.images} images written in {made:.0f}s (excluded)", flush=True)
        project_copy(root, source, args)
        rows = [run_stage("download", root)]
        print(f"download: {rows[-1]}", flush=True)
        for workers in args.preprocess_workers:
            set_workers(root, workers)
            label = f"preprocess ({workers} worker{'s' if workers > 1 else ''})"
            rows.append(run_stage("preprocess", root, label))
            print(f"{label}: {rows[-1]}", flush=True)
        rows.append(run_stage("train_unet", root))
        print(f"train_unet: {rows[-1]}", flush=True)
        size_mb, count = folder_size(root / "data" / "processed")
        for row in rows:
            row.update(images=args.images, processed_mb=size_mb, processed_files=count)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    columns = {
        "images": "images",
        "stage": "stage",
        "seconds": "wall s",
        "peak_rss_mb": "peak RSS MB",
        "first_step_s": "to first step s",
        "processed_mb": "data/processed MB",
        "processed_files": "files",
    }
    title = (
        f"Scale: {args.images} {'RGB' if args.channels == 3 else 'gray'} {args.size}x"
        f"{args.size} images, {args.patches} patches of {args.crop_size} px per epoch"
    )
    import torch

    env = environment([torch.device("cpu")])
    print(write_outputs(out_stem(args.out, f"scale_{args.images}"), title, env, rows, columns))


if __name__ == "__main__":
    main()
