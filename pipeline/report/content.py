"""The report's content, in order, as blocks (`pipeline.report.html`): one list that the
Markdown and the HTML writers both render, so the two never differ."""

from __future__ import annotations

import pandas as pd

from pipeline.core import paths
from pipeline.report.html import Alert, Block, Figure, Heading, Table, Text
from pipeline.report.tables import Tables, winner

SMOKE_TEXT = (
    "**Smoke test: these metrics mean nothing.** `report.smoke` is true (the `ci-cpu` preset): "
    "tiny models trained for seconds on a few small images, only to check that every stage "
    "runs. A Dice of 0.0, blank predictions and whichever model is called best below are "
    "expected and say nothing about UNet or UNet++; no model was registered."
)


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
            Text("Parameters that differ from the built-in defaults (`pipeline/core/config.py`):"),
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


def best_sentence(test: pd.DataFrame, metric: str) -> str:
    best = winner(test, metric)
    if best is None:
        return f"Best test {metric}: none, it is undefined for every model (–)."
    return f"Best test {metric}: **{best}**."


def title(t: Tables) -> str:
    return f"UNet vs UNet++ on {t.dataset}" + (" (smoke test)" if t.smoke else "")
