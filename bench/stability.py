"""How stable a recipe is across seeds: the pipeline's stages run once per seed, in a temporary
copy of the project (MLflow off), and the test mIoU spread and any late-epoch collapse of the
validation curve are printed and written to reports/benchmarks/stability.{json,md}.

    uv run python bench/stability.py                       # params.yaml, seeds 1 2 3
    uv run python bench/stability.py --seeds 1 2 3 -S train.scheduler=none
    uv run python bench/stability.py --vary-data           # dataset.seed = seed as well

The seed drives what a training run draws: the crops, the initial weights, the shuffling and
the augmentation. The data (the synthetic images and the splits) follows `dataset.seed`, so
every seed is scored on the same test images; `--vary-data` sets dataset.seed to the seed
too, so the spread also holds how much the 8 synthetic test images move the score. Run it
with nothing else on the machine (two cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from bench.benchlib import environment, out_stem, parse_sets, write_outputs
from pipeline.core.common import read_json
from pipeline.preset import merge

ROOT = Path(__file__).resolve().parent.parent

STAGES = (
    ["pipeline.stages.download"],
    ["pipeline.stages.preprocess"],
    ["pipeline.stages.train", "unet"],
    ["pipeline.stages.train", "unetpp"],
)


def late_drop(val: pd.Series) -> float:
    """The largest fall of the validation metric below its best so far, over the second half
    of training (a collapse that a best-epoch checkpoint would hide)."""
    half = len(val) // 2
    best = val.cummax()
    return float((best - val).iloc[half:].max()) if len(val) > 1 else 0.0


def run_seed(seed: int, overrides: dict, workdir: Path, vary_data: bool = False) -> dict:
    shutil.copytree(ROOT / "pipeline", workdir / "pipeline")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    params["seed"] = seed
    if vary_data:
        params["dataset"]["seed"] = seed
    params["mlflow"]["enabled"] = False  # the figures, not a tracking store
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    for stage in STAGES:
        subprocess.run(
            [sys.executable, "-m", *stage], cwd=workdir, env=env, check=True, capture_output=True
        )
    row: dict = {"seed": seed}
    for arch in ("unet", "unetpp"):
        metrics = read_json(workdir / "reports" / arch / "metrics.json")
        epochs = pd.read_csv(workdir / "reports" / arch / "epochs.csv")
        row[f"{arch}_miou"] = round(metrics["miou"], 4)
        row[f"{arch}_best_epoch"] = metrics["best_epoch"]
        row[f"{arch}_late_drop"] = round(late_drop(epochs["val_miou"]), 4)
        row[f"{arch}_seconds"] = round(metrics["train_seconds"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("-S", "--set", action="append", default=[], help="key=value override")
    parser.add_argument("--vary-data", action="store_true", help="dataset.seed = seed as well")
    parser.add_argument("--out", help="output stem (default reports/benchmarks/stability)")
    args = parser.parse_args()
    overrides = parse_sets(args.set)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="stability-") as tmp:
            rows.append(run_seed(seed, overrides, Path(tmp), args.vary_data))
        print(rows[-1], flush=True)
    summary = {"seed": "spread (max - min); seconds: median"}
    for arch in ("unet", "unetpp"):
        values = [r[f"{arch}_miou"] for r in rows]
        summary[f"{arch}_miou"] = round(max(values) - min(values), 4)
        summary[f"{arch}_late_drop"] = max(r[f"{arch}_late_drop"] for r in rows)
        summary[f"{arch}_seconds"] = statistics.median(r[f"{arch}_seconds"] for r in rows)
    columns = {
        "seed": "seed",
        "unet_miou": "UNet test mIoU",
        "unetpp_miou": "UNet++ test mIoU",
        "unet_late_drop": "UNet late val drop",
        "unetpp_late_drop": "UNet++ late val drop",
        "unet_seconds": "UNet train s",
        "unetpp_seconds": "UNet++ train s",
    }
    notes = (
        "Overrides of params.yaml: "
        + (", ".join(args.set) or "none")
        + ". "
        + (
            "dataset.seed = seed: the synthetic images and splits change with the seed."
            if args.vary_data
            else "The data (dataset.seed) is the same for every seed: only the training run varies."
        )
    )
    md = write_outputs(
        out_stem(args.out, "stability"),
        "Test mIoU across seeds (default synthetic recipe)",
        environment([__import__("torch").device("cpu")]),
        [*rows, summary],
        columns,
        notes,
    )
    print(md)


if __name__ == "__main__":
    main()
