"""The report's content as blocks (heading, text, table, figure) and their HTML rendering.

The page is self-contained: inline CSS, every figure embedded as a base64 PNG data URI, no
scripts and no external links, so it reads the same offline and as an MLflow artifact.
Text blocks use two bits of Markdown, **bold** and `code`, so the Markdown report renders the
same blocks as they are.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    text: str  # **bold** and `code` allowed


@dataclass(frozen=True)
class Alert:
    text: str  # shown boxed (html) or quoted (md) where it cannot be missed; **bold**, `code`


@dataclass(frozen=True)
class Table:
    df: pd.DataFrame


@dataclass(frozen=True)
class Figure:
    path: Path  # a PNG beside the report
    alt: str


Block = Heading | Text | Alert | Table | Figure

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  max-width: 1100px; margin: 2em auto; padding: 0 1.2em; color: #1f2328; line-height: 1.5; }
h1 { font-size: 1.7em; border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
code { background: #f2f4f7; padding: .1em .35em; border-radius: 4px; font-size: .92em; }
.table-wrap { overflow-x: auto; margin: .8em 0 1.2em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #d0d7de; padding: .35em .6em; }
td { white-space: nowrap; }
th { background: #eef1f4; text-align: left; vertical-align: bottom; }
tbody tr:nth-child(even) { background: #f7f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0 1.5em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e7eb; }
figcaption { font-size: .85em; color: #57606a; }
.alert { border: 2px solid #cf222e; background: #ffebe9; padding: .7em 1em; border-radius: 6px; }
"""


def inline(text: str) -> str:
    """Escaped text with **bold** and `code` turned into <strong> and <code>."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def cell(value) -> str:
    """A table cell's text: floats to 4 decimals, integers with thousands separators."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    if isinstance(value, numbers.Real):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


def table(df: pd.DataFrame) -> str:
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    # a long name may wrap after an underscore (global_<wbr>accuracy): wide tables fit the page
    head = "".join(f"<th>{html.escape(str(c)).replace('_', '_<wbr>')}</th>" for c in df.columns)
    rows = []
    for values in df.itertuples(index=False):
        tds = "".join(
            f'<td class="num">{cell(v)}</td>' if num else f"<td>{cell(v)}</td>"
            for v, num in zip(values, numeric, strict=True)
        )
        rows.append(f"<tr>{tds}</tr>")
    body = "\n".join(rows)
    return (
        f'<div class="table-wrap"><table>\n<thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def figure(fig: Figure) -> str:
    alt = html.escape(fig.alt, quote=True)
    return (
        f'<figure><img src="{data_uri(fig.path)}" alt="{alt}">'
        f"<figcaption>{alt}</figcaption></figure>"
    )


def block_html(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{inline(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        return f"<p>{inline(block.text)}</p>"
    if isinstance(block, Alert):
        return f'<p class="alert" role="alert">{inline(block.text)}</p>'
    if isinstance(block, Table):
        return table(block.df)
    return figure(block)


def render_html(title: str, blocks: list[Block]) -> str:
    body = "\n".join(block_html(b) for b in blocks)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{body}
</body>
</html>
"""
