"""A finished run's outputs, written only once it is complete: models/<arch>.pt,
reports/<arch>/{epochs.csv, epochs.xlsx, curves.png, metrics.json}, and the same on its MLflow
run with the logged model and segmenter."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from pipeline.core import paths
from pipeline.core.common import (
    atomic_path,
    sha256_file,
    timed,
    write_json,
)
from pipeline.engine.checkpoint import (
    save_checkpoint,
)
from pipeline.tracking.registry import CHECKPOINT_TAG
from pipeline.tracking.runs import log_to_parent, log_torch_model

log = logging.getLogger(__name__)


def write_epoch_log(rows: list[dict[str, Any]], arch: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    out = paths.arch_reports(arch)
    with atomic_path(out / "epochs.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "epochs.xlsx") as tmp:
        df.to_excel(tmp, index=False, sheet_name=f"{arch} epochs", engine="openpyxl")
    return df


def write_outputs(arch, params, manifest, model, metrics, progress, run, example):
    """Every output is written only now, so a failed run leaves the previous ones intact."""
    from pipeline.report import plots  # matplotlib: ~0.2 s of start-up, needed only here

    df = write_epoch_log(progress.rows, arch)
    out = paths.arch_reports(arch)
    monitor = params.train.monitor
    curve_metric = "val_miou" if monitor in ("val_loss", "last") else monitor
    plots.learning_curves({arch: df}, out / "curves.png", curve_metric)
    save_checkpoint(
        paths.checkpoint(arch),
        model,
        arch=arch,
        model_config={
            "in_channels": manifest.in_channels,
            "num_classes": manifest.num_classes,
            "options": params.model(arch).model_dump(),
        },
        params=params.model_dump(),
        metrics=metrics,
        best_epoch=progress.best_epoch,
        # pipeline.predict normalises, equalises, resizes and scales 16-bit images alike
        data=manifest.checkpoint_data(),
    )
    write_json(out / "metrics.json", metrics)
    if run:
        with timed("tracking"):
            _log_outputs(arch, model, metrics, run, example)
    # the run is complete: a later run starts afresh instead of "resuming" a finished one
    paths.resume_state(arch).unlink(missing_ok=True)


def _log_outputs(arch, model, metrics, run, example) -> None:
    """The test metrics, the reports, the checkpoint and the model on the stage's MLflow run;
    the headline metrics on the execution's parent run too."""
    out = paths.arch_reports(arch)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    run.log_metrics({f"test_{k}": v for k, v in numbers.items()})
    run.set_tags({"numerics": metrics["numerics"]})  # what train.amp: auto chose here
    for f in ("epochs.csv", "epochs.xlsx", "curves.png", "metrics.json"):
        run.log_artifact(out / f, artifact_path="reports")
    run.log_artifact(paths.checkpoint(arch), artifact_path="checkpoint")
    # the registry finds this run's models by the checkpoint they were made from
    run.set_tags({CHECKPOINT_TAG: sha256_file(paths.checkpoint(arch))})
    log.info("%s logged to MLflow as %s", arch, log_torch_model(model, example))
    from pipeline.serving.pyfunc import log_segmenter  # mlflow.pyfunc: only when tracking

    segmenter = log_segmenter(paths.checkpoint(arch), paths.EXAMPLE_IMAGE)
    log.info("%s segmenter (images in, masks out) logged as %s", arch, segmenter)
    headline = ("miou", "dice", "global_accuracy", "mean_accuracy", "f1", "auc_roc")
    log_to_parent(run, {f"{arch}_test_{k}": metrics[k] for k in headline if k in metrics})
