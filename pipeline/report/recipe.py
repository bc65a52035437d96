"""The report's account of a budgeted run: the recipe `python -m pipeline.autoconf` chose (its
fingerprint of the data and one reason per param, from params.yaml's `autoconf` section) and
the training stages that stopped at their time limit (metrics.json's `stopped_early`)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from pipeline.core.common import clock
from pipeline.report.html import Block, Heading, Table, Text

# `ac` below: params.autoconf (budget_s, planned_s, fingerprint, reasons); this package knows
# nothing of params


def budget_text(ac: Any) -> str | None:
    """The setup row: the budget and the plan, or None without autoconf."""
    if not ac.budget_s:
        return None
    return (
        f"pipeline.autoconf --budget {clock(ac.budget_s)}: `dvc repro` planned at "
        f"{clock(ac.planned_s)}"
    )


def stopped_text(metrics: dict[str, dict]) -> str | None:
    """The setup row: which models stopped at their time limit (budget.train_<arch>_s)."""
    stopped = {name: m["stopped_early"] for name, m in metrics.items() if m.get("stopped_early")}
    if not stopped:
        return None
    return "; ".join(f"{name}: {why}" for name, why in stopped.items())


def _lookup(values: dict[str, Any], key: str) -> str:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "(not a param)"
        node = node[part]
    return "null" if node is None else str(node)


def reasons_table(reasons: list[str], values: dict[str, Any]) -> pd.DataFrame:
    """'key: why' lines (a dotted key holds no ": ") -> a (param, value, why) table, the value
    as params.yaml has it now (`values`: the params as nested dicts)."""
    rows = []
    for line in reasons:
        key, _, why = line.partition(": ")
        rows.append({"param": key, "value": _lookup(values, key), "why": why})
    return pd.DataFrame(rows, columns=["param", "value", "why"])


def fingerprint_table(fingerprint: str) -> pd.DataFrame:
    """params.yaml's autoconf.fingerprint (one JSON object) as a (measure, value) table."""
    found = json.loads(fingerprint) if fingerprint else {}
    return pd.DataFrame({"measure": list(found), "value": [str(v) for v in found.values()]})


def recipe_sheets(ac: Any, values: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The report.xlsx sheets of the recipe; none without autoconf."""
    if not ac.budget_s:
        return {}
    return {
        "fingerprint": fingerprint_table(ac.fingerprint),
        "recipe": reasons_table(ac.reasons, values),
    }


def recipe_blocks(ac: Any, values: dict[str, Any]) -> list[Block]:
    """The report's "Recipe" section; none without autoconf."""
    if not ac.budget_s:
        return []
    return [
        Heading("Recipe"),
        Text(
            f"Chosen by `python -m pipeline.autoconf --budget {clock(ac.budget_s)}` from the "
            "training data's fingerprint and this machine's timings (the rules: "
            "`pipeline/autoconf/rules.py`); the plan put `dvc repro` at "
            f"{clock(ac.planned_s)}. The fingerprint:"
        ),
        Table(fingerprint_table(ac.fingerprint)),
        Text("Each choice and its reason:"),
        Table(reasons_table(ac.reasons, values)),
    ]
