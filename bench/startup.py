"""What the default `dvc repro` costs, stage by stage: start-up, tracking and work.

    uv run python bench/startup.py                 # a fresh clone of HEAD, 3 runs
    uv run python bench/startup.py --runs 5 --keep /tmp/startup-clone
    uv run python bench/startup.py --runs 1 --set train.amp=bf16 --out /tmp/startup-bf16

Clones the committed HEAD into a temporary folder, sets it up with the README's set-up command
(timed apart, excluded from the figures), then runs the README's `dvc repro` `--runs` times,
each from a fresh state (`git clean -fdx` but the venv: no data, outputs, DVC cache or
mlflow.db). Every stage ends with a line `<stage> done in T: start-up a, tracking b, work c`
(pipeline.core.common.run_cli): start-up is the interpreter and the imports before the stage's
code runs, tracking the MLflow calls, work the rest. What DVC spends around the stages
(starting, hashing outputs, writing dvc.lock) is the run's wall time minus the stages'.
Then a no-op `dvc repro` three times. The per-stage medians, each run's total and the
no-op time are printed and written to reports/benchmarks/startup.{json,md}; each run's
metrics are compared (timings aside) to show the runs did the same work.

`--set key=value` (repeatable) changes the clone's params.yaml as `dvc exp run -S` would,
before the first run: what another recipe would cost (its results differ, of course).

Run it with nothing else on the machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.benchlib import markdown_table, out_stem, parse_sets, readme_setup, uv_for
from bench.results import machine

ROOT = Path(__file__).resolve().parent.parent

STAGES = ("download", "preprocess", "train_unet", "train_unetpp", "prune", "report")
SPLIT = re.compile(
    r"(?P<stage>[\w-]+) done in (?P<total>[\d.]+)s: start-up (?P<startup>[\d.]+)s, "
    r"tracking (?P<tracking>[\d.]+)s, work (?P<work>[\d.]+)s"
)
# metrics that measure the machine, not the model: left out when runs are compared
TIMINGS = re.compile(r"seconds|latency|_ms$|^ms$")


def stage_splits(output: str) -> dict[str, dict[str, float]]:
    """{stage: {total, startup, tracking, work}} from a `dvc repro` output."""
    return {
        m["stage"]: {k: float(m[k]) for k in ("total", "startup", "tracking", "work")}
        for m in SPLIT.finditer(output)
    }


def results(repo: Path) -> dict:
    """The run's metrics files without their timings: equal across runs that did the same work."""

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not TIMINGS.search(k)}
        return obj

    files = ["reports/unet/metrics.json", "reports/unetpp/metrics.json", "reports/pruning.json"]
    return {f: strip(json.loads((repo / f).read_text())) for f in files}


def epoch_seconds(repo: Path) -> dict[str, float]:
    """{arch: its epochs' loading + training steps + per-epoch validation, s}, from the run's
    reports/<arch>/epochs.csv: the compute that identical results cannot skip (the per-epoch
    validation picks the best epoch), whatever start-up, tracking or DVC cost around it."""
    out = {}
    for arch in ("unet", "unetpp"):
        with open(repo / "reports" / arch / "epochs.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        keys = ("data_seconds", "compute_seconds", "val_seconds")
        out[arch] = sum(float(row[k]) for row in rows for k in keys)
    return out


def override(params: Path, sets: list[str]) -> None:
    """The committed params.yaml with `key=value` overrides, written as `dvc exp run -S` would
    (pipeline.preset.apply: DVC's own code, checked by the stages' loader): a bad key or value
    stops here, in one line, before any run."""
    from pipeline.core.common import PipelineError
    from pipeline.preset import apply

    subprocess.run(["git", "checkout", "-q", "--", params.name], cwd=params.parent, check=True)
    try:
        apply(parse_sets(sets), params)
    except PipelineError as exc:
        sys.exit(f"--set {' '.join(sets)}: {exc}")


def run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}{out.stderr}")
    return seconds, out.stdout + out.stderr


def measure(clone: Path, runs: int) -> dict:
    setup_s, _ = run(["bash", "--noprofile", "--norc", "-c", readme_setup()], clone)
    print(f"set-up (excluded): {setup_s:.0f}s", flush=True)
    dvc = [uv_for(clone), "run", "dvc"]  # the README's: stages run the venv's python
    rows, outcomes = [], []
    for i in range(runs):
        run(["git", "clean", "-fdxq", "-e", ".venv", "-e", ".uv"], clone)
        wall, output = run([*dvc, "repro"], clone)
        splits = stage_splits(output)
        missing = [s for s in STAGES if s not in splits]
        if missing:
            sys.exit(f"run {i + 1}: no time split for {missing}; is this commit instrumented?")
        staged = sum(s["total"] for s in splits.values())
        epochs = epoch_seconds(clone)
        rows.append(
            {"run": i + 1, "wall": wall, "dvc": wall - staged, "stages": splits, "epochs": epochs}
        )
        outcomes.append(results(clone))
        print(
            f"run {i + 1}: {wall:.1f}s (DVC around the stages {wall - staged:.1f}s; "
            f"epochs: UNet {epochs['unet']:.1f}s, UNet++ {epochs['unetpp']:.1f}s)",
            flush=True,
        )
    noop = [run([*dvc, "repro"], clone)[0] for _ in range(3)]
    return {"setup_s": setup_s, "runs": rows, "noop_s": noop, "same_results": outcomes}


def summarise(measured: dict) -> tuple[list[dict], dict]:
    """Per-stage medians over the runs (+ DVC and the total), and the headline figures."""
    runs = measured["runs"]
    table = []
    for stage in STAGES:
        cells = {k: statistics.median(r["stages"][stage][k] for r in runs) for k in
                 ("total", "startup", "tracking", "work")}  # fmt: skip
        table.append({"stage": stage, **cells})
    table.append(
        {"stage": "DVC around the stages", "total": statistics.median(r["dvc"] for r in runs)}
    )
    fixed = {k: sum(row.get(k, 0.0) for row in table[:-1]) for k in ("startup", "tracking")}
    walls = [r["wall"] for r in runs]
    table.append({"stage": "**dvc repro**", "total": statistics.median(walls), **fixed,
                  "work": statistics.median(sum(r["stages"][s]["work"] for s in STAGES)
                                            for r in runs)})  # fmt: skip
    first = measured["same_results"][0]
    headline = {
        "median_s": statistics.median(walls),
        "walls_s": [round(w, 1) for w in walls],
        "noop_median_s": statistics.median(measured["noop_s"]),
        "setup_s": round(measured["setup_s"], 1),
        "identical_results": all(r == first for r in measured["same_results"]),
        "epochs_median_s": {
            arch: statistics.median(r["epochs"][arch] for r in runs) for arch in ("unet", "unetpp")
        },
        "unet_test_miou": first["reports/unet/metrics.json"]["miou"],
        "unetpp_test_miou": first["reports/unetpp/metrics.json"]["miou"],
        # what train.amp auto chose on this machine (runs before it was recorded: unknown)
        "numerics": first["reports/unetpp/metrics.json"].get("numerics", "not recorded"),
    }
    return table, headline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="clone here and keep it (default: a temp dir)")
    parser.add_argument("--out", help="output stem (default reports/benchmarks/startup)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another run's startup.json (same machine): its figures and the ratios beside ours",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="as dvc exp run -S"
    )
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True, check=True).stdout.strip()  # fmt: skip
    tmp = None if args.keep else Path(tempfile.mkdtemp(prefix="startup-"))
    clone = args.keep or tmp / "project"
    try:
        if not (clone / ".git").is_dir():
            subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "fetch", "-q", str(ROOT), "HEAD"], cwd=clone, check=True)
        subprocess.run(["git", "checkout", "-q", "--detach", commit], cwd=clone, check=True)
        if args.set:
            override(clone / "params.yaml", args.set)
        measured = measure(clone, args.runs)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    table, headline = summarise(measured)
    env = {
        "machine": machine(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "set": args.set,
        "threads": os.environ.get("OMP_NUM_THREADS", "torch's default (one per core)"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),  # an older CPU stood in
    }
    stem = out_stem(args.out, "startup")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(
        json.dumps({**env, **headline, "table": table, **measured}, indent=2) + "\n"
    )
    m, epochs = env["machine"], headline["epochs_median_s"]
    cap = env["onednn_max_cpu_isa"]
    isa = f"ONEDNN_MAX_CPU_ISA={cap} " if cap else ""
    columns = {"stage": "stage", "total": "wall s", "startup": "start-up s",
               "tracking": "tracking s", "work": "work s"}  # fmt: skip
    md = "\n".join(
        [
            "### The default `dvc repro`: start-up, tracking and work per stage",
            "",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'}; "
            f"commit `{commit}`, {env['date']}",
            f"- command: `{isa}python bench/startup.py --runs {args.runs}"
            f"{''.join(f' --set {kv}' for kv in args.set)}` (a fresh clone, set-up "
            f"excluded: {headline['setup_s']:.0f}s; each run from a clean state)",
            f"- `dvc repro`: median **{headline['median_s']:.1f}s** of runs "
            f"{', '.join(f'{w:.1f}s' for w in headline['walls_s'])}; no-op `dvc repro` "
            f"median {headline['noop_median_s']:.1f}s",
            f"- results identical across runs (timings aside): {headline['identical_results']}; "
            f"test mIoU UNet {headline['unet_test_miou']:.4f}, "
            f"UNet++ {headline['unetpp_test_miou']:.4f}",
            f"- numerics (train.amp auto on this machine): {headline['numerics']}",
            f"- the two models' epochs alone (loading, training steps and per-epoch validation, "
            f"summed from reports/*/epochs.csv): median **{sum(epochs.values()):.1f}s** "
            f"(UNet {epochs['unet']:.1f}s, UNet++ {epochs['unetpp']:.1f}s), a floor for any "
            "change that keeps the results identical",
            *versus(args.baseline, headline),
            "",
            "Medians per stage. start-up: interpreter and imports before the stage's code; "
            "tracking: MLflow; work: the rest.",
            "",
            markdown_table(table, columns),
            "",
        ]
    )
    stem.with_suffix(".md").write_text(md)
    print(md)


def versus(baseline: Path | None, headline: dict) -> list[str]:
    """A line comparing this run with `baseline` (another startup.json): its figures, ours,
    and the speed-ups (its time / ours)."""
    if baseline is None:
        return []
    other = json.loads(baseline.read_text())
    ours, theirs = sum(headline["epochs_median_s"].values()), sum(other["epochs_median_s"].values())
    return [
        f"- against `{baseline.name}` (commit `{other['commit']}`, {other['date']}, "
        f"numerics: {other.get('numerics', 'not recorded')}): `dvc repro` "
        f"{other['median_s']:.1f}s -> {headline['median_s']:.1f}s "
        f"(**x{other['median_s'] / headline['median_s']:.2f}**), the epochs "
        f"{theirs:.1f}s -> {ours:.1f}s (x{theirs / ours:.2f}), test mIoU UNet "
        f"{other['unet_test_miou']:.4f} -> {headline['unet_test_miou']:.4f}, UNet++ "
        f"{other['unetpp_test_miou']:.4f} -> {headline['unetpp_test_miou']:.4f}"
    ]


if __name__ == "__main__":
    main()
