"""Stage `report`: compare UNet and UNet++ and show the pruning trade-off.

Writes reports/report.md (tables, with the PNG figures beside it), reports/report.html (the same
content as one self-contained page, figures embedded) and reports/report.xlsx (a sheet per
table) from the earlier stages' outputs; reports/panels.png shows the first `report.panels`
test images with both models' predictions and errors. The building blocks are in
`pipeline.report`: tables (read and checked), panels, content (the blocks, in order), writers,
candidate (which model to register); this stage wires them and logs to MLflow.
"""

from __future__ import annotations

import logging

from pipeline.core import paths
from pipeline.core.common import atomic_path, timed
from pipeline.core.config import Params
from pipeline.data.manifest import Manifest, empty_classes, load_manifest
from pipeline.report import plots
from pipeline.report.candidate import candidate, split_hash
from pipeline.report.content import report_blocks, title
from pipeline.report.html import render_html
from pipeline.report.panels import panels_figure, write_panels
from pipeline.report.tables import QUALITY, Tables, gather
from pipeline.report.writers import render_markdown, write_xlsx
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared
from pipeline.tracking.registry import register
from pipeline.tracking.runs import log_to_parent, mlflow_run

log = logging.getLogger(__name__)


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
