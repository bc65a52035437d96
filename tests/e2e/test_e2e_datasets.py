"""Every dataset kind by params alone: `dvc exp run -S dataset.name=... -S dataset.source=...`
on tiny fakes of DRIVE, CamVid and a folder of your own, in a temporary git repository, tiny
models and one epoch (slow: about a minute and a half on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fakes import make_camvid, make_drive, make_folder, tiny_params, zip_dir
from tests.project import dvc, make_repo

pytestmark = pytest.mark.slow

TINY = tiny_params(batch_size=8, pruning={"latency_runs": 2})


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("project"), TINY)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("sources")
    return {
        "drive": zip_dir(make_drive(src / "d"), src / "DRIVE.zip"),
        "camvid": zip_dir(make_camvid(src / "c"), src / "CamVid.zip"),
        "folder": make_folder(src / "f", count=10, gray=True),
    }


def _exp_run(repo: Path, name: str, *sets: str) -> dict:
    args = [a for s in sets for a in ("-S", s)]
    out = dvc(repo, "exp", "run", "-n", name, *args)
    assert "Running stage 'report'" in out
    return json.loads((repo / "data" / "processed" / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("name", "extra", "classes", "channels"),
    [
        ("drive", ["dataset.val_count=1"], ["background", "vessel"], 3),
        ("camvid", ["unet.encoder=mobilenet_v2", "unetpp.encoder=mobilenet_v2"], 11, 3),
        ("folder", ["dataset.folder.class_names=[bg, fg]"], ["bg", "fg"], 1),
    ],
)
def test_dataset_by_params_alone(repo, sources, name, extra, classes, channels):
    manifest = _exp_run(
        repo, f"e2e-{name}", f"dataset.name={name}", f"dataset.source={sources[name]}", *extra
    )
    assert manifest["dataset"] == name and manifest["in_channels"] == channels
    n = classes if isinstance(classes, int) else len(classes)
    assert manifest["num_classes"] == n
    if not isinstance(classes, int):
        assert manifest["class_names"] == classes
    metrics = json.loads((repo / "reports" / "unetpp" / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1
    report = (repo / "reports" / "report.md").read_text()
    assert f"on `{name}`" in report
    if name == "drive":
        assert manifest["second_observer"]["dice"] > 0 and "2nd human observer" in report
