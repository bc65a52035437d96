"""Stage `report`: compare UNet and UNet++ and show the pruning trade-off.

Writes reports/report.md (tables + two PNG plots beside it) and reports/report.xlsx (a sheet
per table) from the training and pruning stages' outputs.
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime

import pandas as pd

from pipeline import paths, plots
from pipeline.common import PipelineError, atomic_path, read_json, run_cli
from pipeline.config import Params, flatten, load_params
from pipeline.data import load_manifest
from pipeline.tracking import git_commit, mlflow_run

log = logging.getLogger(__name__)

ARCH_NAMES = {"unet": "UNet", "unetpp": "UNet++"}
QUALITY = ["miou", "dice", "global_accuracy", "mean_accuracy"]
BINARY = ["sensitivity", "specificity", "auc_roc"]  # binary tasks (DRIVE): the usual extras


def quality_columns(num_classes: int) -> list[str]:
    return QUALITY + BINARY if num_classes == 2 else QUALITY


def read_csv(path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found (run the earlier stages first)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise PipelineError(f"{path}: not a readable CSV ({exc})") from None


def comparison_table(columns: list[str] = QUALITY) -> pd.DataFrame:
    rows = []
    for arch, name in ARCH_NAMES.items():
        m = read_json(paths.arch_reports(arch) / "metrics.json", f"{name} test metrics")
        rows.append(
            {
                "model": name,
                "params": m["params"],
                "gflops": m["gflops"],
                "latency_ms": m["latency_ms"],
                **{k: m.get(k, float("nan")) for k in columns},
                "best_epoch": m["best_epoch"],
                "train_seconds": m["train_seconds"],
            }
        )
    return pd.DataFrame(rows)


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4f", intfmt=",")


def render_markdown(
    manifest: dict, comparison: pd.DataFrame, pruning: pd.DataFrame, best: int, metric: str
) -> str:
    splits = ", ".join(f"{k} {len(v)}" for k, v in manifest["splits"].items())
    commit = git_commit() or "unknown"
    columns = [c for c in quality_columns(manifest["num_classes"]) if c in pruning]
    prune_view = pruning[["depth", "params", "gflops", "latency_ms", *columns]].copy()
    prune_view.insert(
        0, "model", [f"L{d}" + (" (best)" if d == best else "") for d in prune_view.pop("depth")]
    )
    winner = comparison.loc[comparison[metric].idxmax(), "model"]
    observer = manifest.get("second_observer")
    human = ""
    if observer:  # DRIVE: the inter-observer level, a reference no model is expected to pass
        row = pd.DataFrame(
            [{"reference": "2nd human observer", **{k: observer.get(k) for k in columns}}]
        )
        human = (
            "\n\nThe second human observer's tracings, scored against the reference the same "
            f"way:\n\n{_md(row)}"
        )
    device = pruning["device"].iloc[0]
    return f"""# UNet vs UNet++ on `{manifest["dataset"]}`

Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from commit `{commit[:12]}`.
Data: {manifest["num_classes"]} classes ({", ".join(manifest["class_names"])}); images: {splits};
{len(manifest["crops"])} training crops of {manifest["crop_size"]} px. Metrics are computed over
all non-ignored test pixels (one confusion matrix per split, never averaged per image).

## Test metrics

{_md(comparison)}

Best test {metric}: **{winner}**.{human}

![Learning curves](learning_curves.png)

## UNet++ pruned to each deep-supervision depth

Each row is a standalone sub-network holding only the nodes its head needs; latency is the
median of repeated forward passes on one {pruning["input"].iloc[0]} image on {device}.
Best depth (the shallowest within the tolerance of the deepest): **L{best}**.

{_md(prune_view)}

![Pruning trade-off](pruning_tradeoff.png)
"""


def report(params: Params) -> None:
    manifest = load_manifest()
    comparison = comparison_table(quality_columns(manifest["num_classes"]))
    pruning = read_csv(paths.PRUNING_CSV)
    best = read_json(paths.PRUNING_JSON, "pruning summary")["best_depth"]
    logs = {ARCH_NAMES[a]: read_csv(paths.arch_reports(a) / "epochs.csv") for a in ARCH_NAMES}
    metric = params.report.metric

    plots.learning_curves(logs, paths.LEARNING_CURVES_PNG, f"val_{metric}", params.report.dpi)
    plots.pruning_tradeoff(pruning, paths.PRUNING_PNG, metric, params.report.dpi)
    with atomic_path(paths.REPORT_MD) as tmp:
        tmp.write_text(render_markdown(manifest, comparison, pruning, best, metric))
    with atomic_path(paths.REPORT_XLSX) as tmp, pd.ExcelWriter(tmp, engine="openpyxl") as xl:
        comparison.to_excel(xl, sheet_name="comparison", index=False)
        pruning.to_excel(xl, sheet_name="pruning", index=False)
        for name, df in logs.items():
            df.to_excel(xl, sheet_name=f"{name} epochs", index=False)
    log.info(
        "wrote %s, %s",
        paths.REPORT_MD.relative_to(paths.ROOT),
        paths.REPORT_XLSX.relative_to(paths.ROOT),
    )

    with mlflow_run(params, "report", "report") as run:
        if run:
            import mlflow

            mlflow.log_params(flatten({"report": params.report}))
            for _, row in comparison.iterrows():
                key = row["model"].lower().replace("+", "p")
                mlflow.log_metrics({f"{key}_{k}": row[k] for k in QUALITY})
            for f in (
                paths.REPORT_MD,
                paths.REPORT_XLSX,
                paths.LEARNING_CURVES_PNG,
                paths.PRUNING_PNG,
            ):
                mlflow.log_artifact(str(f), artifact_path="report")


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    report(load_params())


if __name__ == "__main__":
    run_cli(main)
