"""MLflow tracking: where the store is, the run tags, and one real run into a sqlite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import paths, tracking
from pipeline.config import parse_params


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _params(uri: str = "", **mlflow):
    return parse_params({"mlflow": {"tracking_uri": uri, **mlflow}})


def test_env_var_beats_params(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    clean_env.setenv("DVC_ROOT", "/somewhere")
    assert tracking.tracking_uri(_params("http://params:5000")) == "http://env:5000"


def test_params_beat_the_default(clean_env):
    clean_env.setenv("DVC_ROOT", "/somewhere")
    assert tracking.tracking_uri(_params("http://params:5000")) == "http://params:5000"


def test_empty_env_var_falls_through_to_params(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "")
    assert tracking.tracking_uri(_params("http://params:5000")) == "http://params:5000"


def test_default_is_sqlite_under_dvc_root_with_an_absolute_path(clean_env, tmp_path):
    clean_env.setenv("DVC_ROOT", str(tmp_path))
    uri = tracking.tracking_uri(_params())
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")  # three for the scheme, one for the absolute path


def test_default_without_dvc_root_is_the_project_root(clean_env):
    assert tracking.tracking_uri(_params()) == f"sqlite:///{paths.ROOT.resolve()}/mlflow.db"


def test_artifacts_go_next_to_the_store(clean_env, tmp_path):
    clean_env.setenv("DVC_ROOT", str(tmp_path))
    location = tracking.artifact_location(_params(experiment="exp-a"))
    assert location == (tmp_path.resolve() / "mlartifacts" / "exp-a").as_uri()


def test_run_tags_name_the_stage_and_the_dvc_experiment(clean_env):
    clean_env.setenv("DVC_EXP_NAME", "tidy-lamb")
    clean_env.setenv("DVC_EXP_BASELINE_REV", "abc123")
    tags = tracking.run_tags("train_unet")
    assert tags["dvc.stage"] == "train_unet"
    assert tags["dvc.exp_name"] == "tidy-lamb"
    assert tags["dvc.baseline_rev"] == "abc123"


def test_run_tags_outside_an_experiment(clean_env):
    tags = tracking.run_tags("prune")
    assert tags["dvc.stage"] == "prune"
    assert "dvc.exp_name" not in tags and "dvc.baseline_rev" not in tags
    if "git.commit" in tags:  # the project is a git checkout
        assert len(tags["git.commit"]) == 40
        assert tags["mlflow.source.git.commit"] == tags["git.commit"]


def test_disabled_tracking_yields_no_run(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    with tracking.mlflow_run(_params(enabled=False), "report", "report") as run:
        assert run is None
    assert not (tmp_path / "never.db").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from mlflow's sqlalchemy store
def test_mlflow_run_records_tags_and_metrics(clean_env, tmp_path: Path):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service import utils as mlflow_uri

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    clean_env.setenv("DVC_ROOT", str(tmp_path))  # artifacts under tmp_path, not the project
    clean_env.setenv("DVC_EXP_NAME", "unit-exp")
    # mlflow_run calls mlflow.set_tracking_uri, a process-wide setting: restore it afterwards
    clean_env.setattr(mlflow_uri, "_tracking_uri", mlflow_uri._tracking_uri)

    params = _params(experiment="unit-tests")
    with tracking.mlflow_run(params, "train_unet", "unet") as run:
        assert run is not None
        mlflow.log_metric("val_miou", 0.5, step=1)
        mlflow.log_param("unet.depth", 4)
        run_id = run.info.run_id

    assert db.exists()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("unit-tests")
    assert experiment is not None
    expected_artifacts = (tmp_path.resolve() / "mlartifacts" / "unit-tests").as_uri()
    assert experiment.artifact_location == expected_artifacts
    stored = client.get_run(run_id)
    assert stored.info.experiment_id == experiment.experiment_id
    assert stored.info.run_name == "unet"
    assert stored.info.status == "FINISHED"
    assert stored.data.tags["dvc.stage"] == "train_unet"
    assert stored.data.tags["dvc.exp_name"] == "unit-exp"
    assert stored.data.metrics["val_miou"] == 0.5
    assert stored.data.params["unet.depth"] == "4"
