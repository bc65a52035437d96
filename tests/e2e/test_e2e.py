"""End to end: the real `dvc repro` and `dvc exp run -S lr=...` in a temporary git repository.

Slow (about two minutes on 2 cores): run with `pytest -m slow`, skip with `-m "not slow"`.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.startup import epoch_seconds, stage_splits
from tests.project import dvc, env, make_repo, run_queue

pytestmark = pytest.mark.slow

EPOCHS = 2
SMALL = {  # a few seconds per stage, same code paths as the defaults
    "epochs": EPOCHS,
    "batch_size": 8,
    "dataset": {"num_images": 10, "image_size": 64, "val_count": 2, "test_count": 2},
    # 8 steps an epoch: enough for both models to learn something, so that a changed lr
    # changes their metrics (`dvc metrics diff` below)
    "preprocess": {"crop_size": 32, "crop_stride": 32, "patches_per_epoch": 64},
    "unet": {"base_channels": 4},
    "unetpp": {"base_channels": 4},
    "pruning": {"latency_runs": 2, "latency_warmup": 1, "onnx": True},  # off by default
}
STAGES = ["download", "preprocess", "train_unet", "train_unetpp", "prune", "report"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("project"), SMALL)


@pytest.fixture(scope="module")
def reproduced(repo: Path) -> str:
    out = dvc(repo, "repro")
    # commit the results like a user keeping a run: experiments and metrics diffs compare to it
    for cmd in (["git", "add", "-A"], ["git", "commit", "-q", "-m", "pipeline results"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env())
    return out


def mlflow_runs(repo: Path) -> tuple:
    """The client of the repo's MLflow store and every run of the pipeline's experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("unet-pipeline")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def executions(runs: list) -> dict[str, tuple]:
    """Parent run name -> (parent run, {stage: child run})."""
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("pipeline.role") == "execution"}
    out = {p.info.run_name: (p, {}) for p in parents.values()}
    for run in runs:
        parent = parents.get(run.data.tags.get("mlflow.parentRunId"))
        if parent is not None:
            stages = out[parent.info.run_name][1]
            assert run.data.tags["dvc.stage"] not in stages, "two runs of one stage"
            stages[run.data.tags["dvc.stage"]] = run
    return out


def test_repro_runs_every_stage_and_writes_its_outputs(repo: Path, reproduced: str):
    for stage in STAGES:
        assert f"Running stage '{stage}'" in reproduced
    # each stage ends with its time split (bench/startup.py reads them); MLflow is on here
    splits = stage_splits(reproduced)
    assert sorted(splits) == sorted(STAGES)
    for split in splits.values():
        assert split["tracking"] > 0 and split["startup"] > 0
        assert abs(split["startup"] + split["tracking"] + split["work"] - split["total"]) < 0.25
    assert len(list((repo / "data/raw/synthetic/images").glob("*.png"))) == 10
    manifest = json.loads((repo / "data/processed/manifest.json").read_text())
    assert {k: len(v) for k, v in manifest["splits"].items()} == {"test": 2, "val": 2, "train": 6}
    for split, stems in manifest["splits"].items():
        for stem in stems:
            assert (repo / f"data/processed/{split}/images/{stem}.npy").is_file()
            assert (repo / f"data/processed/{split}/labels/{stem}.npy").is_file()
    assert not (repo / "data/processed/crops").exists()  # patches are cut while training

    for arch in ("unet", "unetpp"):
        ckpt = torch.load(repo / f"models/{arch}.pt", weights_only=True)
        assert ckpt["arch"] == arch and ckpt["state_dict"] and ckpt["params"]["epochs"] == EPOCHS
        csv = pd.read_csv(repo / f"reports/{arch}/epochs.csv")
        xlsx = pd.read_excel(repo / f"reports/{arch}/epochs.xlsx")
        assert list(csv["epoch"]) == list(range(1, EPOCHS + 1))
        assert {"lr", "train_loss", "val_loss", "val_miou", "val_dice", "seconds"} <= set(csv)
        pd.testing.assert_frame_equal(csv, xlsx, check_dtype=False)
        metrics = json.loads((repo / f"reports/{arch}/metrics.json").read_text())
        for key in ("global_accuracy", "mean_accuracy", "miou", "dice"):
            assert 0.0 <= metrics[key] <= 1.0
        assert ckpt["metrics"] == metrics
        assert metrics["gflops"] > 0 and metrics["latency_ms"] > 0 and metrics["batch"] == 1
        # bench/startup.py's compute floor: the epochs' loading, steps and validation, which
        # the epochs' own timer (train_seconds) also counts, with the logging around them
        assert 0 < epoch_seconds(repo)[arch] <= metrics["train_seconds"] + 0.01  # rounded to 0.01

    onnx = sorted(p.name for p in (repo / "models/onnx").iterdir())
    assert onnx == ["unetpp.onnx", *(f"unetpp_L{k}.onnx" for k in (1, 2, 3, 4))]
    import onnxruntime as ort

    session = ort.InferenceSession(repo / "models/onnx/unetpp_L2.onnx")
    (logits,) = session.run(None, {"image": np.zeros((2, 3, 64, 64), np.float32)})
    assert logits.shape == (2, 1, 64, 64)

    pruning = pd.read_csv(repo / "reports/pruning.csv")
    assert list(pruning["depth"]) == [1, 2, 3, 4]
    assert pruning["params"].is_monotonic_increasing and pruning["gflops"].is_monotonic_increasing
    assert (pruning["latency_ms"] > 0).all()
    summary = json.loads((repo / "reports/pruning.json").read_text())
    assert summary["best_depth"] in (1, 2, 3, 4) and summary["L4"]["miou"] == pytest.approx(
        pruning["miou"].iloc[-1]
    )

    report = (repo / "reports/report.md").read_text()
    assert "UNet++" in report and "| L1" in report and "learning_curves.png" in report
    assert "auc_roc" in report and "sensitivity" in report  # binary task: the ranking metrics
    # the training engine's epoch log: where each epoch's time went
    epochs = pd.read_csv(repo / "reports/unet/epochs.csv")
    assert {"data_seconds", "compute_seconds", "val_seconds", "val_auc_roc"} <= set(epochs)
    assert not (repo / "models/resume").exists() or not any((repo / "models/resume").iterdir())
    sheets = set(pd.ExcelFile(repo / "reports/report.xlsx").sheet_names)
    assert {"setup", "architectures", "test metrics", "pruning", "epoch logs"} <= sheets
    html = (repo / "reports/report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    # self-contained: no link out (outside the embedded images, whose base64 may spell "http")
    assert "http" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", html)
    for png in ("learning_curves.png", "pruning_tradeoff.png"):
        assert (repo / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_cli_segments_a_test_image_with_the_pipelines_checkpoint(
    repo: Path, reproduced: str, tmp_path: Path
):
    stem = json.loads((repo / "data/processed/manifest.json").read_text())["splits"]["test"][0]
    image = repo / "data/raw/synthetic/images" / f"{stem}.png"  # a raw test image
    out = tmp_path / "predictions"  # outside the repo: later tests run experiments in it
    cmd = ["python", "-m", "pipeline.predict", "--model", "models/unetpp.pt", "--depth", "2"]
    proc = subprocess.run(
        [*cmd, str(image), "--out", str(out)], cwd=repo, env=env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    label = np.asarray(Image.open(out / f"{image.stem}_label.png"))
    assert label.shape == np.asarray(Image.open(image)).shape[:2]
    assert set(np.unique(label)) <= {0, 1}
    assert Image.open(out / f"{image.stem}_overlay.png").mode == "RGB"


def test_second_repro_is_a_no_op(repo: Path, reproduced: str):
    out = dvc(repo, "repro")
    assert "Running stage" not in out


def test_repro_is_one_mlflow_parent_run_with_a_child_run_per_stage(repo: Path, reproduced: str):
    client, runs = mlflow_runs(repo)
    found = executions(runs)
    assert len(found) == 1, sorted(found)  # the no-op repro above started no stage, no run
    ((name, (parent, stages)),) = found.items()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()  # the commit the pipeline ran on (the results were committed after it)
    assert name == f"repro {commit[:7]}"
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["git.commit"] == commit
    assert parent.data.tags["dvc.command"] == "dvc repro"
    assert parent.data.params["epochs"] == str(EPOCHS)  # all params, flattened
    assert {"unet_test_miou", "unetpp_test_miou", "best_depth"} <= set(parent.data.metrics)
    assert sorted(stages) == sorted(STAGES)
    assert len(runs) == 1 + len(STAGES)  # nothing outside the execution
    for stage, run in stages.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["git.commit"] == commit
        assert len(run.data.tags["params.sha256"]) == 64
        assert run.data.params, f"{stage}: no params logged"
    for stage in ("preprocess", "train_unet", "train_unetpp", "prune", "report"):
        assert stages[stage].data.tags["data.hash"].startswith("md5:"), stage
    lock = (repo / "dvc.lock").read_text()
    assert stages["train_unet"].data.tags["data.hash"].removeprefix("md5:") in lock
    # artifacts: epoch logs, plots and the model on the training runs, the report on the parent
    unet = stages["train_unet"].info.run_id
    logged = {a.path for a in client.list_artifacts(unet, "reports")}
    assert {"reports/epochs.csv", "reports/epochs.xlsx", "reports/curves.png"} <= logged
    assert client.get_metric_history(unet, "val_miou")[-1].step == EPOCHS
    on_parent = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/report.xlsx"} <= on_parent


REGISTERED = "unet-family-synthetic"  # mlflow.registered_model for the synthetic dataset


def chosen_checkpoint(repo: Path, label: str) -> tuple[Path, int | None]:
    """(checkpoint, depth) of a registered model's label: UNet, UNet++ or UNet++ L<k>."""
    if label.startswith("UNet++ L"):
        return repo / "models/unetpp.pt", int(label.removeprefix("UNet++ L"))
    return repo / {"UNet": "models/unet.pt", "UNet++": "models/unetpp.pt"}[label], None


def test_report_registers_the_chosen_model_as_champion(repo: Path, reproduced: str):
    client, runs = mlflow_runs(repo)
    _, stages = executions(runs)[next(iter(executions(runs)))]
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert str(version.version) == "1"
    assert stages["report"].data.tags["registered_model"] == f"{REGISTERED}/1"
    tags = version.tags
    assert tags["dataset"] == "synthetic" and len(tags["test_split"]) == 16
    assert tags["git.commit"] == stages["report"].data.tags["git.commit"]
    # the better architecture, or the best pruned depth within pruning.tolerance of it
    scores = {
        name: json.loads((repo / f"reports/{arch}/metrics.json").read_text())["miou"]
        for arch, name in (("unet", "UNet"), ("unetpp", "UNet++"))
    }
    pruning = json.loads((repo / "reports/pruning.json").read_text())
    scores |= {f"UNet++ {k}": v["miou"] for k, v in pruning.items() if k.startswith("L")}
    label = tags["model"]
    assert float(tags["test_miou"]) == pytest.approx(scores[label], abs=1e-5)
    assert scores[label] >= max(scores["UNet"], scores["UNet++"]) - 0.01
    stage = (
        "prune"
        if label.startswith("UNet++ L")
        else f"train_{'unet' if label == 'UNet' else 'unetpp'}"
    )
    assert version.run_id == stages[stage].info.run_id


def test_the_champion_served_over_http_answers_like_pipeline_predict(
    repo: Path, reproduced: str, tmp_path: Path
):
    """`mlflow models serve -m models:/<name>@champion --env-manager local`, one REST request
    with a raw test image (base64), and the mask `pipeline.predict` writes for it."""
    import base64
    import urllib.request

    from bench import serve_latency
    from pipeline.predict import predict_files
    from tests.browser import model_server

    client, _ = mlflow_runs(repo)
    label = client.get_model_version_by_alias(REGISTERED, "champion").tags["model"]
    checkpoint, depth = chosen_checkpoint(repo, label)
    image = repo / "data/processed/example.png"  # a raw test image, as users send them
    predict_files(checkpoint, [image], tmp_path / "out", depth=depth, device="cpu")
    request = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(image.read_bytes()).decode()]],
        },
        "params": {"probabilities": True},
    }
    uri = f"models:/{REGISTERED}@champion"
    with model_server(uri, f"sqlite:///{repo / 'mlflow.db'}") as url:
        req = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as response:
            answer = json.loads(response.read())
        # bench/serve_latency.py's timed request against the same server: two images, two masks
        assert serve_latency.request(url, [image.read_bytes()] * 2) > 0
    (row,) = answer["predictions"]
    expected = (tmp_path / "out" / "example_label.png").read_bytes()
    assert base64.b64decode(row["mask"]) == expected
    probs = np.load(io.BytesIO(base64.b64decode(row["probabilities"])))
    assert probs.shape == (row["height"], row["width"]) and probs.dtype == np.float32


@pytest.mark.browser
def test_mlflow_server_and_a_browser_show_the_pipelines_runs_and_report(
    repo: Path, reproduced: str, tmp_path: Path
):
    """What users look at: the MLflow server's REST API and UI on the repo's store, and
    report.html, rendered by headless Chromium (those checks skip without Chromium)."""
    from tests.browser import check_png, chromium, mlflow_server, page_text, rest, snapshot

    def tags(run: dict) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    shots = Path(os.environ.get("BROWSER_SCREENSHOTS_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with mlflow_server(f"sqlite:///{repo / 'mlflow.db'}", repo / "mlartifacts") as server:
        exp_id = rest(server, "experiments/get-by-name", {"experiment_name": "unet-pipeline"})[
            "experiment"
        ]["experiment_id"]
        runs = rest(server, "runs/search", {"experiment_ids": [exp_id], "max_results": 100})
        runs = runs["runs"]
        (parent,) = [r for r in runs if tags(r).get("pipeline.role") == "execution"]
        children = {
            tags(r)["dvc.stage"]: r
            for r in runs
            if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]
        }
        assert sorted(children) == sorted(STAGES)
        unet = children["train_unet"]["info"]["run_id"]
        history = rest(server, "metrics/get-history", {"run_id": unet, "metric_key": "val_miou"})
        assert sorted(m["step"] for m in history["metrics"]) == list(range(1, EPOCHS + 1))
        if chromium() is None:
            pytest.skip("Chromium not installed (apt-get install chromium): no screenshots")
        url = f"{server}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        dom = snapshot(url, shots / "mlflow_runs.png", 1280, 800)
        check_png(shots / "mlflow_runs.png", 1280, 800)
        text = page_text(dom)
        assert parent["info"]["run_name"] in text, text[:2000]
        assert f"{len(runs)} matching runs" in text, text[:2000]

    dom = snapshot(repo / "reports/report.html", shots / "report.png", 1280, 3000, wait_ms=2_000)
    check_png(shots / "report.png", 1280, 3000)
    text = page_text(dom)
    assert "UNet vs UNet++" in text and "L4" in text


def test_exp_run_lr_retrains_both_models_only_and_is_tracked(repo: Path, reproduced: str):
    out = dvc(repo, "exp", "run", "-S", "lr=0.01", "-n", "lr-0.01")
    ran = {s for s in STAGES if f"Running stage '{s}'" in out}
    assert ran == {"train_unet", "train_unetpp", "prune", "report"}, out

    exps = json.loads(dvc(repo, "exp", "show", "--json"))
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if node.get("name") == "lr-0.01" and isinstance(node.get("data"), dict):
                found.update(node["data"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(exps)
    assert found, "experiment lr-0.01 not in dvc exp show --json"
    assert found["params"]["params.yaml"]["data"]["lr"] == 0.01
    metrics = found["metrics"]
    for arch in ("unet", "unetpp"):
        assert 0.0 <= metrics[f"reports/{arch}/metrics.json"]["data"]["miou"] <= 1.0

    # MLflow: the repo's sqlite store holds both archs' runs of both executions
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("unet-pipeline")
    runs = client.search_runs([exp.experiment_id])
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("dvc.stage"), []).append(run)
    for stage in ("train_unet", "train_unetpp"):
        assert len(by_stage[stage]) == 2, f"{stage}: {len(by_stage.get(stage, []))} runs"
        lrs = sorted(float(r.data.params["lr"]) for r in by_stage[stage])
        assert lrs == [0.003, 0.01]
        for run in by_stage[stage]:
            history = client.get_metric_history(run.info.run_id, "val_miou")
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
            assert "git.commit" in run.data.tags
        assert any(r.data.tags.get("dvc.exp_name") == "lr-0.01" for r in by_stage[stage])
    assert {"prune", "report"} <= set(by_stage)
    # the experiment is its own execution: a parent named after it, a child per stage it ran
    parent, stages = executions(runs)["lr-0.01"]
    assert sorted(stages) == sorted(ran)
    assert parent.data.tags["dvc.exp_name"] == "lr-0.01"
    assert parent.data.tags["dvc.baseline_rev"] == parent.data.tags["git.commit"]
    assert parent.data.params["lr"] == "0.01"
    # dvc exp show: both architectures' main metrics and the best pruning depth
    assert 1 <= metrics["reports/pruning.json"]["data"]["best_depth"] <= 4
    table = dvc(repo, "exp", "show", "--csv")
    header = table.splitlines()[0].split(",")
    wanted = {
        "reports/unet/metrics.json:miou",
        "reports/unetpp/metrics.json:miou",
        "reports/unetpp/metrics.json:auc_roc",
    }
    assert wanted <= set(header), header
    assert {"best_depth", "lr"} <= set(header), header  # unique names need no file prefix


def test_plots_and_metrics_diff_for_ci(repo: Path, reproduced: str, tmp_path: Path):
    """`dvc plots show` renders both learning curves; `dvc metrics diff --md` is a table a CI
    job can post (the workspace holds the lr-0.01 experiment, HEAD the committed results)."""
    dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "Validation mIoU" in page and "Loss" in page
    for arch in ("unet", "unetpp"):
        assert f"reports/{arch}/epochs.csv" in page
    diff = dvc(repo, "metrics", "diff", "--md")
    lines = [line for line in diff.splitlines() if line.startswith("|")]
    assert lines[0].replace(" ", "").startswith("|Path|Metric|HEAD|workspace|Change|"), diff
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in lines[2:]}
    assert ("reports/unet/metrics.json", "miou") in rows
    assert ("reports/unetpp/metrics.json", "miou") in rows


def test_bad_param_stops_with_one_line_and_keeps_earlier_outputs(repo: Path, reproduced: str):
    kept = [
        "models/unet.pt",
        "models/unetpp.pt",
        "reports/unet/metrics.json",
        "reports/unet/epochs.csv",
        "reports/report.md",
    ]
    before = {rel: (repo / rel).read_bytes() for rel in kept}
    proc = subprocess.run(
        ["dvc", "exp", "run", "-S", "lr=-1"],
        cwd=repo,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    subprocess.run(["git", "checkout", "params.yaml"], cwd=repo, check=True)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR pipeline" in line]
    assert len(errors) == 1 and errors[0].endswith(
        "params.yaml: lr: Input should be greater than 0 (got -1)"
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    for rel, content in before.items():
        assert (repo / rel).read_bytes() == content, f"{rel} changed after a failed stage"


def test_queued_experiments_with_two_workers_all_land_in_the_repo_store(
    repo: Path, reproduced: str
):
    """`dvc exp run --queue` twice, then `dvc queue start -j 2`: both run at once in temporary
    copies, and every MLflow run lands in the repo's store."""
    init = subprocess.run(
        ["python", "-m", "pipeline.tracking", "init"],
        cwd=repo,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert init.returncode == 0, init.stderr
    queued = {"q-fast": "0.02", "q-slow": "0.001"}
    run_queue(repo, queued)

    _, runs = mlflow_runs(repo)
    found = executions(runs)
    for name, lr in queued.items():
        parent, stages = found[name]
        assert parent.info.status == "FINISHED"
        assert sorted(stages) == ["prune", "report", "train_unet", "train_unetpp"], name
        for stage, run in stages.items():
            assert run.info.status == "FINISHED", (name, stage)
            assert run.data.tags["dvc.exp_name"] == name
        assert stages["train_unet"].data.params["lr"] == lr
    # nothing was written to a store inside the temporary copies
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    # each experiment's report registered its chosen model; one version holds `champion`
    client, _ = mlflow_runs(repo)
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    for name in queued:
        assert [v for v in versions if v.tags.get("dvc.exp_name") == name], name
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    best = max(float(v.tags["test_miou"]) for v in versions)
    assert float(champion.tags["test_miou"]) == best
