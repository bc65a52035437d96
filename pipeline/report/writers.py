"""The report's files: report.md (the blocks as GitHub Markdown, figures linked beside it) and
report.xlsx (a sheet per table); report.html is `pipeline.report.html.render_html`."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline.core import paths
from pipeline.core.common import atomic_path
from pipeline.report.content import report_blocks
from pipeline.report.html import Alert, Block, Heading, Table, Text
from pipeline.report.tables import Tables


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
