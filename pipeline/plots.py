"""Matplotlib figures shared by the training and report stages (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.common import atomic_path  # noqa: E402


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)


def learning_curves(
    logs: dict[str, pd.DataFrame], path: Path, metric: str = "val_miou", dpi: int = 110
) -> None:
    """Loss (train solid, val dashed) and a validation metric per epoch, one colour per arch."""
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (arch, df) in enumerate(logs.items()):
        color = f"C{i}"
        ax_loss.plot(df["epoch"], df["train_loss"], color=color, label=f"{arch} train")
        ax_loss.plot(df["epoch"], df["val_loss"], color=color, ls="--", label=f"{arch} val")
        ax_metric.plot(df["epoch"], df[metric], color=color, marker="o", ms=3, label=arch)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=f"Validation {metric.removeprefix('val_')}")
    for ax in (ax_loss, ax_metric):
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
