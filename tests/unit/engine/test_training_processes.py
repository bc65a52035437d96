"""Training as separate processes, the way DVC runs it: killed with SIGKILL and re-run, and
trained by two DDP processes (gloo on CPU) through `train.processes`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.project import env, make_repo

pytestmark = pytest.mark.slow

TINY = {
    "seed": 3,
    "lr": 0.03,
    "epochs": 6,
    "batch_size": 8,
    "dataset": {"num_images": 6, "image_size": 64, "val_count": 1, "test_count": 1},
    "preprocess": {"crop_size": 32, "crop_stride": 8},
    "unet": {"base_channels": 8, "depth": 2},
    "train": {"scheduler": "cosine", "warmup_epochs": 1.0},
    "inference": {"tile_size": 32, "tile_overlap": 8},
    "pruning": {"latency_runs": 1, "latency_warmup": 0},
    "mlflow": {"enabled": True},
}
TIMINGS = ("seconds", "latency_ms", "images_per_s")


def run(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=repo, env=env(), capture_output=True, text=True
    )
    if check:
        assert proc.returncode == 0, f"{args} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project copy with the tiny synthetic dataset downloaded and preprocessed."""
    repo = make_repo(tmp_path_factory.mktemp("train") / "repo", TINY)
    run(repo, "pipeline.stages.download")
    run(repo, "pipeline.stages.preprocess")
    return repo


@pytest.fixture
def repo(prepared, tmp_path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(prepared, copy, symlinks=True)
    return copy


def set_params(repo: Path, **sections) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        if isinstance(value, dict):
            params[key] = {**params[key], **value}
        else:
            params[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def results(repo: Path) -> str:
    metrics = json.loads((repo / "reports" / "unet" / "metrics.json").read_text())
    keep = {k: v for k, v in metrics.items() if k != "train_seconds" and "latency" not in k}
    return json.dumps(keep, sort_keys=True)


def epoch_log(repo: Path):
    import pandas as pd

    df = pd.read_csv(repo / "reports" / "unet" / "epochs.csv")
    return df[[c for c in df.columns if not any(t in c for t in TIMINGS)]]


def mlflow_runs(repo: Path, stage: str):
    """The store's runs of one stage (download and preprocess log runs of their own)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("unet-pipeline")
    return client, client.search_runs([exp.experiment_id], f"tags.`dvc.stage` = '{stage}'")


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(prepared, repo):
    run(prepared, "pipeline.stages.train", "unet")  # the uninterrupted reference, in the other copy
    state_file = repo / "models" / "resume" / "unet.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages.train", "unet"],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # as hard as it gets: no cleanup, no atexit
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(state_file, weights_only=True)
    assert 1 <= state["epoch"] < TINY["epochs"], "the kill must land before the last epoch"
    assert not (repo / "reports" / "unet" / "metrics.json").exists()

    resumed = run(repo, "pipeline.stages.train", "unet")
    assert f"resuming after epoch {state['epoch']}" in resumed.stderr
    assert results(repo) == results(prepared)
    assert epoch_log(repo).equals(epoch_log(prepared))
    assert not state_file.exists()

    # the same MLflow run carried on: one run, finished, with every epoch's metrics
    client, runs = mlflow_runs(repo, "train_unet")
    assert len(runs) == 1 and runs[0].info.run_id == state["run_id"]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(state["run_id"], "val_miou")]
    assert sorted(set(steps)) == list(range(1, TINY["epochs"] + 1))


DDP_PARAMS = {
    "epochs": 4,
    "batch_size": 16,
    "unet": {"norm": "none"},
    "loss": {"dice_weight": 0.0},
    "train": {"scheduler": "none", "warmup_epochs": 0.0, "amp": "none"},
    "mlflow": {"enabled": False},
}


def check_matches(single: Path, double: Path) -> None:
    """Two DDP ranks trained like one process, within float reduction order."""
    one, two = epoch_log(single), epoch_log(double)
    assert len(two) == DDP_PARAMS["epochs"]
    for col in ("train_loss", "val_loss"):
        assert two[col].to_numpy() == pytest.approx(one[col].to_numpy(), rel=0.03), col
    a, b = json.loads(results(single)), json.loads(results(double))
    for key in ("miou", "global_accuracy", "auc_roc"):
        assert b[key] == pytest.approx(a[key], abs=0.03), key


def test_two_ddp_processes_match_one_process(prepared, repo):
    # no BatchNorm (per-rank statistics on CPU) and CE only (Dice does not split over ranks),
    # so the two runs differ only by float reduction order and per-rank loss normalisation;
    # 8 crops per rank and a constant lr keep that difference small; fp32 (amp none, the
    # reference path): bf16's rounding would amplify it on a CPU where amp auto picks bf16
    for copy in (prepared, repo):
        set_params(copy, **DDP_PARAMS)
    run(prepared, "pipeline.stages.train", "unet")
    set_params(repo, train={"processes": 2})
    ddp = run(repo, "pipeline.stages.train", "unet")
    assert "launching 2 DDP processes" in ddp.stderr
    assert ddp.stderr.count("unet test: miou") == 1  # rank 0 alone logs and writes
    check_matches(prepared, repo)


def test_two_nodes_through_a_c10d_rendezvous_match_one_process(prepared, repo, tmp_path):
    """Two "nodes" (torchrun --nnodes 2, a c10d rendezvous on 127.0.0.1, gloo), each with its
    own copy of the project as on separate disks: global rank 0 alone logs and writes."""
    from bench.servers import free_port

    shutil.rmtree(repo / "reports" / "unet", ignore_errors=True)  # an earlier test's
    shutil.rmtree(repo / "models", ignore_errors=True)
    other = tmp_path / "node1"
    shutil.copytree(repo, other, symlinks=True)
    for copy in (prepared, repo, other):
        set_params(copy, **DDP_PARAMS)
    run(prepared, "pipeline.stages.train", "unet")  # the single-process reference
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=test-two-nodes",
        "--local-addr=127.0.0.1",  # what the other node dials for the process group
        "-m",
        "pipeline.stages.train",
        "unet",
    ]
    nodes = [
        subprocess.Popen(
            launch, cwd=where, env=env(OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True
        )
        for where in (repo, other)
    ]
    logs = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(t[-3000:] for t in logs)
    # the rendezvous ranks the nodes in any order: global rank 0 is whichever wrote
    written = [where for where in (repo, other) if (where / "models" / "unet.pt").exists()]
    assert len(written) == 1, "exactly one node (global rank 0) writes"
    main = written[0]
    assert sum(log.count("unet test: miou") for log in logs) == 1  # and logs
    quiet = other if main == repo else repo
    assert not (quiet / "models").exists() and not (quiet / "reports" / "unet").exists()
    check_matches(prepared, main)


def test_processes_must_divide_the_batch(repo):
    set_params(repo, batch_size=7, train={"processes": 2})
    proc = run(repo, "pipeline.stages.train", "unet", check=False)
    assert proc.returncode == 1
    assert "batch_size (7) must be divisible by train.processes (2)" in proc.stderr
