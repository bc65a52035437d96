"""Stage `report`: compare UNet and UNet++ and show the pruning trade-off.

Writes reports/report.md (tables, with the PNG figures beside it), reports/report.html (the same
content as one self-contained page, figures embedded) and reports/report.xlsx (a sheet per
table) from the earlier stages' outputs; reports/panels.png shows the first `report.panels`
test images with both models' predictions and errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import paths
from pipeline.common import PipelineError, atomic_path, read_json, sha256_file, timed
from pipeline.config import (
    IGNORE_INDEX,
    InferenceParams,
    Params,
    flatten,
    parse_params,
)
from pipeline.data.loading import SplitDataset, split_dataset
from pipeline.data.manifest import Manifest, empty_classes, load_manifest
from pipeline.data.store import array_path
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.distributed import pick_device
from pipeline.inference.forward import predict
from pipeline.inference.tiling import predict_tiled
from pipeline.report import plots
from pipeline.report.html import Alert, Block, Figure, Heading, Table, Text, render_html
from pipeline.report.palette import PALETTE
from pipeline.report.recipe import budget_text, recipe_blocks, recipe_sheets, stopped_text
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared, git_commit
from pipeline.tracking.registry import Candidate, register
from pipeline.tracking.runs import is_smoke, log_to_parent, mlflow_run

log = logging.getLogger(__name__)

ARCH_NAMES = {"unet": "UNet", "unetpp": "UNet++"}
ARCH_COLUMNS = ["params", "gflops", "latency_ms", "device", "train_seconds", "best_epoch"]
QUALITY = ["miou", "dice", "global_accuracy", "mean_accuracy"]
# binary tasks (DRIVE): the usual extras
BINARY = ["sensitivity", "specificity", "precision", "auc_roc", "auc_pr"]
NAN = float("nan")  # a metric a model (or the observer) lacks; shown as "–"
PRUNING_COLUMNS = ["depth", "params", "gflops", "latency_ms", "device", "input"]

# panel colours (RGB)
IGNORED = (70, 70, 150)  # label 255, in every panel
FALSE_POSITIVE = (235, 50, 40)
FALSE_NEGATIVE = (30, 140, 255)
WRONG = (235, 50, 40)  # multi-class: any wrong class
CORRECT = (150, 150, 150)  # legend swatch; correct pixels show the image in grey


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
    """key, value, default for every param that differs from pipeline/config.py's default."""
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


SMOKE_TEXT = (
    "**Smoke test: these metrics mean nothing.** `report.smoke` is true (the `ci-cpu` preset): "
    "tiny models trained for seconds on a few small images, only to check that every stage "
    "runs. A Dice of 0.0, blank predictions and whichever model is called best below are "
    "expected and say nothing about UNet or UNet++; no model was registered."
)


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


# --- qualitative panels ----------------------------------------------------------------------


def predict_arch(
    arch: str, dataset: SplitDataset, inference: InferenceParams, device: torch.device
) -> list[np.ndarray]:
    """(H, W) uint8 class indices per image, by the pipeline's overlap-tile prediction."""
    model, _ = load_checkpoint(paths.checkpoint(arch), device)
    out = []
    for i in range(len(dataset)):
        image = dataset[i][0][None].to(device)  # (1, C, H, W) normalised
        logits = predict_tiled(
            model,
            image,
            inference.tile_size,
            inference.tile_overlap,
            model.size_multiple,
            inference.blend,
            tta=inference.tta,
        )
        size = dataset.read(i)[1].shape  # (H, W): larger than the image under preprocess.scale
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        out.append(predict(logits)[0].cpu().numpy().astype(np.uint8))
    return out


def label_colours(num_classes: int) -> np.ndarray:
    """(256, 3) uint8: binary tasks white on black, else pipeline.predict's palette; ignored
    pixels in IGNORED."""
    colours = PALETTE.copy()
    if num_classes == 2:
        colours[:2] = [(0, 0, 0), (255, 255, 255)]
    colours[IGNORE_INDEX] = IGNORED
    return colours


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image in grey, squeezed into 70..197 so colours stand out on it."""
    return np.repeat((70 + image.mean(axis=2) / 2).astype(np.uint8)[..., None], 3, axis=2)


def error_map(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, binary: bool) -> np.ndarray:
    """(H, W, 3) uint8: correct pixels show the image in grey; binary tasks colour false
    positives and false negatives, multi-class tasks any wrong class; ignored pixels IGNORED."""
    out = grey(image)
    valid = truth != IGNORE_INDEX
    if binary:
        out[valid & (pred == 1) & (truth == 0)] = FALSE_POSITIVE
        out[valid & (pred == 0) & (truth == 1)] = FALSE_NEGATIVE
    else:
        out[valid & (pred != truth)] = WRONG
    out[~valid] = IGNORED
    return out


def panel_rows(
    dataset: SplitDataset, predictions: dict[str, list[np.ndarray]], num_classes: int
) -> list[list[np.ndarray]]:
    """Per image: image | truth | each model's prediction | each model's errors (RGB)."""
    colours = label_colours(num_classes)
    rows = []
    for i in range(len(dataset)):
        image, truth = dataset.read(i)  # (H, W, C), (H', W')
        rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
        if rgb.shape[:2] != truth.shape:  # preprocess.scale: shown at the labels' size
            size = (truth.shape[1], truth.shape[0])
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        preds = [p[i] for p in predictions.values()]
        errors = [error_map(rgb, truth, p, num_classes == 2) for p in preds]
        rows.append([rgb, colours[truth], *(colours[p] for p in preds), *errors])
    return rows


def panel_legends(class_names: list[str]) -> list[plots.Legend]:
    """(title, swatches) for the label maps and for the error maps."""
    colours = label_colours(len(class_names))
    ignored = (f"ignored ({IGNORE_INDEX})", IGNORED)
    classes = [(name, tuple(int(v) for v in colours[i])) for i, name in enumerate(class_names)]
    if len(class_names) == 2:
        errors = [
            (f"false positive (extra {class_names[1]})", FALSE_POSITIVE),
            (f"false negative (missed {class_names[1]})", FALSE_NEGATIVE),
        ]
    else:
        errors = [("wrong class", WRONG)]
    return [
        ("ground truth and predictions", [*classes, ignored]),
        ("errors", [("correct (image in grey)", CORRECT), *errors, ignored]),
    ]


def panels_figure(
    manifest: Manifest, n: int, inference: InferenceParams
) -> tuple[list[list[np.ndarray]], list[str]]:
    """(panel rows, their image names) for the first n test images; runs both checkpoints,
    so a missing or corrupt one stops the stage before anything is written."""
    stems = manifest.splits["test"][:n]
    dataset = split_dataset(manifest, "test", limit=n)  # normalised as for evaluation
    device = pick_device("auto")
    predictions = {
        name: predict_arch(arch, dataset, inference, device) for arch, name in ARCH_NAMES.items()
    }
    return panel_rows(dataset, predictions, manifest.num_classes), stems


def write_panels(rows: list, stems: list[str], class_names: list[str], dpi: int) -> None:
    if not rows:  # report.panels: 0; the file is still a stage output
        plots.note("report.panels is 0: no qualitative panels", paths.PANELS_PNG, dpi)
        return
    names = list(ARCH_NAMES.values())
    titles = ["image", "ground truth", *(f"{n} prediction" for n in names)]
    titles += [f"{n} errors" for n in names]
    plots.image_grid(rows, paths.PANELS_PNG, titles, stems, panel_legends(class_names), dpi)


# --- rendering -------------------------------------------------------------------------------


def report_blocks(t: Tables) -> list[Block]:
    """The report's content, in order; rendered as Markdown and as HTML."""
    blocks: list[Block] = [Alert(SMOKE_TEXT)] if t.smoke else []
    blocks += [
        Heading("Setup"),
        Table(t.setup),
    ]
    if t.changed.empty:
        blocks.append(Text("Parameters that differ from the built-in defaults: none."))
    else:
        blocks += [
            Text("Parameters that differ from the built-in defaults (`pipeline/config.py`):"),
            Table(t.changed),
        ]
    blocks += t.recipe
    input_size = t.pruning["input"].iloc[0]
    blocks += [
        Heading("Architectures"),
        Text(
            f"Parameters and GFLOPs of one forward pass on one {input_size} test image; latency "
            "is the median of repeated forward passes on the device shown; train_seconds is "
            "the whole training stage."
        ),
        Table(t.architectures),
        Heading("Test metrics"),
        Text(
            "Metrics are computed over all non-ignored test pixels (one confusion matrix per "
            "split, never averaged per image), predicting each image full-size by "
            f"{t.inference}."
            + (
                f" Binary metrics (sensitivity, specificity, precision, F1 = Dice, AUC-ROC, "
                f"AUC-PR) treat **{t.positive}** as the positive class."
                if t.positive
                else ""
            )
        ),
        Table(t.test),
        Text(best_sentence(t.test, t.metric)),
    ]
    if t.observer is not None:
        blocks += [
            Text(
                "The second human observer's tracings, scored against the reference the same way:"
            ),
            Table(t.observer),
        ]
    if t.per_class is not None:
        blocks += [Heading("Per-class IoU"), Table(t.per_class)]
    blocks += [
        Heading("Learning curves"),
        Text(
            "Training and validation losses are both the final output's loss (for UNet++ its "
            "deepest head; the objective it minimises, the weighted sum over its heads, is "
            "train_objective in its epochs.csv), so the two curves compare directly."
        ),
        Figure(paths.LEARNING_CURVES_PNG, "Learning curves: loss and validation metric per epoch"),
        Heading("UNet++ pruned to each deep-supervision depth"),
        Text(
            "Each row is a standalone sub-network holding only the nodes its head needs; latency "
            f"is the median of repeated forward passes on one {input_size} image on "
            f"{t.pruning['device'].iloc[0]}. Best depth (the shallowest within the tolerance of "
            f"the deepest): **L{t.best_depth}**."
        ),
        Table(t.pruning_view),
        Figure(paths.PRUNING_PNG, "Pruning trade-off: quality vs latency and vs parameters"),
    ]
    if t.panels:
        blocks += [
            Heading("Qualitative results"),
            Text(
                f"The first {t.panels} test image{'s' if t.panels > 1 else ''}, predicted "
                f"full-size by {t.inference}. Predictions are shown everywhere, also "
                "where the label is ignored (no metric scores those pixels); the error maps show "
                "correct pixels as the image in grey and colour the wrong ones."
            ),
            Figure(paths.PANELS_PNG, "Test images, ground truth, predictions and errors"),
        ]
    return blocks


def winner(test: pd.DataFrame, metric: str) -> str | None:
    """The model with the best `metric`; None when no model has it (undefined: null in every
    metrics.json, e.g. Dice on test labels without a positive pixel)."""
    scores = pd.to_numeric(test[metric], errors="coerce")
    return None if scores.isna().all() else test.loc[scores.idxmax(), "model"]


def best_sentence(test: pd.DataFrame, metric: str) -> str:
    best = winner(test, metric)
    if best is None:
        return f"Best test {metric}: none, it is undefined for every model (–)."
    return f"Best test {metric}: **{best}**."


def candidate(t: Tables, tolerance: float) -> Candidate | None:
    """The model to register: the better architecture on the test split (report.metric), or
    UNet++ pruned to the best depth when its mIoU is within pruning.tolerance of that one's (the
    prune stage picks the best depth by mIoU too); None when no model has the metric."""
    name = winner(t.test, t.metric)
    if name is None:
        return None
    best = t.test.loc[t.test["model"] == name].iloc[0]
    arch = next(a for a, n in ARCH_NAMES.items() if n == best["model"])
    pruned = t.pruning.loc[t.pruning["depth"] == t.best_depth].iloc[0]
    deepest = int(t.pruning["depth"].max())
    numbers = [c for c in t.test.columns if c != "model"]
    if t.best_depth < deepest and pruned["miou"] >= best["miou"] - tolerance:
        return Candidate(
            label=f"UNet++ L{t.best_depth}",
            stage="prune",
            model=f"segmenter_L{t.best_depth}",
            checkpoint_sha256=sha256_file(paths.checkpoint("unetpp")),
            metrics={k: float(pruned[k]) for k in numbers if k in pruned and pd.notna(pruned[k])},
        )
    return Candidate(
        label=best["model"],
        stage=f"train_{arch}",
        model="segmenter",
        checkpoint_sha256=sha256_file(paths.checkpoint(arch)),
        metrics={k: float(best[k]) for k in numbers if pd.notna(best[k])},
    )


def split_hash(manifest: Manifest) -> str:
    """The test split's identity: its image names and the bytes of its full-size labels."""
    digest = hashlib.sha256(manifest.dataset.encode())
    for stem in manifest.splits["test"]:
        label = array_path("test", "labels", stem)
        digest.update(f"{stem}:{sha256_file(label)};".encode())
    return digest.hexdigest()[:16]


def title(t: Tables) -> str:
    return f"UNet vs UNet++ on {t.dataset}" + (" (smoke test)" if t.smoke else "")


def _md(df: pd.DataFrame) -> str:
    # a table of text (setup, params) stays text: "3" is a param value, not a number to format
    text = not any(pd.api.types.is_numeric_dtype(df[c]) for c in df.columns)
    shown = df.astype(object).where(df.notna(), None)  # a missing value shows as "–"
    return shown.to_markdown(
        index=False, floatfmt=".4f", intfmt=",", disable_numparse=text, missingval="–"
    )


def block_markdown(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Alert):
        return f"> [!WARNING]\n> {block.text}"
    if isinstance(block, Table):
        return _md(block.df)
    link = Path(os.path.relpath(block.path, paths.REPORT_MD.parent)).as_posix()
    return f"![{block.alt}]({link})"


def render_markdown(t: Tables) -> str:
    blocks = "\n\n".join(block_markdown(b) for b in report_blocks(t))
    smoke = " (smoke test)" if t.smoke else ""
    return f"# UNet vs UNet++ on `{t.dataset}`{smoke}\n\n{blocks}\n"


def write_xlsx(t: Tables, path: Path) -> None:
    """A sheet per table."""
    test = (
        t.test
        if t.observer is None
        else pd.concat([t.test, t.observer.rename(columns={"reference": "model"})])
    )
    logs = pd.concat([df.assign(model=name) for name, df in t.logs.items()])
    sheets = {
        "setup": t.setup,
        "changed params": t.changed,
        **t.recipe_sheets,
        "architectures": t.architectures,
        "test metrics": test,
        "per-class IoU": t.per_class,
        "pruning": t.pruning,
        "epoch logs": logs[["model", *logs.columns.drop("model")]],
    }
    with atomic_path(path) as tmp, pd.ExcelWriter(tmp, engine="openpyxl") as xl:
        for name, df in sheets.items():
            if df is not None:
                df.to_excel(xl, sheet_name=name, index=False)


# --- the stage -------------------------------------------------------------------------------


def report(params: Params) -> None:
    manifest = load_manifest()
    panels = min(params.report.panels, len(manifest.splits["test"]))
    t = gather(params, manifest, panels)  # the cheap checks first
    rows, stems = panels_figure(manifest, panels, params.inference) if panels else ([], [])
    dpi = params.report.dpi

    plots.learning_curves(t.logs, paths.LEARNING_CURVES_PNG, f"val_{t.metric}", dpi)
    plots.pruning_tradeoff(t.pruning, paths.PRUNING_PNG, t.metric, dpi)
    write_panels(rows, stems, manifest.class_names, dpi)
    with atomic_path(paths.REPORT_MD) as tmp:
        tmp.write_text(render_markdown(t))
    with atomic_path(paths.REPORT_HTML) as tmp:
        tmp.write_text(render_html(title(t), report_blocks(t)))
    write_xlsx(t, paths.REPORT_XLSX)
    log.info(
        "wrote %s",
        ", ".join(
            str(p.relative_to(paths.ROOT))
            for p in (paths.REPORT_MD, paths.REPORT_HTML, paths.REPORT_XLSX, paths.PANELS_PNG)
        ),
    )

    used = declared("report", params)  # every param: the setup table lists those changed
    with (
        timed("tracking"),
        mlflow_run(params, "report", "report", used=used, consumes="data/processed") as run,
    ):
        for _, row in t.test.iterrows():
            key = row["model"].lower().replace("+", "p")
            run.log_metrics({f"{key}_{k}": row[k] for k in QUALITY})
        files = (
            paths.REPORT_MD,
            paths.REPORT_HTML,
            paths.REPORT_XLSX,
            paths.LEARNING_CURVES_PNG,
            paths.PRUNING_PNG,
            paths.PANELS_PNG,
        )
        for f in files:
            run.log_artifact(f, artifact_path="report")
        # the execution's parent run carries the report, next to the headline metrics
        log_to_parent(run, files=files, folder="report")
        if run and params.mlflow.registered_model:
            if t.smoke:  # a model that means nothing must not take `champion`
                log.info("report.smoke: a smoke test registers no model")
            else:
                _register(params, manifest, t, run)


def _register(params: Params, manifest: Manifest, t: Tables, run) -> None:
    """The chosen model into the registry. The report is written and logged by now: a registry
    that refuses (a server where this user may not edit the registered model) is a warning,
    not a failed stage."""
    from mlflow.exceptions import MlflowException

    empty, classes = empty_classes("test")
    # binary: both classes or the scores mean nothing (all-empty masks: a "perfect" mIoU)
    if (classes == 2 and empty) or classes - len(empty) < 2:
        log.warning(
            "the test labels hold no pixel of class %s: test metrics mean nothing; no model "
            "registered",
            ", ".join(map(repr, empty)),
        )
        return
    chosen = candidate(t, params.pruning.tolerance)
    if chosen is None:
        log.warning("test %s is undefined for every model: nothing registered", t.metric)
        return
    try:
        done = register(params, chosen, manifest.dataset, split_hash(manifest), t.metric)
    except MlflowException as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        log.warning(
            "%s not registered (%s); on a server with basic auth the user needs EDIT on the "
            'registered model, or set mlflow.registered_model: "" to skip the registry',
            chosen.label,
            first,
        )
        return
    if done:
        run.set_tags({"registered_model": f"{done.name}/{done.version}", "alias": done.alias})


main = lifecycle.stage_main("report", report, __doc__)

if __name__ == "__main__":
    lifecycle.run(main)
