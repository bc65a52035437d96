"""`python -m pipeline.autoconf --budget 20m [--apply] [--json PATH]`: a recipe for the dataset
in params.yaml that fits a wall-time budget for `dvc repro` on this machine.

1. fingerprints the training data (pipeline.autoconf.fingerprint), from data/raw or straight
   from `dataset.source`, and checks a folder dataset's label values against
   `dataset.folder.mapping` (pipeline.autoconf.labels);
2. chooses by written rules (pipeline.autoconf.rules), each with its reason;
3. times the recipe on this machine with pipeline.plan and sets the widths and epochs that
   fill the budget (pipeline.autoconf.budget);
4. prints the fingerprint, the recipe and the plan; `--apply` writes it into params.yaml, as
   `pipeline.preset --apply` does (checked, atomic, comments kept), `--json` writes it all.

    uv run python -m pipeline.autoconf --budget 20m            # look first
    uv run python -m pipeline.autoconf --budget 20m --apply    # then write params.yaml
    uv run dvc repro
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.autoconf import budget, rules
from pipeline.autoconf.data import fingerprint
from pipeline.core import paths
from pipeline.core.common import PipelineError, check_output_file, clock, run_cli, write_json
from pipeline.core.config import Params, load_params, load_yaml, parse_params
from pipeline.plan import format_plan
from pipeline.preset import apply, check_keys, merge

log = logging.getLogger(__name__)

_UNITS = {"h": 3600, "m": 60, "s": 1}


def parse_budget(text: str) -> float:
    """'20m', '1h30m', '90s', '1.5h' -> seconds."""
    parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?[hms]\s*)+)\s*", text or "")
    if not parts:
        raise PipelineError(f"--budget {text!r}: a duration such as 20m, 1h30m or 90s")
    seconds = sum(
        float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", parts.group(1))
    )
    if seconds <= 0:
        raise PipelineError(f"--budget {text!r}: must be more than 0")
    return seconds


def final_plan(planned: budget.Planned) -> dict[str, Any]:
    """The plan at the chosen epochs (it was timed with one)."""
    costs, epochs = planned.costs, planned.epochs
    plan = copy.deepcopy(costs.plan)
    plan["epochs"] = epochs
    patches = planned.recipe.get("preprocess.patches_per_epoch")
    plan["data"]["patches"] = patches  # `trim` may have cut them
    for arch, a in plan["archs"].items():
        stage = f"train_{arch}"
        fixed = plan["stages"][stage] - a.get("compile_s", 0.0) - a["epoch_s"]  # test, start-up
        a["compile_s"] = costs.compile_s[arch]
        a["epoch_s"] = costs.epoch_s[arch]
        a["steps_per_epoch"] = math.ceil(patches / planned.recipe.get("batch_size"))
        plan["stages"][stage] = round(fixed + a["compile_s"] + epochs * a["epoch_s"], 1)
    plan["total"] = round(costs.total(epochs), 1)
    return plan


def autoconf(params, budget_s: float, seconds: float = 2.0) -> dict[str, Any]:
    """Everything autoconf finds and chooses, as --json writes it."""
    fp, check, read = fingerprint(params)
    kind = params.dataset.name
    if kind == "folder" and params.dataset.folder.split != "fractions":
        kind = "folder-split"  # its validation split is the user's folder
    base, counts = rules.structure(fp, kind)
    if check is not None and not check.ok:
        base.set("dataset.folder.mapping", check.proposal, check.reason)
        base.set("dataset.folder.class_names", check.class_names, "the proposal's classes")
        base.set("dataset.folder.positive", "", "the second class (index 1)")
    planned = budget.choose(fp, read, base, counts, budget_s, seconds)
    overlay = budget.finish(planned, read, budget_s)
    plan = final_plan(planned)
    overlay["autoconf"] = {
        "budget_s": float(budget_s),
        "planned_s": float(plan["total"]),
        "fingerprint": json.dumps(fp.summary(), separators=(", ", ": ")),
        "reasons": list(planned.recipe.reasons),
    }
    return {
        "budget_s": budget_s,
        "fingerprint": fp.to_json(),
        "labels": check.message() if check is not None else "",
        "overlay": overlay,
        "reasons": planned.recipe.reasons,
        "recipe": planned.recipe.shown(),
        "candidates": planned.tried,
        "plan": plan,
    }


def report(out: dict[str, Any]) -> str:
    fp = json.loads(out["overlay"]["autoconf"]["fingerprint"])
    lines = ["fingerprint of the training data:"]
    lines += [f"  {k}: {v}" for k, v in fp.items()]
    if out["labels"]:
        lines.append(f"labels: {out['labels']}")
    lines.append("recipe (key value: why):")
    lines += [f"  {r}" for r in out["recipe"]]
    lines.append("candidates: " + "; ".join(out["candidates"]))
    lines.append(format_plan(out["plan"]))
    lines.append(
        f"budget {clock(out['budget_s'])}: `dvc repro` planned at {clock(out['plan']['total'])}"
    )
    return "\n".join(lines)


def with_dataset(params: Params, source: str | None, name: str | None) -> dict[str, Any]:
    """--source / --dataset: the dataset params they set (a source alone is a folder of
    images/ and labels/); {} when neither is given."""
    if not (source or name):
        return {}
    chosen = {"name": name or ("folder" if source else params.dataset.name)}
    return chosen | ({"source": source} if source else {})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", required=True, help="wall time of dvc repro: 20m, 1h30m")
    parser.add_argument("--apply", action="store_true", help="write the recipe to params.yaml")
    parser.add_argument("--json", type=Path, help="also write everything to this JSON file")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="time spent timing steps, per candidate"
    )
    parser.add_argument(
        "--source",
        help="dataset.source to plan for (a folder or archive of images/ and labels/; sets "
        "dataset.name folder unless --dataset says otherwise); --apply writes it too",
    )
    parser.add_argument("--dataset", help="dataset.name to plan for (drive, camvid, folder)")
    args = parser.parse_args(argv)
    budget_s = parse_budget(args.budget)
    if args.json:
        check_output_file(args.json, "--json")  # before minutes of measuring
    params = load_params()
    dataset = with_dataset(params, args.source, args.dataset)
    if dataset:  # checked as params.yaml would be
        params = parse_params(merge(params.model_dump(), {"dataset": dataset}))
    out = autoconf(params, budget_s, args.seconds)
    if dataset:  # --apply writes them with the recipe (a proposed mapping among them)
        out["overlay"].setdefault("dataset", {}).update(dataset)
    sys.stdout.write(report(out) + "\n")  # the recipe and the plan are this command's output
    if args.json:
        write_json(args.json, out)
    if args.apply:
        checked = copy.deepcopy(out["overlay"])  # a mapping written whole may hold new keys
        checked.get("dataset", {}).get("folder", {}).pop("mapping", None)
        check_keys(checked, load_yaml(paths.PARAMS.read_text()) or {}, "autoconf")
        apply(out["overlay"])  # a proposed mapping replaces the old one whole
        log.info("recipe written to %s; now run: dvc repro", paths.PARAMS)
    else:
        log.info("nothing written; --apply writes the recipe to params.yaml")


if __name__ == "__main__":
    run_cli(main)
