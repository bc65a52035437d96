"""Benchmark: wall time of the download + preprocess stages on the real DRIVE and CamVid archives.

Each run copies the project code into a fresh temporary git + DVC repository and runs
`dvc repro download preprocess` there, so the figures include DVC, interpreter start-up, imports,
MLflow and DVC hashing the outputs (the per-stage times are the stage CLIs' own, from their
logs). Prints a markdown table of medians.

    uv run python bench/prepare_data.py      # 3 runs each, archives in ../shared/datasets
    uv run python bench/prepare_data.py --runs 5 --datasets drive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.benchlib import environment, out_stem, write_outputs

PROJECT = Path(__file__).resolve().parent.parent
ARCHIVES = {"drive": "DRIVE.zip", "camvid": "CamVid.zip"}


def run(root: Path, *args: str) -> float:
    start = time.perf_counter()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("DVC_ROOT", None)
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed in {root}:\n{proc.stderr[-2000:]}")
    return seconds


def one_run(name: str, archive: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        root = Path(tmp)
        shutil.copytree(PROJECT / "pipeline", root / "pipeline")
        shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())
        params["dataset"].update(name=name, source=str(archive))
        params["preprocess"]["workers"] = workers
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(root, "git", "init", "-q")
        run(root, sys.executable, "-m", "dvc", "init", "-q")
        total = run(root, sys.executable, "-m", "dvc", "repro", "download", "preprocess")
        manifest = json.loads((root / "data" / "processed" / "manifest.json").read_text())
    return {"total_s": total, "images": {k: len(v) for k, v in manifest["splits"].items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--datasets", nargs="+", choices=sorted(ARCHIVES), default=["drive", "camvid"]
    )
    parser.add_argument("--archives", type=Path, default=PROJECT.parent / "shared" / "datasets")
    parser.add_argument(
        "--workers", type=int, default=0, help="preprocess.workers (0: one per core)"
    )
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/prepare_data)")
    args = parser.parse_args(argv)

    rows = []
    for name in args.datasets:
        archive = (args.archives / ARCHIVES[name]).resolve()
        if not archive.is_file():
            sys.exit(f"{archive}: not found (pass --archives DIR)")
        runs = [one_run(name, archive, args.workers) for _ in range(args.runs)]
        rows.append(
            {
                "dataset": name,
                "median_s": statistics.median(r["total_s"] for r in runs),
                "runs_s": ", ".join(f"{r['total_s']:.1f}" for r in runs),
                "images": "/".join(str(runs[0]["images"][s]) for s in ("train", "val", "test")),
                "workers": args.workers,
            }
        )
    columns = {
        "dataset": "dataset",
        "median_s": "`dvc repro download preprocess` s (median)",
        "runs_s": "runs s",
        "images": "images train/val/test",
        "workers": "preprocess.workers",
    }
    title = f"Download + preprocess from the local archives, {args.runs} runs each"
    env = environment([torch.device("cpu")])
    print(write_outputs(out_stem(args.out, "prepare_data"), title, env, rows, columns))


if __name__ == "__main__":
    main()
