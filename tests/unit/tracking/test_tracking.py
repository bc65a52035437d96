"""MLflow tracking: where the store is, the run tags, and one real run into a sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import paths
from pipeline.core.config import parse_params
from pipeline.tracking import runs as tracking
from pipeline.tracking.dvc import dvc_args


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        "MLFLOW_TRACKING_URI",
        "DVC_ROOT",
        "DVC_EXP_NAME",
        "DVC_EXP_BASELINE_REV",
        "DVC_STAGE",
        "PIPELINE_EXECUTION",
    ):
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
        assert not run
        run.log_metrics({"x": 1.0})  # a no-op: stages log without asking
    assert not (tmp_path / "never.db").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from mlflow's sqlalchemy store
def test_mlflow_run_records_tags_and_metrics(clean_env, tmp_path: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    clean_env.setenv("DVC_ROOT", str(tmp_path))  # artifacts under tmp_path, not the project
    clean_env.setenv("DVC_EXP_NAME", "unit-exp")

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


def test_a_corrupt_store_is_one_line_naming_it_and_the_ways_out(clean_env, tmp_path: Path):
    """Not sqlalchemy's 90-line traceback: which file, and how to go on."""
    from pipeline.core.common import PipelineError

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not a sqlite database" * 100)
    clean_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(PipelineError) as err, tracking.mlflow_run(_params(), "report", "report"):
        raise AssertionError("no run may start")
    msg = str(err.value)
    assert msg.startswith(f"{db}: the MLflow store cannot be opened (") and "\n" not in msg
    assert "move the file aside" in msg and "mlflow.enabled: false" in msg
    assert db.read_bytes().startswith(b"this is not"), "the file is left as it was"


# --- one parent run per pipeline execution, a child run per stage -----------------------------


@pytest.fixture
def store(clean_env, tmp_path: Path):
    """A fresh sqlite store in tmp_path (MLflow's process-wide URI is put back afterwards by
    conftest's `_mlflow_uri_restored`)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    clean_env.setenv("DVC_ROOT", str(tmp_path))
    return MlflowClient(tracking_uri=uri)


def _stage(params, stage: str, **kwargs) -> str:
    with tracking.mlflow_run(params, stage, stage, **kwargs) as run:
        return run.info.run_id


def test_dvc_processes_are_recognised():
    assert dvc_args(["/repo/.venv/bin/python3", "/repo/.venv/bin/dvc", "repro"]) == ["repro"]
    assert dvc_args(["/usr/bin/dvc", "exp", "exec-run"]) == ["exp", "exec-run"]
    assert dvc_args(["python", "-m", "dvc", "exp", "run"]) == ["exp", "run"]
    assert dvc_args(["uv", "run", "dvc", "repro"]) is None  # dvc is its child
    assert dvc_args(["/bin/sh", "-c", "python -m pipeline.stages.train unet"]) is None
    assert dvc_args(["python", "-m", "pytest"]) is None


def test_a_stage_started_by_hand_belongs_to_no_execution(clean_env):
    clean_env.delenv("PIPELINE_EXECUTION", raising=False)
    assert tracking.execution() is None  # pytest is not run by DVC


def test_the_execution_is_the_nearest_dvc_process(tmp_path: Path):
    """DVC runs a stage as dvc -> shell -> python: a fake `dvc` doing the same is found."""
    fake = tmp_path / "dvc"
    probe = "from pipeline.tracking.runs import execution; print(execution())"
    shell_cmd = f"{sys.executable} -c '{probe}'"
    fake.write_text(
        "import os, subprocess, sys\n"
        "print(os.getpid(), flush=True)\n"
        f"subprocess.run(['/bin/sh', '-c', {shell_cmd!r}], check=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_EXECUTION"}
    out = subprocess.run(
        [sys.executable, str(fake), "exp", "run", "-S", "lr=0.01"],
        cwd=paths.ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    pid, found = out[0], eval(out[1])  # noqa: S307 - our own repr of a tuple of str
    key, command = found
    assert key.split(":")[1] == pid
    assert command == "dvc exp run -S lr=0.01"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_stages_of_one_execution_share_a_parent_run(clean_env, store):
    params = _params(experiment="pipeline")
    clean_env.setenv("PIPELINE_EXECUTION", "exec-1")
    first = _stage(params, "train_unet", used={"lr": 0.1}, consumes="data/processed")
    second = _stage(params, "prune")
    runs = {
        r.info.run_id: r
        for r in store.search_runs([store.get_experiment_by_name("pipeline").experiment_id])
    }
    assert len(runs) == 3
    parents = [r for r in runs.values() if r.data.tags.get(tracking.ROLE_TAG) == "execution"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags[tracking.EXECUTION_TAG] == "exec-1"
    assert parent.info.status == "FINISHED"
    assert parent.data.params["lr"] == str(params.lr)  # every param, flattened
    assert parent.data.params["mlflow.experiment"] == "pipeline"
    for child in (first, second):
        tags = runs[child].data.tags
        assert tags[tracking.PARENT_TAG] == parent.info.run_id
        assert runs[child].info.status == "FINISHED"
    train = runs[first]
    assert train.data.params == {"lr": "0.1"}
    assert train.data.tags["params.sha256"] == tracking.sha256_json({"lr": 0.1})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_failing_stage_marks_its_execution_failed_and_a_new_one_gets_a_new_parent(
    clean_env, store
):
    params = _params(experiment="pipeline")
    clean_env.setenv("PIPELINE_EXECUTION", "exec-a")
    with pytest.raises(RuntimeError), tracking.mlflow_run(params, "train_unet", "unet"):
        raise RuntimeError("boom")
    clean_env.setenv("PIPELINE_EXECUTION", "exec-b")
    _stage(params, "report")
    exp = store.get_experiment_by_name("pipeline").experiment_id
    by_key = {
        r.data.tags[tracking.EXECUTION_TAG]: r
        for r in store.search_runs([exp], f"tags.`{tracking.ROLE_TAG}` = 'execution'")
    }
    assert by_key["exec-a"].info.status == "FAILED"
    assert by_key["exec-b"].info.status == "FINISHED"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("stage", ["download", "preprocess", "prune", "report"])
def test_a_stage_whose_work_fails_shows_as_failed_in_mlflow(clean_env, store, project, stage):
    """Their runs open after the work: a failure of the work is recorded as a FAILED run with
    the error, and the execution's parent fails with it; the error itself still propagates."""
    import importlib

    import yaml

    from pipeline.core.common import PipelineError

    module = importlib.import_module(f"pipeline.stages.{stage}")
    full = parse_params({"dataset": {"name": "drive", "source": str(project / "none.zip")}})
    (project / "params.yaml").write_text(yaml.safe_dump(full.model_dump()))
    clean_env.setenv("PIPELINE_EXECUTION", f"exec-{stage}")
    with pytest.raises(PipelineError) as err:  # nothing downloaded, nothing to read
        module.main([])
    exp = store.get_experiment_by_name("unet-pipeline").experiment_id
    (run,) = store.search_runs([exp], f"tags.`dvc.stage` = '{stage}'")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == str(err.value)
    assert run.data.params["dataset.name"] == "drive"
    (parent,) = store.search_runs([exp], f"tags.`{tracking.ROLE_TAG}` = 'execution'")
    assert parent.info.status == "FAILED"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_resumed_stage_moves_to_the_new_execution_and_the_killed_one_is_closed(clean_env, store):
    params = _params(experiment="pipeline")
    clean_env.setenv("PIPELINE_EXECUTION", "killed")
    run_id = _stage(params, "train_unet")
    exp = store.get_experiment_by_name("pipeline").experiment_id
    old = store.get_run(run_id).data.tags[tracking.PARENT_TAG]
    store.update_run(old, status="RUNNING")  # as SIGKILL leaves it
    clean_env.setenv("PIPELINE_EXECUTION", "resumed")
    assert _stage(params, "train_unet", run_id=run_id) == run_id
    new = store.search_runs([exp], f"tags.`{tracking.EXECUTION_TAG}` = 'resumed'")
    new_parent = [r for r in new if r.data.tags.get(tracking.ROLE_TAG) == "execution"][0]
    assert store.get_run(run_id).data.tags[tracking.PARENT_TAG] == new_parent.info.run_id
    assert store.get_run(old).info.status == "KILLED"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_headline_metrics_and_files_go_to_the_parent(clean_env, store, tmp_path: Path):
    params = _params(experiment="pipeline")
    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    clean_env.setenv("PIPELINE_EXECUTION", "exec-1")
    with tracking.mlflow_run(params, "report", "report") as run:
        tracking.log_to_parent(run, {"unet_test_miou": 0.75}, files=(report,), folder="report")
        parent = store.get_run(run.info.run_id).data.tags[tracking.PARENT_TAG]
    assert store.get_run(parent).data.metrics == {"unet_test_miou": 0.75}
    assert [a.path for a in store.list_artifacts(parent, "report")] == ["report/report.html"]


def test_without_a_parent_log_to_parent_does_nothing(store):
    with tracking.mlflow_run(_params(experiment="pipeline"), "report", "report") as run:
        tracking.log_to_parent(run, {"x": 1.0})
        assert tracking.PARENT_TAG not in store.get_run(run.info.run_id).data.tags


@pytest.mark.slow
def test_processes_racing_on_a_fresh_store_all_land(tmp_path: Path):
    """Queued experiments start stages at the same moment: the store, the experiment and each
    execution's parent are created once, nothing is lost to "database is locked"."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = (
        "import sys\n"
        "from pipeline.core.config import parse_params\n"
        "from pipeline.tracking.runs import mlflow_run\n"
        "import mlflow\n"
        "p = parse_params({'mlflow': {'experiment': 'race'}})\n"
        "with mlflow_run(p, 'train_unet', sys.argv[1]):\n"
        "    for step in range(20):\n"
        "        mlflow.log_metric('val_miou', step / 20, step=step)\n"
    )
    procs = []
    for i in range(4):
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "DVC_ROOT": str(tmp_path)}
        env["PIPELINE_EXECUTION"] = f"exp-{i % 2}"  # two executions, two stages each
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, f"run-{i}"],
                cwd=paths.ROOT,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    client = MlflowClient(tracking_uri=uri)
    assert len(client.search_experiments(filter_string="name = 'race'")) == 1
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "execution"]
    children = [r for r in runs if tracking.PARENT_TAG in r.data.tags]
    assert len(parents) == 2 and len(children) == 4
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_miou")
        assert len(history) == 20


def test_the_readmes_server_examples_are_local_or_behind_a_login():
    """`mlflow server` has no login by default: the plain example listens on this machine
    only; the one on the network turns MLflow's basic auth on (README.md and docs/, where
    docs/tracking.md holds them)."""
    import re

    pages = [paths.ROOT / "README.md", *sorted((paths.ROOT / "docs").glob("*.md"))]
    readme = "\n".join(page.read_text() for page in pages)
    servers = re.findall(r"^uv run[^\n]*mlflow server(?:[^\n]*\\\n)*[^\n]*", readme, re.M)
    assert len(servers) >= 2
    for command in servers:
        host = re.search(r"--host (\S+)", command)
        assert host, command
        if host.group(1) != "127.0.0.1":
            assert "--app-name basic-auth" in command, command
    assert "MLFLOW_TRACKING_USERNAME" in readme and "MLFLOW_FLASK_SERVER_SECRET_KEY" in readme


# --- a smoke test, a store that refuses writes ------------------------------------------------


def _smoke(p):
    """`p` with report.smoke true."""
    return p.model_copy(update={"report": p.report.model_copy(update={"smoke": True})})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_smoke_tests_runs_say_so_on_the_parent_and_each_stage(clean_env, store):
    """Issue 30: the ci-cpu preset's parent run looked like a real result."""
    params = _params(experiment="pipeline")
    assert not tracking.is_smoke(params) and tracking.is_smoke(_smoke(params))
    clean_env.setenv("PIPELINE_EXECUTION", "smoke")
    child = store.get_run(_stage(_smoke(params), "train_unet"))
    parent = store.get_run(child.data.tags[tracking.PARENT_TAG])
    assert parent.data.tags[tracking.SMOKE_TAG] == "true"
    assert parent.data.tags["mlflow.note.content"] == tracking.SMOKE_NOTE  # its description
    assert tracking.SMOKE_NOTE.startswith("**Smoke test: these metrics mean nothing.**")
    assert child.data.tags[tracking.SMOKE_TAG] == "true"
    clean_env.setenv("PIPELINE_EXECUTION", "real")
    child = store.get_run(_stage(params, "train_unet"))
    parent = store.get_run(child.data.tags[tracking.PARENT_TAG])
    assert tracking.SMOKE_TAG not in parent.data.tags | child.data.tags
    assert "mlflow.note.content" not in parent.data.tags


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_store_that_refuses_writes_is_one_line_naming_it(clean_env, store, tmp_path):
    """A read-only sqlite store (or a server refusing this user) was MLflow's traceback."""
    from pipeline.core.common import PipelineError

    params = _params(experiment="pipeline")
    clean_env.setenv("PIPELINE_EXECUTION", "first")
    _stage(params, "train_unet")  # the store and its experiment exist
    uri = f"sqlite:///file:{tmp_path / 'mlflow.db'}?mode=ro&uri=true"  # SQLAlchemy's read-only
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    clean_env.setenv("PIPELINE_EXECUTION", "second")
    clean_env.chdir(tmp_path)  # MLflow makes the folders of the path it parses, here
    with pytest.raises(PipelineError) as err, tracking.mlflow_run(params, "report", "report"):
        raise AssertionError("no run may start")
    assert str(err.value) == (
        f"MLflow store {uri}: cannot start the report run ((sqlite3.OperationalError) attempt "
        "to write a readonly database); make it writable for this user (a server: its "
        "permissions), or set mlflow.enabled: false"
    )
    assert (tmp_path / "mlflow.db.lock").exists()  # the lock beside the store, not in "file:"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_parent_run_holds_autoconfs_fingerprint_and_reasons(clean_env, store):
    """pipeline.autoconf writes them into params.yaml; the parent run logs every param, and a
    value past MLflow's limit is cut rather than failing the stage."""
    from pipeline.core.config import parse_params

    base = _params(experiment="pipeline").model_dump()
    base["autoconf"] = {
        "budget_s": 1200.0,
        "planned_s": 1100.0,
        "fingerprint": '{"size": [584, 565], "blobs": false, "thickness_px": 2.0}',
        "reasons": ["preprocess.scale 1.0: structures 2 px wide", "x" * 7000],
    }
    clean_env.setenv("PIPELINE_EXECUTION", "exec-auto")
    _stage(parse_params(base), "train_unet", used={"lr": 0.1})
    exp = store.get_experiment_by_name("pipeline").experiment_id
    parent = next(
        r for r in store.search_runs([exp]) if r.data.tags.get(tracking.ROLE_TAG) == "execution"
    )
    logged = parent.data.params
    assert logged["autoconf.budget_s"] == "1200.0"
    assert json.loads(logged["autoconf.fingerprint"])["thickness_px"] == 2.0
    assert "structures 2 px wide" in logged["autoconf.reasons"]
    assert len(logged["autoconf.reasons"]) == tracking.MAX_PARAM


# --- a server or its bucket gone mid-stage --------------------------------------------------


def test_mlflow_failing_mid_stage_is_one_line_and_the_run_failed(clean_env, store):
    """MLflow's own error while a stage logs (its client already retried) becomes one line
    that says the outputs are on disk; the stage's run is FAILED, with the error as a tag."""
    from mlflow.exceptions import MlflowException

    from pipeline.core.common import PipelineError

    params = _params(experiment="pipeline")
    run_id = None
    with (
        pytest.raises(PipelineError) as raised,
        tracking.mlflow_run(params, "prune", "prune") as run,
    ):
        run_id = run.info.run_id
        raise MlflowException("API request to http://h/x failed: too many 500 error responses")
    message = str(raised.value)
    assert "\n" not in message and "the prune run could not log (API request" in message
    assert "its outputs are on disk" in message
    recorded = store.get_run(run_id)
    assert recorded.info.status == "FAILED" and "500" in recorded.data.tags["error"]
    # a mistake of the stage's own is not rewritten
    with pytest.raises(ZeroDivisionError), tracking.mlflow_run(params, "prune", "prune"):
        _ = 1 / 0
