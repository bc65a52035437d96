"""pipeline.tracking.registry: the chosen model is registered; `champion` moves only to a
version that beats it on the same dataset and test split, `challenger` takes the others."""

from __future__ import annotations

import logging

import pytest

from pipeline.core.config import parse_params
from pipeline.tracking.registry import CHECKPOINT_TAG, Candidate, register
from pipeline.tracking.runs import init_store

NAME = "unet-family-drive"


@pytest.fixture
def params(project, monkeypatch):
    """A private store under the temporary project, also where MLFLOW_TRACKING_URI (which
    beats params) points (conftest's `_mlflow_uri_restored` puts both back afterwards)."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return parse_params({"mlflow": {"tracking_uri": uri}})


def logged(params, sha: str, stage: str = "train_unet", name: str = "segmenter") -> str:
    """A finished run of `stage` that logged a model `name` from the checkpoint `sha` (an
    identity pyfunc stands in for the segmenter: the registry only needs a logged model)."""
    import mlflow

    class Identity(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    exp_id = init_store(params)
    tags = {CHECKPOINT_TAG: sha, "dvc.stage": stage}
    with mlflow.start_run(experiment_id=exp_id, tags=tags) as run:
        mlflow.pyfunc.log_model(name=name, python_model=Identity(), pip_requirements=[])
    return run.info.run_id


def candidate(sha: str, miou: float, **kw) -> Candidate:
    fields = {"label": "UNet", "stage": "train_unet", "model": "segmenter"} | kw
    return Candidate(checkpoint_sha256=sha, metrics={"miou": miou, "dice": miou + 0.05}, **fields)


def aliases(params) -> dict[str, str]:
    import mlflow

    model = mlflow.MlflowClient().get_registered_model(NAME)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_champion_moves_only_to_a_better_model_on_the_same_test_split(params):
    for sha in ("a", "b", "c"):
        logged(params, sha)
    first = register(params, candidate("a", 0.80), "drive", "split1", "miou")
    assert (first.name, first.version, first.alias) == (NAME, "1", "champion")
    worse = register(params, candidate("b", 0.79), "drive", "split1", "miou")
    assert (worse.version, worse.alias) == ("2", "challenger")
    better = register(params, candidate("c", 0.81), "drive", "split1", "miou")
    assert (better.version, better.alias) == ("3", "champion")
    assert aliases(params) == {"champion": "3", "challenger": "2"}


def test_a_champion_on_another_test_split_is_not_compared(params, caplog):
    logged(params, "a")
    logged(params, "b")
    register(params, candidate("a", 0.80), "drive", "split1", "miou")
    with caplog.at_level(logging.INFO, logger="pipeline.tracking.registry"):
        other = register(params, candidate("b", 0.99), "drive", "split2", "miou")
    assert other.alias == "challenger"
    assert "not comparable" in caplog.text
    assert aliases(params) == {"champion": "1", "challenger": "2"}


def test_a_version_carries_the_dataset_split_metrics_and_source_run(params):
    import mlflow

    run_id = logged(params, "p", stage="prune", name="segmenter_L2")
    chosen = candidate("p", 0.7, label="UNet++ L2", stage="prune", model="segmenter_L2")
    done = register(params, chosen, "drive", "split1", "miou")
    version = mlflow.MlflowClient().get_model_version(NAME, done.version)
    assert version.run_id == run_id
    model = mlflow.get_logged_model(done.source.removeprefix("models:/"))
    assert (model.source_run_id, model.name) == (run_id, "segmenter_L2")
    tags = version.tags
    assert tags["model"] == "UNet++ L2" and tags["dataset"] == "drive"
    assert tags["test_split"] == "split1"
    assert float(tags["test_miou"]) == pytest.approx(0.7)
    assert float(tags["test_dice"]) == pytest.approx(0.75)
    # what docs/serving.md tells users to load
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert loaded.metadata.run_id == run_id


def test_the_latest_finished_run_of_the_checkpoint_is_the_source(params):
    logged(params, "a")
    newer = logged(params, "a")
    import mlflow

    source = register(params, candidate("a", 0.5), "drive", "s", "miou").source
    model = mlflow.get_logged_model(source.removeprefix("models:/"))
    assert model.source_run_id == newer


def test_nothing_is_registered_without_a_run_or_a_name(params, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.registry"):
        assert register(params, candidate("missing", 0.5), "drive", "s", "miou") is None
    assert "no finished MLflow run of train_unet logged this checkpoint" in caplog.text
    logged(params, "a")
    off = params.model_copy(
        update={"mlflow": params.mlflow.model_copy(update={"registered_model": ""})}
    )
    assert register(off, candidate("a", 0.5), "drive", "s", "miou") is None


def test_the_same_checkpoint_registered_again_reuses_its_version(params):
    """A report re-run for another reason (report.dpi, dvc repro --force) adds no version."""
    logged(params, "a")
    first = register(params, candidate("a", 0.8), "drive", "s", "miou")
    again = register(params, candidate("a", 0.8), "drive", "s", "miou")
    assert (again.version, again.alias) == (first.version, "champion")
    assert aliases(params) == {"champion": "1"}


def test_a_stale_champion_write_is_settled_by_the_next_registration(params):
    """Two reports at once: one may write `champion` from a stale read after the other checked.
    Every registrant compares all versions registered after the holder it first saw, so the
    best one ends up holding the alias whatever the order."""
    import mlflow

    for sha in ("a", "b", "c"):
        logged(params, sha)
    register(params, candidate("a", 0.80), "drive", "s", "miou")
    register(params, candidate("b", 0.90), "drive", "s", "miou")
    assert aliases(params)["champion"] == "2"
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "1")  # the stale write
    late = register(params, candidate("c", 0.85), "drive", "s", "miou")
    assert late.alias == "challenger"
    assert aliases(params) == {"champion": "2", "challenger": "3"}
