"""A team's tracking server for real: a private PostgreSQL cluster (on a free local port, in an
unprivileged data directory) behind `mlflow server` with basic auth and a local artifacts
destination; two queued DVC experiments run at once against it (`dvc queue start -j 2`).

Every run, parent link, metric history, artifact and registered model version must land.
Skips, saying why, where PostgreSQL is not installed or cannot start (`.ci/run` installs
Debian's package when it can). Slow: two small pipelines at once, about four minutes.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.browser import free_port, mlflow_server
from tests.project import env, make_repo, run_queue

pytestmark = pytest.mark.slow

EPOCHS = 2
PARAMS = {
    "epochs": EPOCHS,
    "dataset": {"num_images": 10, "image_size": 64, "val_count": 2, "test_count": 2},
    "preprocess": {"crop_size": 32, "crop_stride": 32},
    "unet": {"base_channels": 4},
    "unetpp": {"base_channels": 4},
    "pruning": {"latency_runs": 2, "latency_warmup": 1},
}
ADMIN, PASSWORD = "admin", "pipeline-admin-1234"  # basic auth's first admin (auth.ini)
STAGES = ["download", "preprocess", "train_unet", "train_unetpp", "prune", "report"]


def postgres_bin() -> Path | None:
    """The folder of initdb / pg_ctl: Debian keeps them in /usr/lib/postgresql/<v>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def _run(cmd: list, what: str) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        first = (proc.stderr or proc.stdout).strip().splitlines()
        pytest.skip(f"PostgreSQL could not {what}: {first[-1] if first else proc.returncode}")


@contextlib.contextmanager
def postgres(databases: list[str]) -> Iterator[str]:
    """A private cluster on 127.0.0.1:<free port> with `databases`; yields its URI prefix
    postgresql://mlflow@127.0.0.1:<port>/ and removes everything afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="pg-mlflow-"))  # /tmp: reachable by the postgres user
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster runs as Debian's postgres account
        import pwd

        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` account to own the cluster")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    started = False
    try:
        _run([*as_user, bin_dir / "initdb", "-D", data, "-U", "mlflow", "-A", "trust"], "init")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        start = [*as_user, bin_dir / "pg_ctl", "-D", data, "-l", root / "log", "-o", options]
        _run([*start, "-w", "start"], "start")
        started = True
        for db in databases:
            _run([*as_user, bin_dir / "createdb", "-h", root, "-p", port, "-U", "mlflow", db], db)
        yield f"postgresql://mlflow@127.0.0.1:{port}/"
    finally:
        if started:
            stop = [*as_user, bin_dir / "pg_ctl", "-D", data, "-m", "fast", "stop"]
            subprocess.run([str(c) for c in stop], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def tracking_server(store: str, auth_db: str, artifacts: Path) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` on `store`, users in `auth_db`, artifacts
    proxied into `artifacts`; yields its URL."""
    config = artifacts.parent / "auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {auth_db}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
    auth = ["--app-name", "basic-auth"]
    with mlflow_server(store, artifacts, 180, extra_args=auth, env=env) as url:
        yield url


def test_queued_experiments_land_in_a_postgresql_tracking_server_with_basic_auth(
    tmp_path: Path, monkeypatch
):
    import mlflow

    with (
        postgres(["mlflow", "mlflow_auth"]) as pg,
        tracking_server(f"{pg}mlflow", f"{pg}mlflow_auth", tmp_path / "artifacts") as url,
    ):
        # basic auth is on: no credentials, no answer
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        assert refused.value.code == 401

        credentials = {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": ADMIN,
            "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        }
        repo = make_repo(tmp_path / "project", PARAMS)
        init = subprocess.run(
            ["python", "-m", "pipeline.tracking", "init"],
            cwd=repo,
            env=env(**credentials),
            capture_output=True,
            text=True,
        )
        assert init.returncode == 0, init.stderr
        queued = {"pg-a": "0.01", "pg-b": "0.003"}
        run_queue(repo, queued, extra_env=credentials)

        for key, value in credentials.items():
            monkeypatch.setenv(key, value)
        mlflow.set_tracking_uri(url)  # put back after the test by conftest
        check_the_server(url, repo, queued, tmp_path)


def check_the_server(url: str, repo: Path, queued: dict[str, str], tmp_path: Path) -> None:
    """What the queued experiments left on the server (credentials in the environment)."""
    import mlflow

    client = mlflow.MlflowClient(url)
    exp = client.get_experiment_by_name("unet-pipeline")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {
        r.data.tags["dvc.exp_name"]: r
        for r in runs
        if r.data.tags.get("pipeline.role") == "execution"
    }
    assert sorted(parents) == sorted(queued)
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED", name
        children = {
            r.data.tags["dvc.stage"]: r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        }
        assert sorted(children) == sorted(STAGES), name
        for stage, run in children.items():
            assert run.info.status == "FINISHED", (name, stage)
            assert run.data.tags["dvc.exp_name"] == name
        unet = children["train_unet"]
        assert unet.data.params["lr"] == queued[name]
        history = client.get_metric_history(unet.info.run_id, "val_miou")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        logged = {a.path for a in client.list_artifacts(unet.info.run_id, "reports")}
        assert {"reports/epochs.csv", "reports/curves.png"} <= logged
    assert len(runs) == len(queued) * (1 + len(STAGES))  # nothing else, nothing twice
    # the artifacts went through the server into its destination, none into the repo
    assert list((tmp_path / "artifacts").rglob("MLmodel"))
    assert not (repo / "mlflow.db").exists() and not (repo / "mlruns").exists()

    # the registry: each experiment's report registered its chosen model; one champion
    name = "unet-family-synthetic"
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.tags["dvc.exp_name"] for v in versions) == sorted(queued)
    champion = client.get_model_version_by_alias(name, "champion")
    assert float(champion.tags["test_miou"]) == max(float(v.tags["test_miou"]) for v in versions)
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(image)
    answer = served.predict(pd.DataFrame({"image": [image.read_bytes()]}))
    mask = np.asarray(Image.open(io.BytesIO(answer["mask"][0])))
    assert mask.shape == (40, 56)
