"""The budget arithmetic: the recipe's widths and epochs from `pipeline.plan`'s timings.

`pipeline.plan.estimate` times the recipe on this machine with one epoch (real training steps
at the crop and batch, the evaluation of a full-size image of each split, every pruned depth);
a run's wall time is then linear in the epochs:

    total(E) = rest + compile(E) + E x (UNet's epoch + UNet++'s epoch)

where `rest` is everything else (start-ups, preprocessing, test scoring, pruning, report).
E is the most epochs whose total stays within the budget (TARGET); a compiled model's steps
count at plan.COMPILED_STEP of the eager rate the plan times. The widest widths
(rules.WIDTHS) that buy rules.MIN_PASSES passes over the training pixels win; else the ones
that buy the most passes in MIN_EPOCHS or more (a narrower model is not always faster on a
CPU: narrow convolutions leave cores idle). The last epoch is not left mostly unused: one
more epoch, each of fewer patches (`trim`). When even the narrowest does not fit, the budget
is too small: one line with the minimum. Each training stage gets a hard limit of its planned
time x TRAIN_SLACK (`budget.train_*_s`).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.autoconf import rules
from pipeline.autoconf.fingerprint import Fingerprint
from pipeline.autoconf.rules import EVAL_SHARE, MIN_PASSES, WIDTHS, Recipe, passes
from pipeline.core.common import PipelineError, clock
from pipeline.core.config import Params, parse_params
from pipeline.preset import merge

log = logging.getLogger(__name__)

TARGET = 1.0  # the share of the budget the plan fills: the plan is within ~5% of the actual
# time (reports/results/), and each training stage stops at TRAIN_SLACK x its planned time
MIN_EPOCHS = 3
TRAIN_SLACK = 1.15  # a training stage stops past its planned time by this factor: the +15%
# a run may take over its budget (a busier hour, a slower machine)


@dataclass
class Costs:
    """One timed candidate: each model's seconds of training steps per epoch (eager) and of
    validation per epoch, its compile, and the rest of the run."""

    steps_s: dict[str, float]
    val_s: dict[str, float]
    compile_s: dict[str, float]
    rest_s: float
    plan: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def epoch_s(self) -> dict[str, float]:
        """Seconds per epoch; a compiled model's steps at COMPILED_STEP of the eager rate."""
        from pipeline.plan import COMPILED_STEP

        return {
            a: self.steps_s[a] * (COMPILED_STEP if self.compile_s[a] else 1.0) + self.val_s[a]
            for a in self.steps_s
        }

    def per_epoch(self) -> float:
        return sum(self.epoch_s.values())

    def total(self, epochs: int) -> float:
        return self.rest_s + sum(self.compile_s.values()) + epochs * self.per_epoch()

    def epochs(self, budget_s: float) -> int:
        """The most epochs that fit TARGET x the budget."""
        room = TARGET * budget_s - self.rest_s - sum(self.compile_s.values())
        return max(0, math.floor(room / self.per_epoch()))


@dataclass
class Planned:
    recipe: Recipe
    epochs: int
    costs: Costs
    passes: float
    total_s: float
    tried: list[str]


def evaluation_s(plan: dict[str, Any]) -> float:
    """The plan's seconds that test-time augmentation multiplies: scoring the test split (both
    models), every pruned depth, and the report's panels."""
    tests = plan.get("data", {}).get("counts", {}).get("test", 0)
    scoring = sum(tests * a["eval_image_s"]["test"] for a in plan["archs"].values())
    return scoring + plan["stages"].get("prune", 0.0) + plan["stages"].get("report", 0.0)


def with_recipe(params: Params, overlay: dict[str, Any]) -> Params:
    return parse_params(merge(params.model_dump(), overlay), "params.yaml + autoconf")


def data_plan(fp: Fingerprint, params: Params, counts: dict[str, int]):
    """The plan's DataPlan from the fingerprint: the data as preprocess will write it."""
    from pipeline.core.common import scaled_size
    from pipeline.plan import DataPlan

    scale = params.preprocess.scale
    full = tuple(fp.size)
    return DataPlan(
        dataset=params.dataset.name,
        in_channels=fp.channels,
        num_classes=len(fp.classes),
        patches=params.preprocess.patches_per_epoch,
        sizes=dict.fromkeys(counts, scaled_size(*full, scale)),
        counts=dict(counts),
        source="the fingerprint",
        label_sizes=dict.fromkeys(counts, full),
    )


def time_recipe(params: Params, data, seconds: float, timer=None) -> Costs:
    """The recipe timed by pipeline.plan with one epoch; `timer` replaces plan.estimate
    (tests)."""
    from pipeline.plan import estimate

    one = params.model_copy(update={"epochs": 1})
    plan = (timer or estimate)(one, seconds, data)
    archs = plan["archs"]
    steps = {a: v["steps_per_epoch"] * v["step_s"] for a, v in archs.items()}
    compiled = {a: v.get("compile_s", 0.0) for a, v in archs.items()}
    timed = Costs(steps, dict.fromkeys(archs, 0.0), compiled, 0.0)
    val = {a: archs[a]["epoch_s"] - timed.epoch_s[a] for a in archs}  # validation's share
    rest = plan["total"] - sum(v["epoch_s"] for v in archs.values()) - sum(compiled.values())
    return Costs(steps, val, compiled, rest, plan)


def _compile(params: Params, epochs: int, costs: Costs) -> Costs:
    """The compile decision at `epochs` (it depends on the steps a run makes)."""
    from pipeline.plan import compile_seconds

    run = params.model_copy(update={"epochs": max(epochs, 1)})
    patches = params.preprocess.patches_per_epoch
    compiled = {a: compile_seconds(a, run, patches) for a in costs.steps_s}
    return Costs(costs.steps_s, costs.val_s, compiled, costs.rest_s, costs.plan)


def fit_epochs(params: Params, costs: Costs, budget_s: float) -> tuple[int, Costs]:
    """The most epochs within the budget, with the compile decision they lead to (compiling
    depends on the steps a run makes, and changes both its cost and its step rate): from an
    upper bound down, the first number of epochs whose total fits."""
    from pipeline.plan import COMPILED_STEP

    fastest = {a: v * COMPILED_STEP for a, v in costs.steps_s.items()}  # were all compiled
    bound = Costs(fastest, costs.val_s, dict.fromkeys(costs.steps_s, 0.0), costs.rest_s)
    for epochs in range(bound.epochs(budget_s), 0, -1):
        fitted = _compile(params, epochs, costs)
        if fitted.total(epochs) <= TARGET * budget_s:
            return epochs, fitted
    return 0, _compile(params, 1, costs)


def trim(
    params: Params, recipe: Recipe, costs: Costs, epochs: int, budget_s: float
) -> tuple[int, Costs]:
    """One epoch more, each of fewer patches, so that the epochs fill the budget instead of
    leaving most of an epoch of it unused (a large dataset's epoch is minutes): the patches per
    epoch shrink by at least epochs / (epochs + 1). Returns the epochs and costs kept."""
    more = epochs + 1
    steps = sum(costs.epoch_s[a] - costs.val_s[a] for a in costs.steps_s)  # at their rates
    room = TARGET * budget_s - costs.rest_s - sum(costs.compile_s.values())
    share = (room - more * sum(costs.val_s.values())) / (more * steps)
    patches = math.floor(recipe.get("preprocess.patches_per_epoch") * min(share, 1.0))
    if not 0 < share < 1 or patches < 1:
        return epochs, costs
    scaled = {a: v * share for a, v in costs.steps_s.items()}
    trimmed = Costs(scaled, costs.val_s, costs.compile_s, costs.rest_s, costs.plan)
    run = params.model_copy(
        update={"preprocess": params.preprocess.model_copy(update={"patches_per_epoch": patches})}
    )
    trimmed = _compile(run, more, trimmed)
    if trimmed.total(more) > TARGET * budget_s:  # compiling now pays off, and does not fit
        return epochs, costs
    coverage = rules.COVERAGE * patches / recipe.get("preprocess.patches_per_epoch")
    why = f"each training pixel in ~{coverage:.1f} windows an epoch ({rules.COVERAGE:.0f}, "
    recipe.set("preprocess.patches_per_epoch", patches, why + "trimmed to fill the budget)")
    return more, trimmed


def choose(
    fp: Fingerprint,
    params: Params,
    base: Recipe,
    counts: dict[str, int],
    budget_s: float,
    seconds: float = 2.0,
    timer=None,
) -> Planned:
    """The widest widths that buy MIN_PASSES in the budget; else, of those that fit
    MIN_EPOCHS, the one buying the most passes (a narrower one only for 5% more)."""
    tried: list[str] = []
    best: Planned | None = None
    need = math.inf  # the cheapest candidate's MIN_EPOCHS
    for unet, unetpp in WIDTHS:
        recipe = copy.deepcopy(base)
        why = f"the widest that buys {MIN_PASSES} passes over the training pixels in the budget"
        recipe.set("unet.base_channels", unet, why)
        recipe.set("unetpp.base_channels", unetpp, why)
        run = with_recipe(params, recipe.overlay)
        costs = time_recipe(run, data_plan(fp, run, counts), seconds, timer)
        if evaluation_s(costs.plan) > EVAL_SHARE * budget_s and run.inference.tta != "none":
            why = f"evaluation would pass {EVAL_SHARE:.0%} of the budget"
            recipe.set("inference.tta", "none", why)
            run = with_recipe(params, recipe.overlay)
            costs = time_recipe(run, data_plan(fp, run, counts), seconds, timer)
        epochs, costs = fit_epochs(run, costs, budget_s)
        if epochs:
            epochs, costs = trim(run, recipe, costs, epochs, budget_s)
        made = passes(fp, recipe, counts["train"], epochs)
        need = min(need, _compile(run, MIN_EPOCHS, costs).total(MIN_EPOCHS) / TARGET)
        tried.append(
            f"base {unet}/{unetpp}: {clock(costs.per_epoch())} per epoch, {epochs} epochs, "
            f"{made:.0f} passes"
        )
        log.info("candidate %s", tried[-1])
        if epochs >= MIN_EPOCHS:
            found = Planned(recipe, epochs, costs, made, costs.total(epochs), list(tried))
            if made >= MIN_PASSES:
                return found
            if best is None or made > best.passes * 1.05:  # a narrower one must buy more
                best = found
    if best is None:
        raise PipelineError(
            f"--budget {clock(budget_s)} is too small for this dataset on this machine: the "
            f"smallest sensible recipe (the cheapest widths, {MIN_EPOCHS} epochs) needs about "
            f"{clock(need)}; give --budget {math.ceil(need / 60)}m or more"
        )
    best.tried = tried
    why = (
        f"no widths buy {MIN_PASSES} passes in the budget: these buy the most "
        f"({best.passes:.0f}) of the {len(tried)} timed"
    )
    for arch in ("unet", "unetpp"):
        best.recipe.set(f"{arch}.base_channels", best.recipe.get(f"{arch}.base_channels"), why)
    return best


def finish(planned: Planned, params: Params, budget_s: float) -> dict[str, Any]:
    """The recipe's overlay with the epochs, the training stages' hard limits, and the
    autoconf section (budget, plan, reasons)."""
    r = planned.recipe
    why = f"fill {TARGET:.0%} of the budget ({planned.passes:.0f} passes)"
    r.set("epochs", planned.epochs, why)
    costs = planned.costs
    for arch in costs.epoch_s:
        train_s = costs.compile_s[arch] + planned.epochs * costs.epoch_s[arch]
        limit = round(TRAIN_SLACK * train_s, 1)
        r.set(f"budget.train_{arch}_s", limit, f"{TRAIN_SLACK:.2f} x its planned {clock(train_s)}")
    return r.overlay
