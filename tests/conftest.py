"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core import paths


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """Every path of the pipeline (params.yaml, data/, models/, reports/, ...) under an empty
    temporary project root."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.delenv("DVC_ROOT", raising=False)  # store_root() and relative sources -> root
    with paths.rooted(root):
        yield root


@pytest.fixture(autouse=True)
def _mlflow_uri_restored():
    """MLflow 3's `set_tracking_uri` also sets MLFLOW_TRACKING_URI in os.environ, and stages
    call it: after every test both are put back, so no test's store leaks into later tests
    (or into the repository's own mlflow.db). mlflow is not imported for tests without it."""
    import os
    import sys

    module = "mlflow.tracking._tracking_service.utils"
    env = os.environ.get("MLFLOW_TRACKING_URI")
    utils = sys.modules.get(module)
    uri = utils._tracking_uri if utils is not None else None
    yield
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env
    if (utils := sys.modules.get(module)) is not None:
        utils._tracking_uri = uri
