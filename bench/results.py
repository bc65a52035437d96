"""Results regenerated from runs, never typed: run the pipeline (optionally with a preset), time
each stage, and write what it scored to reports/results/.

    # apply a preset, run `dvc repro` timed stage by stage, then collect
    uv run python bench/results.py run --preset drive-cpu --source ../shared/datasets/DRIVE.zip
    # a recipe picked by hand: a YAML overlay of params.yaml (kept as runs/<name>.overlay.yaml)
    uv run python bench/results.py run --overlay my-recipe.yaml --name cvc-hand-20m
    # collect a finished run (reports/, data/processed/manifest.json, dvc.lock, the timing log)
    uv run python bench/results.py collect --name drive-cpu --log reports/results/runs/drive-cpu.log
    # rewrite reports/results/README.md from the JSON files there
    uv run python bench/results.py index

`run` first records `python -m pipeline.plan --json` (the estimate), then runs `dvc repro`,
stamping every line of its output with the time: a stage's wall time runs from DVC's
"Running stage" line to the next one (DVC's own bookkeeping included, as a user sees it).
`collect` checks that the metrics files are the ones dvc.lock records, then writes
reports/results/<name>.json (dataset, preset, commit, machine, wall time per stage, the
estimate, test metrics of UNet, UNet++ and every pruned depth, DRIVE's second observer,
per-class IoU) and regenerates reports/results/README.md from every JSON file there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import paths
from pipeline.core.common import PipelineError, clock, run_cli, write_json

ROOT = Path(__file__).resolve().parent.parent


def out_dir() -> Path:
    return paths.REPORTS / "results"


STAGES = ("download", "preprocess", "train_unet", "train_unetpp", "prune", "report")
STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")
# the test metrics a table shows, in this order (those a dataset has)
HEADLINE = ("miou", "f1", "auc_roc", "global_accuracy", "mean_accuracy", "sensitivity",
            "specificity", "precision", "auc_pr")  # fmt: skip


def sh(*cmd: str) -> str:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()


def commit() -> str:
    sha = sh("git", "rev-parse", "--short", "HEAD") or "unknown"
    # the code that ran; params.yaml differs by design (a preset applied), and its values are
    # in the result itself
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no", "--", "pipeline", "bench",
               "dvc.yaml")  # fmt: skip
    return f"{sha}+dirty" if dirty else sha


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") if Path("/proc/cpuinfo").is_file() else open(os.devnull) as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = (
        sh("nvidia-smi", "--query-gpu=name", "--format=csv,noheader") if _has("nvidia-smi") else ""
    )
    memory = None
    if Path("/proc/meminfo").is_file():
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = round(kb / 2**20, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "gpu": gpu or None,
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
    }


def _has(tool: str) -> bool:
    return any((Path(p) / tool).is_file() for p in os.environ.get("PATH", "").split(os.pathsep))


# --- timing a run ------------------------------------------------------------------------------


def stage_seconds(log_path: Path) -> dict[str, float]:
    """Wall seconds per stage from a timed log ("<epoch seconds> <line>" per line)."""
    marks: list[tuple[str | None, float]] = []
    last = None
    for line in log_path.read_text().splitlines():
        stamp, _, text = line.partition(" ")
        try:
            t = float(stamp)
        except ValueError:
            continue
        last = t
        m = STAGE_LINE.search(text)
        if m:
            marks.append((m.group(1), t))
    if not marks or last is None:
        raise PipelineError(f'{log_path}: no "Running stage" line: not a timed dvc repro log')
    marks.append((None, last))
    return {
        name: round(end - start, 1)
        for (name, start), (_, end) in zip(marks, marks[1:], strict=False)
        if name is not None
    }


def timed_run(cmd: list[str], log_path: Path) -> int:
    """Run `cmd`, echoing its output and writing it to `log_path` with a timestamp per line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        shown = ["python" if c == sys.executable else c for c in cmd]  # no local paths
        log.write(f"{time.time():.3f} $ {' '.join(shown)}\n")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(f"{time.time():.3f} {line}")
            log.flush()
        code = proc.wait()
        log.write(f"{time.time():.3f} exit {code}\n")
    return code


# --- collecting a run --------------------------------------------------------------------------


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - DVC's own file hash


def locked_outputs() -> dict[str, str]:
    """{path: md5} of every stage output dvc.lock records."""
    lock_path = paths.ROOT / "dvc.lock"
    if not lock_path.is_file():
        raise PipelineError("dvc.lock not found: run `dvc repro` (or bench/results.py run) first")
    lock = yaml.safe_load(lock_path.read_text())
    return {
        out["path"]: out.get("md5", "")
        for stage in lock.get("stages", {}).values()
        for out in stage.get("outs", [])
    }


def read_locked(rel: str, locked: dict[str, str]) -> Any:
    """A JSON/CSV output of the run, refused unless it is the one dvc.lock recorded."""
    path = paths.ROOT / rel
    if rel not in locked:
        raise PipelineError(f"{rel}: not an output in dvc.lock")
    if not path.is_file():
        raise PipelineError(f"{rel}: missing (run the pipeline first)")
    if _md5(path) != locked[rel]:
        raise PipelineError(f"{rel}: differs from dvc.lock (outputs of another run?): re-run")
    if rel.endswith(".json"):
        return json.loads(path.read_text())
    import pandas as pd

    return pd.read_csv(path).to_dict("records")


def _pick(metrics: dict[str, Any], keys=HEADLINE) -> dict[str, float]:
    return {k: metrics[k] for k in keys if isinstance(metrics.get(k), int | float)}


def training_patches(params, log_path: Path | None) -> int | None:
    """Training patches per epoch: the param, or (0: the grid's count) the number the training
    stage's "data ready" line gave in the run's log."""
    if params.preprocess.patches_per_epoch:
        return params.preprocess.patches_per_epoch
    if log_path is not None and log_path.is_file():
        found = re.search(r"data ready: (\d+) training patches", log_path.read_text())
        if found:
            return int(found.group(1))
    return None


def training_data(result: dict[str, Any]) -> str:
    if "training_patches" not in result:  # runs from before patches were sampled
        return f"{result['training_crops']} training crops (cut once by preprocess)"
    sampling = result["params"].get("sampling", "random")
    n = result["training_patches"]
    return f"{n if n else 'grid-many'} training patches per epoch ({sampling})"


def budgeted(params, locked: dict[str, str]) -> dict[str, Any]:
    """An autoconf run's budget, plan and reasons, and the stages that stopped at their time
    limit (both absent otherwise)."""
    out: dict[str, Any] = {}
    stopped = {}
    for arch in ("unet", "unetpp"):
        why = read_locked(f"reports/{arch}/metrics.json", locked).get("stopped_early")
        if why:
            stopped[arch] = why
    if stopped:
        out["stopped_early"] = stopped
    if params.autoconf.budget_s:
        out["autoconf"] = {
            "budget_s": params.autoconf.budget_s,
            "planned_s": params.autoconf.planned_s,
            "reasons": params.autoconf.reasons,
        }
    return out


def collect(name: str, log_path: Path | None, plan_path: Path | None) -> dict[str, Any]:
    from pipeline.core.config import load_params

    params = load_params(complete=False)
    locked = locked_outputs()
    manifest = json.loads(paths.MANIFEST.read_text())
    archs = {}
    for arch in ("unet", "unetpp"):
        m = read_locked(f"reports/{arch}/metrics.json", locked)
        archs[arch] = {
            "test": _pick(m),
            "per_class_iou": {c: m[f"iou_{c}"] for c in manifest["class_names"] if f"iou_{c}" in m},
            "best_epoch": m.get("best_epoch"),
            "params": m.get("params"),
            "gflops": m.get("gflops"),
            "latency_ms": m.get("latency_ms"),
            "input": m.get("input"),
        }
    depths = [
        {
            "depth": int(r["depth"]),
            **_pick(r),
            "params": int(r["params"]),
            "gflops": r["gflops"],
            "latency_ms": r["latency_ms"],
        }
        for r in read_locked("reports/pruning.csv", locked)
    ]
    observer = manifest.get("second_observer")
    result: dict[str, Any] = {
        "name": name,
        "dataset": manifest["dataset"],
        "classes": manifest["class_names"],
        "positive_class": manifest.get("positive_class"),
        "splits": {s: len(v) for s, v in manifest["splits"].items()},
        "training_patches": training_patches(params, log_path),
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "commit": commit(),
        "machine": machine(),
        "params": {
            "epochs": params.epochs,
            "batch_size": params.batch_size,
            "lr": params.lr,
            "crop_size": params.preprocess.crop_size,
            "sampling": params.preprocess.sampling,
            "patches_per_epoch": params.preprocess.patches_per_epoch,
            "foreground": params.preprocess.foreground,
            "unet": params.unet.model_dump(),
            "unetpp": params.unetpp.model_dump(),
            "scheduler": params.train.scheduler,
            "amp": params.train.amp,
        },
        "archs": archs,
        "pruned": depths,
        "best_depth": read_locked("reports/pruning.json", locked).get("best_depth"),
        "second_observer": _pick(observer) if observer else None,
    }
    result.update(budgeted(params, locked))
    if log_path is not None:
        seconds = stage_seconds(log_path)
        result["stage_seconds"] = seconds
        result["wall_seconds"] = round(sum(seconds.values()), 1)
        result["command"] = log_path.read_text().splitlines()[0].split(" $ ", 1)[-1]
    if plan_path is not None and plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        result["plan_seconds"] = plan["stages"]
        if "stage_seconds" in result:
            result["plan_ratio"] = {
                s: round(plan["stages"][s] / t, 2)
                for s, t in result["stage_seconds"].items()
                if s in plan["stages"] and t > 0
            }
            result["plan_ratio"]["total"] = round(plan["total"] / result["wall_seconds"], 2)
    return result


# --- the README ----------------------------------------------------------------------------------


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    hw = f"{m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
    lines = [
        f"## {result['name']}: {result['dataset']}",
        "",
        (f"Preset `{result['preset']}`. " if result.get("preset") else "")
        + autoconf_text(result)
        + f"Commit `{result['commit']}`, {result['date']}, on {hw}."
        + (f" Command: `{result['command']}`." if result.get("command") else ""),
        f"Splits {result['splits']}, {training_data(result)}; "
        f"{result['params']['epochs']} epochs, batch {result['params']['batch_size']}, "
        f"lr {result['params']['lr']} ({result['params']['scheduler']}).",
    ]
    if result.get("positive_class"):
        lines.append(
            f"Binary metrics (F1, AUC, sensitivity, precision) treat "
            f"**{result['positive_class']}** as the positive class."
        )
    keys = [k for k in HEADLINE if k in result["archs"]["unetpp"]["test"]]
    lines += ["", "### Test metrics", "", _row(["model", *keys, "params", "GFLOPs", "ms"]),
              _row(["---"] * (len(keys) + 4))]  # fmt: skip
    for arch, a in result["archs"].items():
        name = {"unet": "UNet", "unetpp": "UNet++ (L4)"}.get(arch, arch)
        cells = [_fmt(a["test"].get(k, "")) for k in keys]
        lines.append(_row([name, *cells, f"{a['params']:,}", a["gflops"], a["latency_ms"]]))
    for d in result["pruned"]:
        cells = [_fmt(d.get(k, "")) for k in keys]
        lines.append(_row([f"UNet++ pruned L{d['depth']}", *cells, f"{d['params']:,}",
                           d["gflops"], d["latency_ms"]]))  # fmt: skip
    if result.get("second_observer"):
        obs = result["second_observer"]
        lines.append(_row(["second human observer", *[_fmt(obs.get(k, "")) for k in keys],
                           "", "", ""]))  # fmt: skip
    lines.append("")
    lines.append(
        f"Latency: one full-size image ({result['archs']['unet']['input']}), batch 1, "
        "median; best pruned depth: " + f"L{result['best_depth']}."
    )
    classes = result["archs"]["unet"]["per_class_iou"]
    if len(classes) > 2:
        lines += ["", "### Per-class IoU", "", _row(["model", *classes]),
                  _row(["---"] * (len(classes) + 1))]  # fmt: skip
        for arch, a in result["archs"].items():
            lines.append(_row([arch, *[_fmt(a["per_class_iou"][c]) for c in classes]]))
    if result.get("stage_seconds"):
        lines += ["", "### Wall time", "", _row(["stage", "actual", "planned", "plan / actual"]),
                  _row(["---"] * 4)]  # fmt: skip
        plan = result.get("plan_seconds", {})
        ratio = result.get("plan_ratio", {})
        for stage, t in result["stage_seconds"].items():
            planned = clock(plan[stage]) if stage in plan else ""
            lines.append(_row([stage, clock(t), planned, ratio.get(stage, "")]))
        total_plan = clock(sum(plan.values())) if plan else ""
        lines.append(_row(["**total**", clock(result["wall_seconds"]), total_plan,
                           ratio.get("total", "")]))  # fmt: skip
    return "\n".join(lines) + "\n"


def autoconf_text(result: dict[str, Any]) -> str:
    """The budget, the plan and the actual wall time of an autoconf run."""
    ac = result.get("autoconf")
    if not ac:
        return ""
    text = f"Recipe by `pipeline.autoconf` for a {clock(ac['budget_s'])} budget, planned at "
    text += clock(ac["planned_s"])
    if result.get("wall_seconds"):
        share = result["wall_seconds"] / ac["budget_s"]
        text += f", ran in {clock(result['wall_seconds'])} ({share:.0%} of the budget)"
    stopped = result.get("stopped_early")
    text += "; " + "; ".join(f"{a} {why}" for a, why in stopped.items()) if stopped else ""
    return text + ". "


def index() -> Path:
    """reports/results/README.md from every result JSON in the folder, newest first."""
    results = [json.loads(p.read_text()) for p in sorted(out_dir().glob("*.json"))]
    results.sort(key=lambda r: r["date"], reverse=True)
    head = [
        "# Results on real data",
        "",
        "Written by `bench/results.py` from the runs' own outputs (reports/, dvc.lock, the",
        "timed `dvc repro` log): never typed by hand. One section per run; each JSON file next",
        "to this one holds the same figures.",
        "",
    ]
    body = [render(r) for r in results] or ["No results yet.\n"]
    path = out_dir() / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head) + "\n" + "\n".join(body))
    return path


def run_autoconf(name: str, budget: str, dataset: str, source: str, plan_path: Path) -> None:
    """params.yaml's dataset set to `dataset` from `source`, then the recipe pipeline.autoconf
    plans for `budget`; its plan is the run's plan (a folder dataset has no plan before
    preprocess has run)."""
    from pipeline.preset import apply

    if not (dataset and source):
        raise PipelineError("--autoconf needs --dataset and --source")
    apply({"dataset": {"name": dataset, "source": source}})
    found = out_dir() / "runs" / f"{name}.autoconf.json"
    found.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline.autoconf", "--budget", budget, "--apply"]
    subprocess.run([*cmd, "--json", str(found)], cwd=ROOT, check=True)
    write_json(plan_path, json.loads(found.read_text())["plan"])


def run_overlay(name: str, overlay: Path) -> None:
    """A hand-picked recipe: params.yaml with the YAML `overlay` applied (checked, as a preset
    is), a copy kept next to the run's log, and the data prepared so that pipeline.plan can
    time it (a folder dataset has no plan before preprocess has run; `run` re-runs it timed)."""
    from pipeline.preset import apply

    try:
        text = overlay.read_text()
    except OSError as exc:
        raise PipelineError(f"--overlay {overlay}: {exc.strerror}") from None
    recipe = yaml.safe_load(text)
    if not isinstance(recipe, dict):
        raise PipelineError(f"--overlay {overlay}: expected a YAML mapping of params")
    apply(recipe)
    kept = out_dir() / "runs" / f"{name}.overlay.yaml"
    kept.parent.mkdir(parents=True, exist_ok=True)
    if kept.resolve() != overlay.resolve():
        kept.write_text(text)
    subprocess.run([sys.executable, "-m", "dvc", "repro", "preprocess"], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="(apply a preset,) plan, dvc repro timed, collect")
    run.add_argument("--preset", help="a preset to apply first (pipeline/presets/)")
    run.add_argument("--source", help="dataset.source for the preset")
    run.add_argument("--name", help="result name (default: the preset, else 'default')")
    run.add_argument("--force", action="store_true", help="re-run every stage (dvc repro -f)")
    run.add_argument(
        "--autoconf",
        metavar="BUDGET",
        help="instead of a preset: set --dataset and --source, then pipeline.autoconf --budget "
        "BUDGET --apply (e.g. 20m)",
    )
    run.add_argument("--dataset", help="dataset.name for --autoconf (drive, camvid, folder)")
    run.add_argument(
        "--overlay", type=Path, help="instead of a preset: a YAML of params to apply (by hand)"
    )
    col = sub.add_parser("collect", help="collect a finished run")
    col.add_argument("--name", required=True)
    col.add_argument("--log", type=Path, help="the timed dvc repro log (wall time per stage)")
    col.add_argument("--plan", type=Path, help="pipeline.plan --json output")
    sub.add_parser("index", help="rewrite reports/results/README.md")
    args = parser.parse_args(argv)

    if args.command == "index":
        print(index())
        return
    if args.command == "collect":
        result = collect(args.name, args.log, args.plan)
    else:
        name = args.name or args.preset or "default"
        py = sys.executable
        plan_path = out_dir() / "runs" / f"{name}.plan.json"
        if sum(map(bool, (args.autoconf, args.preset, args.overlay))) > 1:
            raise PipelineError("give one of --preset, --autoconf, --overlay: each sets the recipe")
        if args.overlay:
            if not args.name:
                raise PipelineError("--overlay needs --name")
            run_overlay(name, args.overlay)
        if args.autoconf:
            run_autoconf(name, args.autoconf, args.dataset, args.source, plan_path)
        elif args.preset:
            cmd = [py, "-m", "pipeline.preset", args.preset, "--apply"]  # params.yaml only
            if args.source:
                cmd += ["--source", args.source]
            subprocess.run(cmd, cwd=ROOT, check=True)
        if not args.autoconf:
            cmd = [py, "-m", "pipeline.plan", "--json", str(plan_path)]
            subprocess.run(cmd, cwd=ROOT, check=True)
        log_path = out_dir() / "runs" / f"{name}.log"
        code = timed_run([py, "-m", "dvc", "repro", *(["--force"] if args.force else [])], log_path)
        if code:
            raise PipelineError(f"dvc repro exited with status {code}; see {log_path}")
        result = collect(name, log_path, plan_path)
        if args.preset:
            result["preset"] = args.preset
            result["command"] = f"python -m pipeline.preset {args.preset} --apply; dvc repro"
        if args.overlay:
            result["command"] = (
                f"reports/results/runs/{name}.overlay.yaml applied (pipeline.preset.apply); "
                "dvc repro"
            )
        if args.autoconf:
            result["command"] = (
                f"dataset.name {args.dataset}, dataset.source {args.source}; python -m "
                f"pipeline.autoconf --budget {args.autoconf} --apply; dvc repro"
            )
    write_json(out_dir() / f"{result['name']}.json", result)
    print(index())


if __name__ == "__main__":
    run_cli(main)
