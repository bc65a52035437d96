"""Where a training epoch's time goes, from the epoch logs of the last training run.

    uv run dvc repro            # or any run of the training stages
    uv run python bench/epoch_profile.py [--loader-epochs 3]

Prints, per architecture, medians over the epochs of: epoch time, time waiting for data, step
compute, validation (+ MLflow logging), the per-epoch overhead (everything but the training
steps) as a share of the epoch, and loader vs step throughput in images/s. `--loader-epochs N`
also times the bare DataLoader over the training crops (no model) for N epochs per worker count,
the ceiling the loader could feed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
    return out.stdout.decode().strip() or "unknown"


def profile(arch: str) -> dict[str, float] | None:
    import pandas as pd

    from pipeline.core import paths

    path = paths.arch_reports(arch) / "epochs.csv"
    if not path.exists():
        return None
    df = pd.read_csv(path)
    med = {c: statistics.median(df[c]) for c in df.columns if c != "epoch"}
    overhead = med["seconds"] - med["data_seconds"] - med["compute_seconds"]
    return {
        "epochs": len(df),
        "epoch_s": med["seconds"],
        "data_s": med["data_seconds"],
        "compute_s": med["compute_seconds"],
        "val_s": med["val_seconds"],
        "overhead_share": overhead / med["seconds"],
        "loader_img_s": med["loader_images_per_s"],
        "step_img_s": med["step_images_per_s"],
    }


def bare_loader(epochs: int, workers: int) -> float:
    """Images/s of the training DataLoader alone (patches cut from the memory-mapped images)."""
    from torch.utils.data import DataLoader

    from pipeline.core.config import load_params
    from pipeline.data.loading import EpochSampler, train_dataset
    from pipeline.data.manifest import load_manifest

    params = load_params(complete=False)
    ds = train_dataset(load_manifest(), params)
    sampler = EpochSampler(len(ds), params.seed)
    loader = DataLoader(ds, params.batch_size, sampler=sampler, num_workers=workers)
    rates = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(batch[0]) for batch in loader)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader-epochs", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, commit {commit()}")
    print(
        "| arch | epochs | epoch s | data s | compute s | validation s | overhead share "
        "| loader img/s | step img/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in ("unet", "unetpp"):
        p = profile(arch)
        if p is None:
            print(f"| {arch} | no epoch log: run the training stage first |")
            continue
        print(
            f"| {arch} | {p['epochs']} | {p['epoch_s']:.2f} | {p['data_s']:.2f} | "
            f"{p['compute_s']:.2f} | {p['val_s']:.2f} | {p['overhead_share']:.1%} | "
            f"{p['loader_img_s']:.0f} | {p['step_img_s']:.0f} |"
        )
    for workers in (0, 2) if args.loader_epochs else ():
        rate = bare_loader(args.loader_epochs, workers)
        print(f"bare DataLoader, {workers} workers: {rate:.0f} images/s (median of epochs)")


if __name__ == "__main__":
    main()
