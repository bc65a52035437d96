"""A shrunk budget end to end: `python -m pipeline.autoconf --budget ... --apply` on a folder
of the user's own images (masks 0/1, which the default mapping does not list), then the real
`dvc repro` in a temporary git repository: the recipe, its reasons and the fingerprint reach
params.yaml, the report and the MLflow parent run. (Whether `dvc repro` keeps to the budget is
measured by `bench/results.py run --autoconf`, not timed in a test.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.fakes import save_image
from tests.project import dvc, env, make_repo

pytestmark = pytest.mark.slow

BUDGET = "60s"  # the suite grows by about this
# the stages' fixed costs dominate a budget this small: tracking off, a small folder dataset
SMALL = {
    "dataset": {"name": "folder", "source": "cells", "folder": {"val_fraction": 0.2}},
    "mlflow": {"enabled": False},
}


def cells(root: Path, count: int = 10) -> Path:
    """64 px images of bright discs, labelled 0/1."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(count):
        label = np.zeros((64, 64), np.uint8)
        for _ in range(6):
            cy, cx = rng.integers(8, 56, 2)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = 1
        image = rng.normal(60, 10, (64, 64, 3)) + 120 * label[..., None]
        save_image(root / "images" / f"{i:02d}.png", np.clip(image, 0, 255).astype(np.uint8))
        save_image(root / "labels" / f"{i:02d}.png", label)
    return root


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, str]:
    repo = make_repo(tmp_path_factory.mktemp("autoconf"), SMALL)
    cells(repo / "cells")
    proc = subprocess.run(
        # steps timed briefly: the figures only need to be real
        [
            sys.executable,
            "-m",
            "pipeline.autoconf",
            "--budget",
            BUDGET,
            "--apply",
            "--seconds",
            "0.3",
        ],
        cwd=repo,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return repo, proc.stdout


def test_the_recipe_is_written_with_its_reasons_and_the_mapping(planned):
    repo, out = planned
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["dataset"]["folder"]["mapping"] == {0: 0, 1: 1}  # proposed from the 0/1 masks
    ac = params["autoconf"]
    assert ac["budget_s"] == 60 and 0 < ac["planned_s"] <= 60
    assert json.loads(ac["fingerprint"])["blobs"] is True
    reasons = "\n".join(ac["reasons"])
    for key in ("preprocess.scale", "preprocess.crop_size", "epochs", "train.augment"):
        assert f"{key}: " in reasons
    assert params["budget"]["train_unet_s"] > 0
    assert "planned at" in out and "recipe (key value: why)" in out


def test_dvc_repro_runs_the_recipe_and_the_report_shows_it(planned):
    repo, _ = planned
    dvc(repo, "repro")
    report = (repo / "reports/report.md").read_text()
    assert "## Recipe" in report and "pipeline.autoconf --budget 1m00s" in report
    assert "| preprocess.crop_size" in report
    metrics = json.loads((repo / "reports/unetpp/metrics.json").read_text())
    epochs = yaml.safe_load((repo / "params.yaml").read_text())["epochs"]
    # every epoch ran, or the stage says why it stopped at its limit
    assert metrics["best_epoch"] == epochs or "stopped after" in metrics.get("stopped_early", "")
