"""A real `mlflow server` on a small sqlite store: its REST API and its UI in headless Chromium.

No DVC pipeline needed: the store is written here with MlflowClient, shaped like the
pipeline's (a parent "execution" run with nested stage runs). The server and Chromium tests
are marked slow; the UI tests skip when Chromium is missing (.ci/run installs it).
Set BROWSER_SCREENSHOTS_DIR to keep the screenshots.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.browser import (
    check_png,
    chromium,
    free_port,
    mlflow_server,
    page_text,
    rest,
    snapshot,
)

EXPERIMENT = "unet-pipeline"
PARENT_NAME = "repro abc1234"
CHILDREN = ("train_unet", "train_unetpp")
STEPS = (1, 2, 3)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # mlflow's sqlalchemy


@pytest.fixture(scope="module")
def browser() -> str:
    """The Chromium binary; skips the test (before any server starts) when there is none."""
    exe = chromium()
    if exe is None:
        pytest.skip("Chromium not installed (apt-get install chromium)")
    return exe


def _keep(png: Path) -> None:
    keep = os.environ.get("BROWSER_SCREENSHOTS_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(keep) / png.name)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """An sqlite store: experiment, parent run, two child runs with params and metric history."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    artifacts = root / "mlartifacts"
    client = MlflowClient(tracking_uri=uri)  # never mlflow.set_tracking_uri: process-global
    experiment_id = client.create_experiment(
        EXPERIMENT, artifact_location=(artifacts / EXPERIMENT).as_uri()
    )
    parent = client.create_run(
        experiment_id, run_name=PARENT_NAME, tags={"pipeline.role": "execution"}
    )
    parent_id = parent.info.run_id
    children = {}
    for i, name in enumerate(CHILDREN):
        run = client.create_run(
            experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": parent_id, "dvc.stage": name},
        )
        t0 = run.info.start_time
        client.log_batch(
            run.info.run_id,
            metrics=[
                Metric("val_miou", 0.5 + 0.1 * step + 0.01 * i, t0 + step, step) for step in STEPS
            ],
            params=[Param("lr", "0.001")],
        )
        client.set_terminated(run.info.run_id)
        children[name] = run.info.run_id
    client.set_terminated(parent_id)
    return {
        "uri": uri,
        "artifacts": artifacts,
        "experiment_id": experiment_id,
        "parent_id": parent_id,
        "children": children,
    }


@pytest.fixture(scope="module")
def server(store) -> str:
    with mlflow_server(store["uri"], store["artifacts"]) as base_url:
        yield base_url


# --- fast: the helpers themselves -------------------------------------------------------


def test_free_port_is_bindable():
    import socket

    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_check_png_accepts_a_picture_and_rejects_blank_or_wrong_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    noisy = tmp_path / "noisy.png"
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(noisy)
    assert check_png(noisy, 60, 40).shape == (40, 60, 3)
    with pytest.raises(AssertionError, match="not"):
        check_png(noisy, 61, 40)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (60, 40), "white").save(blank)
    with pytest.raises(AssertionError, match="blank"):
        check_png(blank, 60, 40)
    with pytest.raises(AssertionError, match="no screenshot"):
        check_png(tmp_path / "missing.png", 60, 40)


def test_page_text_drops_markup():
    html = "<p>3 <b>matching</b> runs</p><script>var x = '<p>no</p>';</script><svg>z</svg>"
    assert page_text(html) == "3 matching runs"


# --- slow: a real server ---------------------------------------------------------------


@pytest.mark.slow
def test_rest_api_serves_the_runs_and_their_nesting(store, server):
    experiment = rest(server, "experiments/get-by-name", {"experiment_name": EXPERIMENT})
    experiment = experiment["experiment"]
    assert experiment["experiment_id"] == store["experiment_id"]
    assert experiment["artifact_location"] == (store["artifacts"] / EXPERIMENT).as_uri()

    found = rest(
        server, "runs/search", {"experiment_ids": [store["experiment_id"]], "max_results": 100}
    )
    runs = {r["info"]["run_name"]: r for r in found["runs"]}
    assert sorted(runs) == sorted([PARENT_NAME, *CHILDREN])
    assert all(r["info"]["status"] == "FINISHED" for r in runs.values())

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    assert tags(runs[PARENT_NAME])["pipeline.role"] == "execution"
    assert "mlflow.parentRunId" not in tags(runs[PARENT_NAME])
    for name in CHILDREN:
        assert tags(runs[name])["mlflow.parentRunId"] == store["parent_id"]
        assert runs[name]["info"]["run_id"] == store["children"][name]
        assert {p["key"]: p["value"] for p in runs[name]["data"]["params"]} == {"lr": "0.001"}

    child_id = store["children"][CHILDREN[0]]
    history = rest(server, "metrics/get-history", {"run_id": child_id, "metric_key": "val_miou"})
    points = sorted((m["step"], m["value"]) for m in history["metrics"])
    assert [step for step, _ in points] == list(STEPS)
    assert [value for _, value in points] == pytest.approx([0.6, 0.7, 0.8])

    # the parent's children, the way the UI finds them
    nested = rest(
        server,
        "runs/search",
        {
            "experiment_ids": [store["experiment_id"]],
            "filter": f"tags.mlflow.parentRunId = '{store['parent_id']}'",
        },
    )
    assert sorted(r["info"]["run_name"] for r in nested["runs"]) == sorted(CHILDREN)


@pytest.mark.slow
@pytest.mark.browser
def test_mlflow_ui_shows_the_runs_table(browser, store, server, tmp_path):
    # MLflow 3's UI opens an experiment on the GenAI "Overview" tab; the runs table is the
    # /runs tab, and workflowType=machine_learning selects the "Model training" navigation.
    url = f"{server}/#/experiments/{store['experiment_id']}/runs?workflowType=machine_learning"
    png = tmp_path / "mlflow_runs.png"
    dom = snapshot(url, png, 1280, 800)
    _keep(png)
    pixels = check_png(png, 1280, 800)
    text = page_text(dom)
    assert PARENT_NAME in text, text[:2000]
    assert re.search(r"\b3 matching runs\b", text), text[:2000]  # parent + 2 nested children
    assert "Run Name" in text
    # not a spinner on white: a real page has a fair share of non-background pixels
    background = np.all(pixels > 240, axis=-1).mean()
    assert background < 0.97, f"{background:.1%} of the screenshot is near-white"


@pytest.mark.slow
@pytest.mark.browser
def test_mlflow_ui_child_run_page_links_its_parent(browser, store, server, tmp_path):
    child_id = store["children"][CHILDREN[0]]
    url = (
        f"{server}/#/experiments/{store['experiment_id']}/runs/{child_id}"
        "?workflowType=machine_learning"
    )
    png = tmp_path / "mlflow_child_run.png"
    dom = snapshot(url, png, 1280, 800)
    _keep(png)
    check_png(png, 1280, 800)
    text = page_text(dom)
    assert CHILDREN[0] in text, text[:2000]
    assert child_id in text
    assert re.search(rf"Parent run {re.escape(PARENT_NAME)}", text), text[:2000]


@pytest.mark.slow
@pytest.mark.browser
def test_screenshot_of_a_self_contained_html_page(browser, tmp_path):
    from PIL import Image

    # a 200x100 picture: red left half, blue right half, inlined as base64
    picture = np.zeros((100, 200, 3), dtype=np.uint8)
    picture[:, :100] = (220, 20, 20)
    picture[:, 100:] = (20, 20, 220)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    inline = base64.b64encode(buffer.getvalue()).decode()
    page = tmp_path / "page.html"
    page.write_text(
        "<!doctype html><html><head><style>"
        "body{margin:0;background:#f4f4f4;font:24px sans-serif}"
        "img{position:absolute;left:40px;top:60px}"
        "</style></head><body><h1 id=title style='margin:0 40px'>static</h1>"
        f"<img src='data:image/png;base64,{inline}' width=200 height=100 alt=inline>"
        "<script>setTimeout(() => {document.getElementById('title').textContent ="
        " 'rendered by script'}, 500)</script></body></html>"
    )
    png = tmp_path / "page.png"
    dom = snapshot(page, png, 1000, 700, wait_ms=2_000)
    _keep(png)
    pixels = check_png(png, 1000, 700, min_colors=3, min_std=1.0)
    assert "rendered by script" in page_text(dom)  # the DOM after the timer fired
    # the inline image sits where the CSS put it, colours intact
    np.testing.assert_allclose(pixels[110, 90], (220, 20, 20), atol=8)
    np.testing.assert_allclose(pixels[110, 190], (20, 20, 220), atol=8)
    np.testing.assert_allclose(pixels[650, 900], (244, 244, 244), atol=8)
