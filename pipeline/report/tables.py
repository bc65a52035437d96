"""The report's tables, read and checked from the earlier stages' outputs (metrics.json,
epochs.csv, pruning.csv and .json, the manifest, params) before anything is written: `gather`
returns them as one `Tables`, which `pipeline.report.content` lays out and
`pipeline.report.writers` writes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import paths
from pipeline.core.common import PipelineError, read_json
from pipeline.core.config import InferenceParams, Params, flatten, parse_params
from pipeline.data.manifest import Manifest
from pipeline.report.html import Block
from pipeline.report.recipe import budget_text, recipe_blocks, recipe_sheets, stopped_text
from pipeline.tracking.dvc import git_commit
from pipeline.tracking.runs import is_smoke

ARCH_NAMES = {"unet": "UNet", "unetpp": "UNet++"}
ARCH_COLUMNS = ["params", "gflops", "latency_ms", "device", "train_seconds", "best_epoch"]
QUALITY = ["miou", "dice", "global_accuracy", "mean_accuracy"]
# binary tasks (DRIVE): the usual extras
BINARY = ["sensitivity", "specificity", "precision", "auc_roc", "auc_pr"]
NAN = float("nan")  # a metric a model (or the observer) lacks; shown as "–"
PRUNING_COLUMNS = ["depth", "params", "gflops", "latency_ms", "device", "input"]


def quality_columns(num_classes: int) -> list[str]:
    return QUALITY + BINARY if num_classes == 2 else QUALITY


# --- inputs: every file is read (and checked) before anything is written ---------------------


def read_csv(path: Path, columns: list[str] = ()) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run the earlier stages first)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({exc})") from None
    require(path, columns, df.columns)
    return df


def require(path: Path, keys: list[str], have) -> None:
    missing = [k for k in keys if k not in have]
    if missing:
        raise PipelineError(
            f"{path}: missing {', '.join(missing)} (re-run the stage that writes it)"
        )


def arch_metrics(arch: str) -> dict[str, Any]:
    path = paths.arch_reports(arch) / "metrics.json"
    metrics = read_json(path, f"{ARCH_NAMES[arch]} test metrics")
    if not isinstance(metrics, dict):
        raise PipelineError(f"{path}: expected a JSON object of metrics")
    require(path, ARCH_COLUMNS, metrics)
    # an undefined metric is written as null (strict JSON): a number that shows as "–" here
    return {k: NAN if v is None else v for k, v in metrics.items()}


def epoch_logs(metric: str) -> dict[str, pd.DataFrame]:
    columns = ["epoch", "train_loss", "val_loss", f"val_{metric}"]
    return {
        name: read_csv(paths.arch_reports(arch) / "epochs.csv", columns)
        for arch, name in ARCH_NAMES.items()
    }


# --- tables ----------------------------------------------------------------------------------


def param_text(value: Any) -> str:
    """A param value as params.yaml would spell it (null, true, [0.25, 0.25])."""
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value)


def changed_params(params: Params) -> pd.DataFrame:
    """key, value, default for every param that differs from pipeline/core/config.py's default."""
    now, default = flatten(params), flatten(parse_params({}))
    keys = list(now) + [k for k in default if k not in now]  # e.g. a folder.mapping key
    rows = [
        {
            "key": k,
            "value": param_text(now[k]) if k in now else "(not set)",
            "default": param_text(default[k]) if k in default else "(not set)",
        }
        for k in keys
        # autoconf's fingerprint and reasons have a section of their own (Recipe)
        if (k not in now or k not in default or now[k] != default[k])
        and not k.startswith("autoconf.")
    ]
    return pd.DataFrame(rows, columns=["key", "value", "default"])


def patches_text(params: Params) -> str:
    pp = params.preprocess
    if pp.patches_per_epoch:
        return f"{pp.patches_per_epoch} of {pp.crop_size} px per epoch ({pp.sampling})"
    return (
        f"the windows of a {pp.crop_stride} px grid, {pp.crop_size} px, per epoch ({pp.sampling})"
    )


def numerics_text(metrics: dict[str, dict]) -> str:
    """How the models computed (metrics.json's `numerics`: train.amp: auto picks per machine);
    one entry when both ran alike."""
    used = {name: str(m.get("numerics", "not recorded")) for name, m in metrics.items()}
    if len(set(used.values())) == 1:
        return next(iter(used.values()))
    return "; ".join(f"{name}: {text}" for name, text in used.items())


def setup_table(
    manifest: Manifest,
    params: Params,
    generated: datetime,
    smoke: bool = False,
    numerics: str = "not recorded",
    stopped: str | None = None,
) -> pd.DataFrame:
    commit = git_commit()
    splits = ", ".join(f"{k} {len(v)}" for k, v in manifest.splits.items())
    rows = {
        **({"run": "smoke test (report.smoke): its metrics mean nothing"} if smoke else {}),
        "dataset": manifest.dataset,
        "classes": f"{manifest.num_classes} ({', '.join(manifest.class_names)})",
        "images": splits,
        "input channels": str(manifest.in_channels),
        "training patches": patches_text(params),
        "numerics": numerics,
        **({"budget": budget_text(params.autoconf)} if params.autoconf.budget_s else {}),
        **({"stopped early": stopped} if stopped else {}),
        "git commit": commit[:12] if commit else "unknown",
        "generated": f"{generated:%Y-%m-%d %H:%M} UTC",
    }
    return pd.DataFrame({"item": list(rows), "value": list(rows.values())})


def architecture_table(metrics: dict[str, dict]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"model": name, **{k: m[k] for k in ARCH_COLUMNS}} for name, m in metrics.items()]
    )


def metrics_table(metrics: dict[str, dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"model": name, **{k: m.get(k, NAN) for k in columns}} for name, m in metrics.items()]
    )


def observer_table(manifest: Manifest, columns: list[str]) -> pd.DataFrame | None:
    """DRIVE: the second human observer scored like a model, a reference no model is expected
    to pass; None for other datasets."""
    observer = manifest.second_observer
    if not observer:
        return None
    row = {"reference": "2nd human observer", **{k: observer.get(k, NAN) for k in columns}}
    return pd.DataFrame([row])


def per_class_iou(metrics: dict[str, dict], class_names: list[str]) -> pd.DataFrame:
    """Rows = classes, columns = architectures."""
    table = {"class": class_names}
    for name, m in metrics.items():
        table[name] = [m.get(f"iou_{c}", NAN) for c in class_names]
    return pd.DataFrame(table)


def pruning_view(pruning: pd.DataFrame, columns: list[str], best: int) -> pd.DataFrame:
    view = pruning[["depth", "params", "gflops", "latency_ms", *columns]].copy()
    names = [f"L{d}" + (" (best)" if d == best else "") for d in view.pop("depth")]
    view.insert(0, "model", names)
    return view


@dataclass
class Tables:
    """Everything the report shows, gathered once; rendered as md, html and xlsx."""

    dataset: str
    metric: str
    setup: pd.DataFrame
    changed: pd.DataFrame
    architectures: pd.DataFrame
    test: pd.DataFrame
    observer: pd.DataFrame | None
    per_class: pd.DataFrame | None  # multi-class only
    pruning: pd.DataFrame  # pruning.csv as written
    pruning_view: pd.DataFrame
    best_depth: int
    logs: dict[str, pd.DataFrame]
    panels: int  # rows in panels.png; 0 = none
    positive: str | None  # binary tasks: the class the binary metrics score
    inference: str  # how full-size images were predicted, in words
    recipe: list[Block] = field(default_factory=list)  # pipeline.autoconf's, if it chose
    recipe_sheets: dict[str, pd.DataFrame] = field(default_factory=dict)
    smoke: bool = False  # report.smoke: a smoke test, whose metrics mean nothing


def gather(params: Params, manifest: Manifest, panels: int) -> Tables:
    metric = params.report.metric
    columns = quality_columns(manifest.num_classes)
    metrics = {name: arch_metrics(arch) for arch, name in ARCH_NAMES.items()}
    pruning = read_csv(paths.PRUNING_CSV, [*PRUNING_COLUMNS, metric])
    prune_columns = [c for c in columns if c in pruning]
    best = read_json(paths.PRUNING_JSON, "pruning summary").get("best_depth")
    if best is None:
        raise PipelineError(f"{paths.PRUNING_JSON}: missing best_depth (re-run the prune stage)")
    multi = manifest.num_classes > 2
    smoke = is_smoke(params)
    return Tables(
        dataset=manifest.dataset,
        metric=metric,
        setup=setup_table(
            manifest,
            params,
            datetime.now(UTC),
            smoke,
            numerics_text(metrics),
            stopped_text(metrics),
        ),
        recipe=recipe_blocks(params.autoconf, params.model_dump()),
        recipe_sheets=recipe_sheets(params.autoconf, params.model_dump()),
        changed=changed_params(params),
        architectures=architecture_table(metrics),
        test=metrics_table(metrics, columns),
        observer=observer_table(manifest, columns),
        per_class=per_class_iou(metrics, manifest.class_names) if multi else None,
        pruning=pruning,
        pruning_view=pruning_view(pruning, prune_columns, best),
        best_depth=best,
        logs=epoch_logs(metric),
        panels=panels,
        positive=positive_class(manifest),
        inference=inference_text(params.inference, manifest.scale),
        smoke=smoke,
    )


def positive_class(manifest: Manifest) -> str | None:
    """The class binary metrics score: the model's sigmoid channel, class index 1."""
    if manifest.num_classes != 2:
        return None
    return manifest.positive_class or manifest.class_names[1]


TTA_TEXT = {
    "none": "",
    "hflip": ", averaged with the prediction of the horizontally flipped image",
    "flips": (
        ", averaged with the predictions of the image flipped horizontally, vertically and both"
    ),
}


def inference_text(inference: InferenceParams, scale: float = 1.0) -> str:
    if scale != 1.0:  # preprocess.scale
        return (
            f"{inference_text(inference)}, on the image resized to {scale:g}x its size (as in "
            "training), the logits upsampled to score every pixel of the full-size label"
        )
    if not inference.tile_size:
        text = "whole-image inference (one forward per image, mirror-padded to the network's size)"
    else:
        text = (
            f"overlap-tile inference ({inference.tile_size} px tiles overlapping by "
            f"{inference.tile_overlap} px, {inference.blend} blending, mirror-padded borders)"
        )
    return text + TTA_TEXT[inference.tta]


def winner(test: pd.DataFrame, metric: str) -> str | None:
    """The model with the best `metric`; None when no model has it (undefined: null in every
    metrics.json, e.g. Dice on test labels without a positive pixel)."""
    scores = pd.to_numeric(test[metric], errors="coerce")
    return None if scores.isna().all() else test.loc[scores.idxmax(), "model"]
