"""MLflow tracking: where the store is, one parent run per pipeline execution with a child run
per stage, and the tags that tie a run to DVC, git, its params and its data.

`import mlflow` takes seconds, so it happens inside the functions that need it.

    python -m pipeline.tracking init    # create the store and experiment (before fanning out)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pipeline.core import paths
from pipeline.core.common import PipelineError, timed
from pipeline.core.config import Params, flatten
from pipeline.tracking.dvc import data_hash, execution, git_commit

T = TypeVar("T")

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


EXECUTION_TAG = "pipeline.execution"  # the parent run's key (children link by PARENT_TAG)
ROLE_TAG = "pipeline.role"  # "execution" on parent runs
PARENT_TAG = "mlflow.parentRunId"  # how MLflow nests runs; works across processes
SMOKE_TAG = "pipeline.smoke"  # "true" on every run of a smoke test (report.smoke)
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
SMOKE_NOTE = (
    "**Smoke test: these metrics mean nothing.** report.smoke is true (e.g. the ci-cpu preset): "
    "tiny models trained for seconds, to check that the pipeline runs end to end. No model of "
    "it is registered."
)


def is_smoke(params: Params) -> bool:
    """report.smoke: the run only checks that the pipeline works (the ci-cpu preset). Read from
    the params' dump, as their MLflow params are: a label every stage's run carries, not a
    value any stage computes with."""
    return bool(params.model_dump()["report"]["smoke"])


def run_tags(stage: str) -> dict[str, str]:
    tags = {"dvc.stage": os.environ.get("DVC_STAGE") or stage}
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


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialises creating a sqlite store, its experiment and a parent run across processes:
    queued experiments start their first stages at once, and alembic's migrations race."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    # sqlite:///path, or SQLAlchemy's URI form sqlite:///file:path?mode=ro&uri=true
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0].removeprefix("file:"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock", timeout=600):
        yield


def retry_busy(fn: Callable[[], T], attempts: int = 8) -> T:
    """Call `fn`, retrying briefly while sqlite reports the database locked or busy (MLflow
    already waits 20 s per statement; this covers the rest, e.g. a commit under contention)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # MlflowException or sqlalchemy's OperationalError
            text = str(exc).lower()
            if attempt == attempts - 1 or not ("locked" in text or "busy" in text):
                raise
            log.warning("MLflow store busy (%s); retrying", text.splitlines()[0][:120])
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError("unreachable")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that nothing answers for is one line at once: MLflow's own client
    retries a refused connection for about four minutes, in every stage."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PipelineError(
            f"MLflow tracking server {uri}: nothing answers at {parts.hostname}:{port} "
            f"({reason}); start the server, fix mlflow.tracking_uri (or MLFLOW_TRACKING_URI), "
            "or set mlflow.enabled: false"
        ) from None


def init_store(params: Params) -> str:
    """Create the store and the experiment if needed (idempotent); returns the experiment id.
    `python -m pipeline.tracking init` calls it, before fanning out many experiments."""
    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import mlflow

    uri = tracking_uri(params)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name, location = params.mlflow.experiment, artifact_location(params)

    def get_or_create() -> Any:
        exp = mlflow.get_experiment_by_name(name)
        return exp or mlflow.get_experiment(mlflow.create_experiment(name, location))

    with _store_lock(uri):
        try:
            exp = retry_busy(get_or_create)
        except Exception as exc:  # sqlalchemy, MlflowException, connection errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            if uri.startswith("sqlite:///"):
                db = uri.removeprefix("sqlite:///")
                raise PipelineError(
                    f"{db}: the MLflow store cannot be opened ({first}); move the file aside "
                    "to start a new store, or set mlflow.enabled: false"
                ) from None
            raise PipelineError(
                f"MLflow tracking store {uri} cannot be reached ({first}); check the server "
                "or MLFLOW_TRACKING_URI, or set mlflow.enabled: false"
            ) from None
    check_artifact_store(uri, exp.artifact_location)
    return exp.experiment_id


def check_artifact_store(uri: str, location: str) -> None:
    """A server that cannot reach its artifact store (a bucket: `--artifacts-destination
    s3://...`) is one line when the stage opens its run, before it logs anything: each upload
    would fail only after MLflow's client retried it for about four minutes. One listing, not
    retried (MLflow reads its retry count from the environment on each request)."""
    if not uri.startswith(("http://", "https://")) or not location.startswith("mlflow-artifacts:"):
        return  # no server, or the client writes there itself (a folder, a bucket with keys)
    from unittest import mock

    import mlflow
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    try:
        with mock.patch.dict(os.environ, {MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: "0"}):
            mlflow.artifacts.list_artifacts(artifact_uri=location)
    except Exception as exc:
        raise PipelineError(
            f"MLflow tracking server {uri}: its artifact store does not answer ({_reason(exc)}); "
            "check the server's --artifacts-destination (a bucket: its endpoint and keys), or "
            "set mlflow.enabled: false"
        ) from None


MAX_PARAM = 6000  # characters MLflow 3 keeps in a param's value


def param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM else text[: MAX_PARAM - 1] + "…"


def parent_run(params: Params, exp_id: str, key: str, command: str) -> str:
    """The parent run of one pipeline execution: found by its key, else created with every
    param of params.yaml (flattened) and the execution's tags."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    where = f"tags.`{EXECUTION_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'execution'"
    with _store_lock(tracking_uri(params)):
        found = retry_busy(lambda: client.search_runs([exp_id], where, max_results=1))
        if found:
            return found[0].info.run_id
        tags = run_tags("pipeline")
        del tags["dvc.stage"]
        name = tags.get("dvc.exp_name") or f"repro {tags.get('git.commit', '')[:7]}".strip()
        tags |= {EXECUTION_TAG: key, ROLE_TAG: "execution", "dvc.command": command}
        if is_smoke(params):
            tags |= {SMOKE_TAG: "true", NOTE_TAG: SMOKE_NOTE}
        run_id = retry_busy(lambda: client.create_run(exp_id, run_name=name, tags=tags)).info.run_id
        # every param, autoconf's fingerprint and reasons included (a value past MLflow's
        # 6,000 characters is cut, not refused)
        everything = [Param(k, param_value(v)) for k, v in flatten(params).items()]
        retry_busy(lambda: client.log_batch(run_id, params=everything))  # MLflow splits batches
    log.info("MLflow parent run %s (%s) for this pipeline execution", run_id, name)
    return run_id


def _relink(client: Any, run_id: str, old_parent: str | None, parent: str | None) -> None:
    """A stage resumed by a new execution moves under its parent; the interrupted
    execution's parent, still RUNNING, is marked KILLED."""
    if parent is None or parent == old_parent:
        return
    client.set_tag(run_id, PARENT_TAG, parent)
    if old_parent and client.get_run(old_parent).info.status == "RUNNING":
        client.set_terminated(old_parent, "KILLED")


class Tracker:
    """A stage's MLflow run, or a no-op when tracking is off (`mlflow.enabled: false`): stages
    log through it without asking. False when off; other attributes are the run's (`info`)."""

    def __init__(self, run: Any = None):
        self._run = run

    def __bool__(self) -> bool:
        return self._run is not None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or self._run is None:
            raise AttributeError(name)
        return getattr(self._run, name)

    def _log(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._run is not None:
            import mlflow

            with timed("tracking"):
                getattr(mlflow, method)(*args, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._log("log_metrics", metrics, step=step)

    def log_metric(self, key: str, value: float) -> None:
        self._log("log_metric", key, value)

    def log_artifact(self, path: Any, artifact_path: str | None = None) -> None:
        self._log("log_artifact", str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._log("set_tags", tags)


@contextlib.contextmanager
def mlflow_run(
    params: Params,
    stage: str,
    run_name: str,
    run_id: str | None = None,
    used: dict[str, Any] | None = None,
    consumes: str | None = None,
) -> Iterator[Any]:
    """The stage's MLflow run as a Tracker (a no-op one when params disable tracking).

    Under DVC the run is a child of this pipeline execution's parent run (see `execution`),
    which is RUNNING while a stage runs and FINISHED (or FAILED) after it. A new run gets the
    params the stage read (`used`, flattened) with their hash as the `params.sha256` tag, and
    the hash of the data it `consumes` as `data.hash`. `run_id` continues an earlier run (a
    training stage resumed after an interruption) if it exists.
    """
    if not params.mlflow.enabled:
        yield Tracker(None)
        return
    with timed("tracking"):
        try:
            started, parent = _start_run(params, stage, run_name, run_id, used, consumes)
        except PipelineError as exc:
            exc.mlflow_store_failed = True  # recording it there would fail alike
            raise
        except Exception as exc:  # a read-only or full store, a server refusing this user, ...
            error = PipelineError(
                f"MLflow store {tracking_uri(params)}: cannot start the {stage} run "
                f"({_reason(exc)}); make it writable for this user (a server: its permissions), "
                "or set mlflow.enabled: false"
            )
            error.mlflow_store_failed = True
            raise error from None
    status = "FAILED"
    try:
        yield Tracker(started)
        status = "FINISHED"
    except BaseException as exc:
        exc.mlflow_run_failed = True  # this run records it: failures_recorded skips it
        if isinstance(exc, Exception):  # not an interrupt: say why
            with timed("tracking"), contextlib.suppress(Exception):
                import mlflow

                mlflow.set_tag("error", (str(exc) or type(exc).__name__)[:5000])
        one_line = _logging_failed(exc, tracking_uri(params), stage)
        if one_line is None:
            raise
        one_line.mlflow_run_failed = True
        raise one_line from None
    finally:
        with timed("tracking"):
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == started.info.run_id:
                mlflow.end_run(status)
            if parent:
                retry_busy(lambda: mlflow.MlflowClient().set_terminated(parent, status))


def _logging_failed(exc: BaseException, uri: str, stage: str) -> PipelineError | None:
    """MLflow's own error while the stage logged (after its client's retries: a server or its
    bucket gone mid-stage) as one line; None for anything else. What the stage wrote before
    logging stays on disk."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, PipelineError) or not isinstance(exc, MlflowException):
        return None
    return PipelineError(
        f"MLflow store {uri}: the {stage} run could not log ({_reason(exc)}); its "
        "outputs are on disk: run the stage again once the server and its artifact store "
        "answer, or set mlflow.enabled: false"
    )


def _reason(exc: BaseException) -> str:
    """The line of a store's error that says what went wrong (sqlalchemy wraps it in lines of
    context: the autoflush note, the SQL, its parameters, a link)."""
    noise = ("(raised as a result of", "[SQL", "[parameters", "(Background")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(noise)]
    return ((useful or lines or [type(exc).__name__])[0])[:200]


def _start_run(
    params: Params,
    stage: str,
    run_name: str,
    run_id: str | None,
    used: dict[str, Any] | None,
    consumes: str | None,
) -> tuple[Any, str | None]:
    """mlflow_run's set-up: (the active run, this execution's parent run id or None)."""
    import mlflow

    uri = tracking_uri(params)
    exp_id = init_store(params)
    client = mlflow.MlflowClient()
    current = execution()
    parent = parent_run(params, exp_id, *current) if current else None
    old_tags: dict[str, str] = {}
    if run_id is not None:
        try:
            old_tags = client.get_run(run_id).data.tags
            old_parent = old_tags.get(PARENT_TAG)
        except mlflow.exceptions.MlflowException:
            log.info("MLflow run %s not found in %s; starting a new one", run_id, uri)
            run_id = None
    if run_id is not None:
        _relink(client, run_id, old_parent, parent)
        if "error" in old_tags:  # the failure it continues from is over
            client.delete_tag(run_id, "error")
        started = mlflow.start_run(run_id=run_id)
        log.info("MLflow run %s continued in %s", run_id, uri)
    else:
        tags = run_tags(stage) | ({PARENT_TAG: parent} if parent else {})
        if is_smoke(params):
            tags[SMOKE_TAG] = "true"
        if used is not None:
            tags["params.sha256"] = sha256_json(used)
        if consumes and (digest := data_hash(consumes)):
            tags["data.hash"] = digest
        started = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags)
        if used is not None:
            mlflow.log_params(flatten(used))
        log.info("MLflow run %s in %s", started.info.run_id, uri)
    if parent:
        retry_busy(lambda: client.update_run(parent, status="RUNNING"))
    return started, parent


@contextlib.contextmanager
def failures_recorded(params: Params, stage: str) -> Iterator[None]:
    """Stages that open their MLflow run only once their work is done (download, preprocess,
    prune, report), and training before its run opens, record a failure of that work as a
    FAILED run of the stage, with the params and the error, under the execution's parent
    (which turns FAILED too); a failure inside an open run (training) marks that run FAILED
    instead. The original error always propagates, whatever the store does."""
    try:
        yield
    except Exception as exc:
        # a stage whose own run was open when it failed (training) has recorded it there; a
        # store that could not start a run would not record it either
        recorded = getattr(exc, "mlflow_run_failed", False)
        unreachable = getattr(exc, "mlflow_store_failed", False)
        if params.mlflow.enabled and not (recorded or unreachable):
            run_id = None
            try:
                with (
                    timed("tracking"),
                    mlflow_run(params, stage, stage, used=params.model_dump()) as run,
                ):
                    run_id = run.info.run_id
                    # ends the run FAILED, with this error's text as its `error` tag
                    raise _StageFailed(str(exc) or type(exc).__name__)
            except _StageFailed:
                log.info("MLflow run %s marked FAILED", run_id)
            except Exception as store:  # the store's own trouble must not hide the error
                log.warning("could not record the failure in MLflow: %s", store)
        raise


class _StageFailed(Exception):
    """Raised inside mlflow_run to end the recorded run as FAILED, carrying the original
    error's text (which mlflow_run records)."""


@timed("tracking")
def log_to_parent(
    run: Any, metrics: dict[str, float] | None = None, files: tuple = (), folder: str = ""
) -> None:
    """Log headline metrics and files on the parent run too, so one row of the MLflow UI
    compares whole executions. A no-op without a run or a parent."""
    if not run:
        return
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    parent = client.get_run(run.info.run_id).data.tags.get(PARENT_TAG)
    if parent is None:
        return
    if metrics:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        retry_busy(lambda: client.log_batch(parent, metrics=batch))
    for f in files:
        client.log_artifact(parent, str(f), folder or None)


def sha256_json(obj: Any) -> str:
    """A stable hash of params (sorted keys), for a run tag."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@timed("tracking")
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
        code_paths=[str(Path(__file__).resolve().parents[1])],  # the pipeline package
    )
    return info.model_uri
