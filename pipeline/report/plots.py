"""Matplotlib figures shared by the training and report stages (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.core.common import atomic_path  # noqa: E402


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def learning_curves(
    logs: dict[str, pd.DataFrame], path: Path, metric: str = "val_miou", dpi: int = 110
) -> None:
    """Loss (train solid, val dashed) and a validation metric per epoch, one colour per arch.
    Both losses are the final output's, computed alike (UNet++: the deepest head's).

    Every arch is drawn on the same two axes (one loss axis, one metric axis), and both panels
    share the epoch axis, so the curves compare directly."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for i, (arch, df) in enumerate(logs.items()):
        color = f"C{i}"
        ax_loss.plot(df["epoch"], df["train_loss"], color=color, label=f"{arch} train")
        ax_loss.plot(df["epoch"], df["val_loss"], color=color, ls="--", label=f"{arch} val")
        ax_metric.plot(df["epoch"], df[metric], color=color, marker="o", ms=3, label=arch)
    # train_loss is the final output's loss, as val_loss is (UNet++: its deepest head; the
    # objective it minimises, the weighted sum over its heads, is train_objective in the log)
    ax_loss.set(
        xlabel="epoch", ylabel="loss", title="Loss of the final output (UNet++: deepest head)"
    )
    ax_metric.set(xlabel="epoch", ylabel=metric, title=f"Validation {metric.removeprefix('val_')}")
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, dpi)


def pruning_tradeoff(df: pd.DataFrame, path: Path, metric: str = "miou", dpi: int = 110) -> None:
    """Quality against latency and against parameters, one point per depth labelled L1..Lk."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (col, label) in zip(
        axes, [("latency_ms", "latency (ms / image)"), ("params", "parameters")], strict=True
    ):
        ax.plot(df[col], df[metric], marker="o", color="C1")
        for _, row in df.iterrows():
            ax.annotate(
                f"L{int(row['depth'])}",
                (row[col], row[metric]),
                textcoords="offset points",
                xytext=(5, -10),
            )
        ax.set(xlabel=label, ylabel=f"test {metric}", title=f"UNet++ pruned: {metric} vs {col}")
        if col == "params":
            ax.set_xscale("log")
        ax.margins(0.12)  # room for the L1..Lk labels
        ax.grid(alpha=0.3)
    _save(fig, path, dpi)


Legend = tuple[str, list[tuple[str, tuple[int, int, int]]]]  # (title, [(label, RGB), ...])


def image_grid(
    rows: list[list[np.ndarray]],
    path: Path,
    col_titles: list[str],
    row_titles: list[str],
    legends: list[Legend] = (),
    dpi: int = 110,
    width: float = 1.7,
) -> None:
    """A grid of RGB images (one row per sample, same size within a row), column titles on
    top, row titles on the left and legends of colour swatches below, side by side. `width` is
    inches per image; row heights follow each row's aspect ratio, so the images fill the grid."""
    gap = 0.05  # between images, as a fraction of an image's width / height
    heights = [width * r[0].shape[0] / r[0].shape[1] for r in rows]
    cols = len(col_titles)
    fig, axes = plt.subplots(
        len(rows),
        cols,
        figsize=(width * (cols + gap * (cols - 1)), sum(heights) * (1 + gap)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights, "wspace": gap, "hspace": gap},
    )
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)  # bbox "tight" adds the titles
    for i, (images, ax_row) in enumerate(zip(rows, axes, strict=True)):
        for j, (image, ax) in enumerate(zip(images, ax_row, strict=True)):
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=9)
        ax_row[0].set_ylabel(row_titles[i], fontsize=9)
    for k, (title, entries) in enumerate(legends):  # first at the left, last at the right
        x = k / max(len(legends) - 1, 1)
        handles = [
            Patch(facecolor=np.array(rgb) / 255, edgecolor="0.4", label=label)
            for label, rgb in entries
        ]
        fig.legend(
            handles=handles,
            title=title,
            loc="upper left" if x == 0 else "upper right",
            bbox_to_anchor=(x, -0.01),
            ncol=2 if len(handles) <= 6 else 4,
            fontsize=8,
            title_fontsize=9,
            frameon=False,
        )
    _save(fig, path, dpi)


def note(text: str, path: Path, dpi: int = 110) -> None:
    """A small PNG holding one line of text (for a figure that was switched off)."""
    fig = plt.figure(figsize=(5, 0.6))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.3")
    _save(fig, path, dpi)
