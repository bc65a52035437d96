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
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

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


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--datasets", nargs="+", choices=sorted(ARCHIVES), default=["drive", "camvid"]
    )
    parser.add_argument("--archives", type=Path, default=PROJECT.parent / "shared" / "datasets")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--workers", type=int, default=0, help="preprocess.workers (0: one per core)"
    )
    args = parser.parse_args()

    results = {}
    for name in args.datasets:
        archive = (args.archives / ARCHIVES[name]).resolve()
        if not archive.is_file():
            sys.exit(f"{archive}: not found (pass --archives DIR)")
        runs = [one_run(name, archive, args.workers) for _ in range(args.runs)]
        results[name] = {
            "total_s": statistics.median(r["total_s"] for r in runs),
            "all_s": [round(r["total_s"], 1) for r in runs],
            "images": runs[0]["images"],
            "runs": args.runs,
            "workers": args.workers,
        }

    info = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "commit": commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
    }
    print(
        f"download + preprocess, median of {args.runs} runs; {info['machine']}; "
        f"commit {info['commit']}; {info['date']}\n"
    )
    print("| dataset | `dvc repro download preprocess` s | runs s | images train/val/test |")
    print("|---|---|---|---|")
    for name, r in results.items():
        imgs = "/".join(str(r["images"][s]) for s in ("train", "val", "test"))
        runs = ", ".join(f"{t:.1f}" for t in r["all_s"])
        print(f"| {name} | {r['total_s']:.1f} | {runs} | {imgs} |")
    if args.json:
        args.json.write_text(json.dumps({**info, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
