"""MLflow tracking: where the store is, one run per stage, tags that tie a run to DVC and git.

`import mlflow` takes seconds, so it happens inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import paths
from pipeline.config import Params

log = logging.getLogger(__name__)


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI, else params' mlflow.tracking_uri, else the repo's sqlite file.

    The default is an absolute path in the *real* repository (DVC_ROOT), so experiments that
    DVC runs in temporary copies land in the same store instead of a copy thrown away later.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri
    return uri or f"sqlite:///{paths.store_root() / 'mlflow.db'}"


def artifact_location(params: Params) -> str | None:
    """Local stores keep artifacts in <repo>/mlartifacts (absolute, like the db); a tracking
    server decides for itself (None)."""
    if tracking_uri(params).startswith(("http://", "https://", "databricks")):
        return None
    return (paths.store_root() / "mlartifacts" / params.mlflow.experiment).as_uri()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=paths.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def run_tags(stage: str) -> dict[str, str]:
    tags = {"dvc.stage": stage}
    if commit := git_commit():
        tags["git.commit"] = tags["mlflow.source.git.commit"] = commit
    # set by DVC while it runs an experiment
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _experiment_id(name: str, location: str | None, attempts: int = 8) -> str:
    """Get or create the experiment, retrying briefly when another process races us (sqlite)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            exp = mlflow.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if attempt == attempts - 1:
                raise
            log.debug("MLflow store busy (%s), retrying", exc)
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError("unreachable")


@contextlib.contextmanager
def mlflow_run(
    params: Params, stage: str, run_name: str, run_id: str | None = None
) -> Iterator[Any]:
    """An active MLflow run for this stage (None when params disable tracking); `run_id`
    continues an earlier run (a training stage resumed after an interruption) if it exists."""
    if not params.mlflow.enabled:
        yield None
        return
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    exp_id = _experiment_id(params.mlflow.experiment, artifact_location(params))
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            log.info("MLflow run %s not found in %s; starting a new one", run_id, uri)
            run_id = None
    if run_id is not None:
        with mlflow.start_run(run_id=run_id) as run:
            log.info("MLflow run %s continued in %s", run_id, uri)
            yield run
        return
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags(stage)) as run:
        log.info("MLflow run %s in %s", run.info.run_id, uri)
        yield run


def sha256_json(obj: Any) -> str:
    """A stable hash of params (sorted keys), for a run tag."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def processed_data_hash() -> str:
    """The processed data a stage consumes: DVC's md5 of data/processed from dvc.lock when DVC
    ran preprocess, else the sha256 of its manifest (which lists every split image and crop)."""
    import hashlib

    import yaml

    try:
        lock = yaml.safe_load((paths.ROOT / "dvc.lock").read_text()) or {}
        for out in lock.get("stages", {}).get("preprocess", {}).get("outs", []):
            if out.get("path") == "data/processed" and out.get("md5"):
                return f"md5:{out['md5']}"
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return f"sha256:{hashlib.sha256(paths.MANIFEST.read_bytes()).hexdigest()}"


def log_torch_model(model: Any, example: Any) -> str:
    """Log `model` with MLflow's PyTorch flavour; returns its model URI.

    Pickled with the pipeline's code (`code_paths`), so `mlflow.pyfunc.load_model(uri)` and
    `mlflow.pytorch.load_model(uri)` work without this checkout on sys.path. The signature takes
    any batch, height and width (a multiple of the model's `size_multiple`): MLflow's default
    torch.export format would fix them to the example's.
    """
    import copy
    from importlib.metadata import version

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    cpu = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    x = example.detach().cpu().float().numpy()  # (1, C, H, W)
    with torch.no_grad():
        out_channels = cpu(torch.from_numpy(x)).shape[1]
    f32 = np.dtype(np.float32)
    signature = ModelSignature(
        Schema([TensorSpec(f32, (-1, x.shape[1], -1, -1))]),  # normalised images
        Schema([TensorSpec(f32, (-1, out_channels, -1, -1))]),  # logits
    )
    requirements = [
        f"{name}=={version(name)}" for name in ("torch", "segmentation-models-pytorch", "numpy")
    ]
    info = mlflow.pytorch.log_model(
        cpu,
        name="model",
        signature=signature,
        input_example=x,
        pip_requirements=requirements,
        serialization_format="pickle",
        code_paths=[str(Path(__file__).resolve().parent)],  # this package
    )
    return info.model_uri
