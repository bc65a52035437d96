"""The MLflow Model Registry: the report stage registers the pipeline's chosen model.

The chosen model is a segmentation pyfunc (`pipeline.serving.pyfunc`) that a training run (or the
prune stage, for a pruned UNet++) logged; it is found by the sha256 of its checkpoint, which
those runs carry as a tag, so a stage DVC did not re-run still points at the run that made
the checkpoint. A new version is tagged with the model, its checkpoint, the dataset, the test
split's hash, the commit, the DVC experiment and the test metrics; registering the same
checkpoint's model again (a report re-run for another reason) reuses its version.

`champion` goes to the new version when it beats the version holding it on the same dataset
and test split; otherwise the new version is the `challenger`. A holder on another dataset or
test split is never compared, nor replaced. Concurrent experiments (`dvc queue start -j 2`)
cannot leave a worse version holding `champion`: each registrant settles the alias on the best
comparable version among the holder it first saw and every version registered after that one,
and checks again after each write, so every order of events ends on the same version (a version
promoted by hand therefore holds until a better one is registered after it).
Load it with `mlflow.pyfunc.load_model("models:/<name>@champion")`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import Params
from pipeline.tracking.runs import init_store, retry_busy, run_tags

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "checkpoint.sha256"
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Candidate:
    """A model the pipeline may register."""

    label: str  # "UNet", "UNet++", "UNet++ L2"
    stage: str  # the DVC stage whose MLflow run logged it
    model: str  # the logged model's name in that run
    checkpoint_sha256: str
    metrics: dict[str, float]  # its test metrics


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str  # champion or challenger
    source: str  # the logged model's URI (models:/<model id>)


def registered_name(params: Params, dataset: str) -> str:
    """mlflow.registered_model with `{dataset}` filled in ("" = do not register)."""
    return params.mlflow.registered_model.replace("{dataset}", dataset)


def register(
    params: Params, candidate: Candidate, dataset: str, test_split: str, metric: str
) -> Registered | None:
    """Register `candidate` and settle the aliases (see the module's docstring); None when
    registration is off or no MLflow run logged the candidate's model."""
    name = registered_name(params, dataset)
    if not name or not params.mlflow.enabled:
        return None
    import mlflow

    exp_id = init_store(params)
    client = mlflow.MlflowClient()
    source = _source(client, exp_id, candidate)
    if source is None:
        log.warning(
            "%s: no finished MLflow run of %s logged this checkpoint (trained with "
            "mlflow.enabled false?); nothing registered as %s",
            candidate.label,
            candidate.stage,
            name,
        )
        return None
    same = {
        "model": candidate.label,
        CHECKPOINT_TAG: candidate.checkpoint_sha256,
        "dataset": dataset,
        "test_split": test_split,
    }
    version = next((v for v in _versions(client, name) if _has(v, same)), None)
    if version is None:
        tags = {
            **same,
            **{k: v for k, v in run_tags("report").items() if k in ("git.commit", "dvc.exp_name")},
            **{f"test_{k}": repr(float(v)) for k, v in candidate.metrics.items()},
        }
        version = retry_busy(lambda: mlflow.register_model(source, name, tags=tags))
    else:
        log.info(
            "%s: this checkpoint is already %s version %s", candidate.label, name, version.version
        )
    ours = str(version.version)
    champion = _settle(client, name, ours, dataset, test_split, metric)
    alias = CHAMPION if champion == ours else CHALLENGER
    if alias == CHALLENGER:
        retry_busy(lambda: client.set_registered_model_alias(name, CHALLENGER, ours))
    held = f"version {champion} holds {CHAMPION}" if champion != ours else "the best so far"
    if alias == CHALLENGER and champion is not None:
        holder = retry_busy(lambda: client.get_model_version(name, champion))
        if (holder.tags.get("dataset"), holder.tags.get("test_split")) != (dataset, test_split):
            held += " on another dataset or test split: not comparable; promote by hand"
    log.info(
        "registered %s as %s version %s: %s (test %s %.4f; %s)",
        candidate.label,
        name,
        ours,
        alias,
        metric,
        candidate.metrics[metric],
        held,
    )
    return Registered(name, ours, alias, source)


def _source(client: Any, exp_id: str, candidate: Candidate) -> str | None:
    """runs:/<run>/<model> of the latest finished run of the candidate's stage that logged a
    model from the candidate's checkpoint."""
    where = (
        f"tags.`{CHECKPOINT_TAG}` = '{candidate.checkpoint_sha256}' "
        f"and tags.`dvc.stage` = '{candidate.stage}' and attributes.status = 'FINISHED'"
    )
    runs = client.search_runs([exp_id], where, order_by=["attributes.start_time DESC"])
    if not runs:
        return None
    run_id = runs[0].info.run_id
    # the logged model's own URI (runs:/<run>/<name> works too, with a warning each time)
    models = client.search_logged_models(
        experiment_ids=[exp_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{candidate.model}'",
    )
    return f"models:/{models[0].model_id}" if models else f"runs:/{run_id}/{candidate.model}"


def _versions(client: Any, name: str) -> list[Any]:
    return retry_busy(lambda: list(client.search_model_versions(f"name = '{name}'")))


def _has(version: Any, tags: dict[str, str]) -> bool:
    return all(version.tags.get(k) == v for k, v in tags.items())


def _score(version: Any, metric: str) -> float | None:
    value = version.tags.get(f"test_{metric}")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _holder(client: Any, name: str, alias: str) -> str | None:
    """The version number holding `alias`, or None."""
    aliases = retry_busy(lambda: client.get_registered_model(name).aliases)
    return str(aliases[alias]) if alias in aliases else None


def _settle(
    client: Any, name: str, ours: str, dataset: str, test_split: str, metric: str
) -> str | None:
    """Move `champion` to the best comparable version among its holder (as first read) and the
    versions registered after it (ties keep the holder, then the older version), and check
    again after each write; returns the version holding it."""
    first = _holder(client, name, CHAMPION)
    since = int(first) if first is not None else 0
    for _ in range(10):
        versions = {str(v.version): v for v in _versions(client, name)}
        holder = _holder(client, name, CHAMPION)
        if holder is not None and holder in versions:
            split = versions[holder].tags.get("dataset"), versions[holder].tags.get("test_split")
            if split != (dataset, test_split) or _score(versions[holder], metric) is None:
                return holder  # not comparable: never replaced automatically
        contenders = [
            v
            for number, v in versions.items()
            if (int(number) > since or number in (holder, first, ours))
            and _has(v, {"dataset": dataset, "test_split": test_split})
            and _score(v, metric) is not None
        ]
        best = str(
            max(
                contenders,
                key=lambda v: (_score(v, metric), str(v.version) == holder, -int(v.version)),
            ).version
        )
        if best == holder:
            return holder
        retry_busy(lambda b=best: client.set_registered_model_alias(name, CHAMPION, b))
    return _holder(client, name, CHAMPION)
