"""The CPU presets' recipes (drive-cpu, camvid-cpu), shrunk to seconds, run end to end on tiny
fakes of their datasets: download, preprocess, both models, prune and report, with every
choice of the recipe kept (precision, schedule, loss, class weights, encoder, inference) and
only the sizes cut. The full presets run by hand: bench/results.py, reports/results/."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline import preset
from pipeline.core import paths
from pipeline.core.config import parse_params
from pipeline.stages.download import download
from pipeline.stages.preprocess import preprocess
from pipeline.stages.prune import prune
from pipeline.stages.report import report
from pipeline.stages.train import train
from tests.fakes import make_camvid, make_drive, zip_dir

pytestmark = pytest.mark.slow
PROJECT_PARAMS = paths.PARAMS  # the real params.yaml (the `project` fixture repoints paths)

# only sizes: epochs, crops, widths, latency runs
SHRINK = {
    "epochs": 1,
    "batch_size": 4,
    "preprocess": {"crop_size": 32, "crop_stride": 32, "patches_per_epoch": 12},
    "unet": {"base_channels": 4},
    "unetpp": {"base_channels": 4},
    "pruning": {"latency_runs": 1, "latency_warmup": 0, "onnx": False},
    "report": {"panels": 1},
    "mlflow": {"enabled": False},
}


def shrunk(name: str, source) -> dict:
    overlay, merged = preset.resolve(name, str(source), params_path=PROJECT_PARAMS)
    return preset.merge(merged, SHRINK), overlay


def run_pipeline(p) -> None:
    download(p)
    preprocess(p)
    for arch in ("unet", "unetpp"):
        train(arch, p)
    prune(p)
    report(p)


@pytest.mark.parametrize("name", ["drive-cpu", "camvid-cpu"])
def test_cpu_preset_recipe_runs_end_to_end(project, tmp_path, name):
    if name == "drive-cpu":
        source = zip_dir(make_drive(tmp_path / "src", train=5, test=2), tmp_path / "DRIVE.zip")
    else:
        source = zip_dir(make_camvid(tmp_path / "src"), tmp_path / "CamVid.zip")
    merged, overlay = shrunk(name, source)
    p = parse_params(merged)
    # the recipe's own choices are all still there
    assert p.train.amp == overlay["train"]["amp"] and p.train.device == "cpu"
    assert p.train.scheduler == overlay["train"]["scheduler"]
    assert p.unetpp.encoder == overlay["unetpp"]["encoder"]
    run_pipeline(p)

    reports = project / "reports"
    metrics = {
        a: json.loads((reports / a / "metrics.json").read_text()) for a in ("unet", "unetpp")
    }
    pruning = pd.read_csv(reports / "pruning.csv")
    assert list(pruning["depth"]) == p.pruning.depths
    # prune scores under the training stage's autocast: the deepest depth is UNet++ itself
    deepest = pruning.iloc[-1]
    for key in ("miou", "dice", "global_accuracy"):
        assert deepest[key] == pytest.approx(metrics["unetpp"][key], abs=1e-9), key
    md = (reports / "report.md").read_text()
    assert "whole-image inference" in md and "overlap-tile" not in md  # tile_size: 0
    epochs = pd.read_csv(reports / "unetpp" / "epochs.csv")
    assert {"train_loss", "train_objective", "val_loss"} <= set(epochs.columns)
    if name == "drive-cpu":
        assert metrics["unetpp"]["positive_class"] == "vessel"
        assert "**vessel** as the positive class" in md
        assert "second human observer" in md
    else:
        assert "positive_class" not in metrics["unet"]
        assert sum(k.startswith("iou_") for k in metrics["unet"]) == 11
        assert "Per-class IoU" in md
