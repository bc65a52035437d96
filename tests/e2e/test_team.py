"""A team beyond one machine, for real on 127.0.0.1 (docs/team.md): an S3 bucket (moto's
server), a tracking server on PostgreSQL whose artifacts go to the bucket, a bare git remote,
and three clones of it.

Alice and Bob each run a queued experiment at once (`dvc exp run --queue`, `dvc queue start`)
against the server and `dvc exp push` it (git refs to the remote, outputs to the s3:// DVC
remote). Alice adopts hers: commit, `git push`, `dvc push`. Carol clones, `dvc pull`s
bit-identical data and models, finds `dvc repro` up to date, `dvc exp pull`s both experiments
and sees them in `dvc exp show`. The server holds both executions with their stages' runs, the
artifacts are in the bucket, and `mlflow models serve` answers with the champion.

And when the bucket is unreachable: `dvc push` fails and finishes later, a stage against the
server (with basic auth: no login, no answer) stops in one line with its outputs on disk.

Skips, saying why, where PostgreSQL or the S3 server cannot start. Slow: two small pipelines
at once and the rest, about three and a half minutes on 2 cores.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bench.servers import ADMIN, OPENER, PASSWORD, S3_ENV, mlflow_server, model_server, s3_keys
from tests.project import dvc, env, make_repo, start_queue, wait_queue
from tests.servers import postgres, s3

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
STAGES = ["download", "preprocess", "train_unet", "train_unetpp", "prune", "report"]
BUCKET = "team"
REGISTERED = "unet-family-synthetic"
QUEUED = {"alice": "0.01", "bob": "0.003"}  # whose experiment: its lr


def git(repo: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=repo, env=env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"git {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def origin(tmp_path: Path, endpoint: str) -> Path:
    """The team's bare git remote: the project with its DVC remote on the bucket committed
    (the endpoint too, as for MinIO or any S3-compatible store; keys stay in the env)."""
    repo = make_repo(tmp_path / "seed", PARAMS)
    dvc(repo, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(repo, "remote", "modify", "storage", "endpointurl", endpoint)
    git(repo, "commit", "-qam", "DVC remote on the team's bucket")
    bare = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    return bare


def clone(bare: Path, where: Path) -> Path:
    git(bare.parent, "clone", "-q", str(bare), str(where))
    return where


def tracked_outputs(repo: Path) -> dict[str, bytes]:
    """Every file of every cached stage output in dvc.lock, by its path in the repo."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    files: dict[str, bytes] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            root = repo / out["path"]
            for f in [root] if root.is_file() else sorted(root.rglob("*")):
                if f.is_file():
                    files[str(f.relative_to(repo))] = f.read_bytes()
    return files


def test_a_team_shares_data_models_and_experiments_through_git_a_bucket_and_one_server(
    tmp_path: Path, monkeypatch
):
    import mlflow

    with (
        s3([BUCKET]) as endpoint,
        postgres(["mlflow"]) as pg,
        mlflow_server(
            f"{pg}mlflow",
            f"s3://{BUCKET}/mlflow",
            180,
            # only the server holds the bucket's keys for MLflow: clients go through it
            env={**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint},
        ) as url,
    ):
        tracking = {"MLFLOW_TRACKING_URI": url}
        # DVC's remote needs the bucket's keys; one core per "machine": two torch processes
        # with a thread per core each would oversubscribe this one tenfold
        member = {**tracking, **S3_ENV, "OMP_NUM_THREADS": "1"}

        bare = origin(tmp_path, endpoint)
        alice, bob = clone(bare, tmp_path / "alice"), clone(bare, tmp_path / "bob")
        init = subprocess.run(
            ["python", "-m", "pipeline.tracking", "init"],
            cwd=alice,
            env=env(**tracking),
            capture_output=True,
            text=True,
        )
        assert init.returncode == 0, init.stderr
        for who, repo in (("alice", alice), ("bob", bob)):  # two machines, at once
            start_queue(repo, {who: QUEUED[who]}, extra_env=member)
        for who, repo in (("alice", alice), ("bob", bob)):
            wait_queue(repo, [who])
            dvc(repo, "exp", "push", "origin", who, extra_env=member)

        # Alice adopts her experiment for everyone: git for the code and dvc.lock, the bucket
        # for the data and models
        dvc(alice, "exp", "apply", "alice", extra_env=member)
        git(alice, "add", "-A")
        git(alice, "commit", "-qm", "adopt alice's experiment")
        git(alice, "push", "-q", "origin", "main")
        dvc(alice, "push", extra_env=member)

        carol = clone(bare, tmp_path / "carol")
        dvc(carol, "pull", extra_env=member)
        pulled, original = tracked_outputs(carol), tracked_outputs(alice)
        assert any(p.startswith("models/") for p in original)
        assert any(p.startswith("data/processed") for p in original)
        assert pulled.keys() == original.keys()
        assert all(pulled[p] == original[p] for p in original), "pulled files differ"
        assert "Data and pipelines are up to date" in dvc(carol, "repro", extra_env=member)

        for who in QUEUED:
            dvc(carol, "exp", "pull", "origin", who, extra_env=member)
        check_experiments(carol)

        for key, value in tracking.items():
            monkeypatch.setenv(key, value)
        mlflow.set_tracking_uri(url)  # put back after the test by conftest
        check_the_server(url)
        check_the_bucket(endpoint, url, [alice, bob, carol])
        check_serving(url, tmp_path)


def check_experiments(repo: Path) -> None:
    """`dvc exp show` lists both pulled experiments with their own metrics."""
    shown = json.loads(dvc(repo, "exp", "show", "-A", "--json", "--no-pager"))
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") in QUEUED:
                    found[rev["name"]] = rev["data"]
    assert sorted(found) == sorted(QUEUED), shown
    for who, data in found.items():
        assert str(data["params"]["params.yaml"]["data"]["lr"]) == QUEUED[who]
        metrics = data["metrics"]["reports/unet/metrics.json"]["data"]
        assert 0.0 <= metrics["miou"] <= 1.0, who
    assert found["alice"]["metrics"] != found["bob"]["metrics"]


def check_the_server(url: str) -> None:
    """Both executions with each stage's run, their metric histories and the registry."""
    import mlflow

    client = mlflow.MlflowClient(url)
    exp = client.get_experiment_by_name("unet-pipeline")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {
        r.data.tags["dvc.exp_name"]: r
        for r in runs
        if r.data.tags.get("pipeline.role") == "execution"
    }
    assert sorted(parents) == sorted(QUEUED)
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
        assert unet.data.params["lr"] == QUEUED[name]
        history = client.get_metric_history(unet.info.run_id, "val_miou")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert len(runs) == len(QUEUED) * (1 + len(STAGES))  # nothing else, nothing twice

    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert sorted(v.tags["dvc.exp_name"] for v in versions) == sorted(QUEUED)
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert float(champion.tags["test_miou"]) == max(float(v.tags["test_miou"]) for v in versions)


def check_the_bucket(endpoint: str, url: str, clones: list[Path]) -> None:
    """The models, the report and the segmenter went through the server into the bucket, and
    no clone kept a local store or artifacts."""
    import mlflow

    client = mlflow.MlflowClient(url)
    keys = set(s3_keys(endpoint, BUCKET, "mlflow/"))
    assert sum(k.endswith("/report/report.html") for k in keys) >= len(QUEUED)
    assert sum(k.endswith("/checkpoint/unet.pt") for k in keys) == len(QUEUED)
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    model = client.get_logged_model(champion.source.removeprefix("models:/"))
    # mlflow-artifacts:/<exp>/models/<id>/artifacts: proxied into s3://team/mlflow/<exp>/...
    where = model.artifact_location.removeprefix("mlflow-artifacts:/").strip("/")
    assert f"mlflow/{where}/MLmodel" in keys, (model.artifact_location, sorted(keys)[:20])
    assert any(k.startswith(f"mlflow/{where}/artifacts/") for k in keys)  # its checkpoint
    assert sum(k.endswith("/MLmodel") for k in keys) >= 2 * len(QUEUED)  # every logged model
    assert s3_keys(endpoint, BUCKET, "dvc/files/md5/")  # and DVC's cache
    for repo in clones:
        assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()


def check_serving(url: str, tmp_path: Path) -> None:
    """`mlflow models serve -m models:/<name>@champion` loads it from the bucket (through the
    server) and answers a REST request with a mask of the image's size."""
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), np.uint8)).save(image)
    request = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(image.read_bytes()).decode()]],
        }
    }
    with model_server(f"models:/{REGISTERED}@champion", url) as served:
        req = urllib.request.Request(
            f"{served}/invocations",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with OPENER.open(req, timeout=120) as response:
            (row,) = json.loads(response.read())["predictions"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["mask"]))))
    assert mask.shape == (40, 56) and mask.dtype == np.uint8


def stage(repo: Path, name: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["python", "-m", f"pipeline.stages.{name}"],
        cwd=repo,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if " ERROR " in line or "ERROR:" in line]


def test_an_unreachable_bucket_is_one_line_and_loses_nothing(tmp_path: Path, monkeypatch):
    """The bucket down, then back on the same address: DVC's push fails, then finishes; a
    stage against the tracking server (basic auth) stops in one line, its outputs on disk."""
    import mlflow

    from bench.servers import free_port

    port = free_port()  # where the bucket will be: nothing answers there yet
    bucket = f"http://127.0.0.1:{port}"
    repo = make_repo(tmp_path / "repo", PARAMS)
    dvc(repo, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(repo, "remote", "modify", "storage", "endpointurl", bucket)
    (repo / "data" / "notes.bin").write_bytes(b"kept\n" * 1000)
    dvc(repo, "add", "data/notes.bin")
    push = subprocess.run(
        ["dvc", "push"], cwd=repo, env=env(**S3_ENV), capture_output=True, text=True, timeout=600
    )
    assert push.returncode != 0 and errors(push), push.stderr
    assert (repo / "data" / "notes.bin").read_bytes() == b"kept\n" * 1000
    assert [f for f in (repo / ".dvc" / "cache").rglob("*") if f.is_file()]  # the local cache

    store, users = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'auth.db'}"
    server_env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": bucket}
    with mlflow_server(store, f"s3://{BUCKET}/mlflow", 180, server_env, auth_db=users) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:  # basic auth: no login, no answer
            OPENER.open(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        assert refused.value.code == 401
        anonymous = stage(repo, "download", MLFLOW_TRACKING_URI=url)
        assert anonymous.returncode == 1 and len(errors(anonymous)) == 1, anonymous.stderr
        assert "401" in errors(anonymous)[0] or "nauthorized" in errors(anonymous)[0]

        login = {
            "MLFLOW_TRACKING_URI": url,
            "MLFLOW_TRACKING_USERNAME": ADMIN,
            "MLFLOW_TRACKING_PASSWORD": PASSWORD,
        }
        started = time.monotonic()
        down = stage(repo, "download", **login)
        assert down.returncode == 1 and len(errors(down)) == 1, down.stderr
        assert "its artifact store does not answer" in errors(down)[0]
        assert time.monotonic() - started < 120  # not MLflow's four minutes of retries per file
        assert (repo / "data" / "raw" / "synthetic" / "source.json").is_file()  # on disk

        with s3([BUCKET], port=port):  # the bucket is back
            dvc(repo, "push", extra_env=S3_ENV)
            assert s3_keys(bucket, BUCKET, "dvc/files/md5/")
            up = stage(repo, "download", **login)
            assert up.returncode == 0, up.stderr
            keys = s3_keys(bucket, BUCKET, "mlflow/")
        for key, value in login.items():
            monkeypatch.setenv(key, value)
        client = mlflow.MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("unet-pipeline").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # the failed tries opened no run
    assert any(k.endswith(f"{runs[0].info.run_id}/artifacts/source.json") for k in keys)
