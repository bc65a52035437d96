"""The raw label values of a folder dataset against `dataset.folder.mapping`.

When the masks hold values the mapping does not list, autoconf says so and proposes the
mapping only where one reading is clear; where two are possible it names both and leaves the
choice to the user (an error with both mappings to copy), never picking one silently:

- two values: the lower is the background, the higher the foreground (0/1, 0/255, 0/38 ...),
  unless the higher covers most pixels (then either could be the object: ambiguous);
- consecutive values 0..K-1 (K <= MAX_CLASSES): class indices as they are;
- many values, nearly all near 0 and 255 (a binary mask saved lossily, as JPEG): threshold
  at 128;
- anything else, e.g. 0/128/255 (three classes, or 128 an uncertain border to ignore?):
  ambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.core.config import IGNORE_INDEX

MAX_CLASSES = 32
LOSSY = 0.99  # share of pixels within EDGE of 0 or 255 for a lossy binary mask
EDGE = 16


@dataclass
class MappingCheck:
    ok: bool  # the current mapping covers every raw value
    values: dict[int, int]  # raw value -> pixels counted
    proposal: dict[int, int] | None = None  # the one clear reading, or None
    class_names: list[str] | None = None  # names that go with the proposal
    readings: list[str] = field(default_factory=list)  # ambiguous: the readings to choose from
    reason: str = ""

    def message(self, key: str = "dataset.folder.mapping") -> str:
        shown = ", ".join(str(v) for v in sorted(self.values)[:8])
        more = " ..." if len(self.values) > 8 else ""
        if self.ok:
            return f"the label values ({shown}{more}) match {key}"
        if self.proposal is not None:
            return f"the labels hold {shown}{more}, not in {key}: {self.reason}"
        return (
            f"the labels hold {shown}{more}, not in {key}, and can be read more than one way: "
            + "; or ".join(self.readings)
            + f"; set {key} to the one you mean"
        )


def _names(k: int, current: list[str]) -> list[str]:
    if len(current) == k:
        return list(current)
    if k == 2:
        return ["background", "foreground"]
    return [f"class{i}" for i in range(k)]


def _lossy(values: dict[int, int], keys: list[int], total: int) -> bool:
    """A binary 0/255 mask saved lossily (JPEG): both extremes there, more values than a few
    meaningful ones (0/128/255 is not this), and nearly every pixel near one extreme."""
    if len(keys) <= 3 or keys[0] > EDGE or keys[-1] < 255 - EDGE:
        return False
    edges = sum(n for v, n in values.items() if v <= EDGE or v >= 255 - EDGE)
    return edges / total >= LOSSY


def check_mapping(
    values: dict[int, int], mapping: dict[int, int], class_names: list[str]
) -> MappingCheck:
    """Compare the raw label values found (value -> pixel count) with the mapping."""
    if all(v in mapping for v in values):
        return MappingCheck(True, dict(values))
    check = MappingCheck(False, dict(values))
    keys = sorted(values)
    total = sum(values.values()) or 1
    if len(keys) == 2:
        low, high = keys
        if values[high] / total > 0.5:
            check.readings = [
                f"{{{low}: 0, {high}: 1}} ({high} the object, on {values[high] / total:.0%} "
                "of the pixels)",
                f"{{{low}: 1, {high}: 0}} ({low} the object)",
            ]
            return check
        check.proposal = {low: 0, high: 1}
        share = values[high] / total
        check.reason = f"{high} the object ({share:.1%} of the pixels), {low} the background"
    elif keys == list(range(len(keys))) and len(keys) <= MAX_CLASSES:
        check.proposal = {v: v for v in keys}
        check.reason = f"{len(keys)} class indices 0..{len(keys) - 1}"
    elif _lossy(values, keys, total):
        check.proposal = {v: int(v >= 128) for v in keys}
        check.reason = "a binary mask saved lossily (values near 0 and 255): thresholded at 128"
    else:
        middle = keys[1:-1]
        check.readings = [
            "{" + ", ".join(f"{v}: {i}" for i, v in enumerate(keys)) + f"}} ({len(keys)} classes)"
        ]
        if len(keys) == 3:
            check.readings.append(
                f"{{{keys[0]}: 0, {middle[0]}: {IGNORE_INDEX}, {keys[-1]}: 1}} "
                f"({middle[0]} an uncertain border, ignored)"
            )
        return check
    check.class_names = _names(len(set(check.proposal.values())), class_names)
    return check
