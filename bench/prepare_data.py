"""Benchmark: wall time of the download + preprocess stages on the real DRIVE and CamVid archives.

Each run copies the project code into a fresh temporary folder and runs the two stage CLIs there
as DVC would (`python -m pipeline.stages.download`, then
`python -m pipeline.stages.preprocess`), so the figures include interpreter start-up and imports.
Prints a markdown table of medians.

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
# the README's command per dataset
PREPROCESS = {
    "drive": {"crop_size": 64, "crop_stride": 32},
    "camvid": {"crop_size": 256, "crop_stride": 224},
}


def run_stage(root: Path, module: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=root, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{module} failed in {root}:\n{proc.stderr[-2000:]}")
    return seconds


def one_run(name: str, archive: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        root = Path(tmp)
        shutil.copytree(PROJECT / "pipeline", root / "pipeline")
        params = yaml.safe_load((PROJECT / "params.yaml").read_text())
        params["dataset"].update(name=name, source=str(archive))
        params["preprocess"].update(PREPROCESS[name])
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        download = run_stage(root, "pipeline.stages.download")
        preprocess = run_stage(root, "pipeline.stages.preprocess")
        manifest = json.loads((root / "data" / "processed" / "manifest.json").read_text())
    return {
        "download_s": download,
        "preprocess_s": preprocess,
        "total_s": download + preprocess,
        "images": {k: len(v) for k, v in manifest["splits"].items()},
        "crops": len(manifest["crops"]),
    }


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
    args = parser.parse_args()

    results = {}
    for name in args.datasets:
        archive = (args.archives / ARCHIVES[name]).resolve()
        if not archive.is_file():
            sys.exit(f"{archive}: not found (pass --archives DIR)")
        runs = [one_run(name, archive) for _ in range(args.runs)]
        results[name] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("download_s", "preprocess_s", "total_s")
        } | {"images": runs[0]["images"], "crops": runs[0]["crops"], "runs": args.runs}

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
    print("| dataset | download s | preprocess s | total s | images train/val/test | crops |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        imgs = "/".join(str(r["images"][s]) for s in ("train", "val", "test"))
        print(
            f"| {name} | {r['download_s']:.1f} | {r['preprocess_s']:.1f} | {r['total_s']:.1f} "
            f"| {imgs} | {r['crops']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({**info, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
