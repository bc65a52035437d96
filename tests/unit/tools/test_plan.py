"""`python -m pipeline.plan`: every stage's cost estimated from a few timed steps and forwards,
before anything is trained; and the training stage's per-epoch ETA line."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from pipeline import plan
from pipeline.core.common import PipelineError, clock, write_json
from pipeline.core.config import parse_params
from pipeline.data.store import save_array
from pipeline.training.progress import Progress, epoch_summary
from tests.fakes import merged, tiny_params

STAGES = ["download", "preprocess", "train_unet", "train_unetpp", "prune", "report"]


def tiny(**overrides):
    base = tiny_params(
        epochs=3,
        dataset={"num_images": 6, "image_size": 32, "val_count": 1, "test_count": 2},
        preprocess={"crop_size": 16, "crop_stride": 16},
        unet={"base_channels": 2},
        unetpp={"base_channels": 2},
        inference={"tile_size": 16, "tile_overlap": 4},
    )
    return parse_params(merged(base, overrides))


def test_every_stage_is_estimated_from_timed_steps_and_forwards(project):
    p = tiny()
    est = plan.estimate(p, seconds=0.01)
    assert list(est["stages"]) == STAGES
    assert all(s > 0 for s in est["stages"].values())
    assert est["total"] == pytest.approx(sum(est["stages"].values()), abs=0.5)
    data = est["data"]
    # synthetic without processed data: its layout from the params, a 16 px grid on 32 px images
    assert data["counts"] == {"val": 1, "test": 2, "train": 3} and data["patches"] == 3 * 4
    for arch in ("unet", "unetpp"):
        a = est["archs"][arch]
        assert a["steps_per_epoch"] == 3  # 12 crops in batches of 4
        assert a["step_s"] > 0 and a["eval_image_s"]["val"] > 0
        # the stage is start-up plus the epochs, the test split and the latency forwards
        work = p.epochs * a["epoch_s"] + 2 * a["eval_image_s"]["test"]
        assert est["stages"][f"train_{arch}"] >= work
    assert set(est["archs"]["unetpp"]["depth_eval_s"]) == {1, 2}  # the pruned depths, timed


def test_the_epochs_scale_the_training_estimate_and_mlflow_adds_its_cost(project):
    few = plan.estimate(tiny(epochs=1), seconds=0.01)["stages"]
    many = plan.estimate(tiny(epochs=40), seconds=0.01)["stages"]
    assert many["train_unet"] > few["train_unet"] and many["download"] == few["download"]
    tracked = plan.estimate(tiny(mlflow={"enabled": True}), seconds=0.01)["stages"]
    assert tracked["download"] == pytest.approx(few["download"] + plan.MLFLOW["download"])


def test_the_timing_manifests_class_weights_are_not_logged(project, caplog):
    """The plan times steps with a made-up class histogram: weights derived from it would read
    as the run's own."""
    with caplog.at_level(logging.INFO):
        plan.estimate(tiny(loss={"class_weights": "sqrt_median_frequency"}), seconds=0.01)
    assert not [r for r in caplog.records if "class weights" in r.getMessage()]


def test_known_layouts_give_the_counts_before_any_download(project):
    drive = plan.data_plan(
        tiny(
            dataset={"name": "drive", "source": "x.zip", "val_count": 2},
            preprocess={"crop_size": 64, "crop_stride": 32, "patches_per_epoch": 1800},
        )
    )
    assert drive.counts == {"train": 18, "val": 2, "test": 20} and drive.patches == 1800
    assert drive.sizes["test"] == (584, 565)
    camvid = plan.data_plan(tiny(dataset={"name": "camvid", "source": "x.zip"}))
    assert camvid.counts == {"train": 367, "val": 101, "test": 233} and camvid.num_classes == 11


def test_download_is_estimated_from_the_files_of_a_local_source(project, tmp_path):
    """Extracting and hashing costs per file (CamVid: 1,402 files, 7 s); URLs are unknown."""
    import zipfile

    from tests.fakes import make_drive, zip_dir

    top = make_drive(tmp_path / "src", train=3, test=2)
    files = sum(1 for p in top.rglob("*") if p.is_file())
    archive = zip_dir(top, tmp_path / "DRIVE.zip")
    assert len([i for i in zipfile.ZipFile(archive).infolist() if not i.is_dir()]) == files

    def drive(source):
        return parse_params({"dataset": {"name": "drive", "source": str(source), "val_count": 1}})

    assert plan.source_files(drive(archive)) == plan.source_files(drive(top)) == files
    assert plan.source_files(drive("https://example.org/DRIVE.zip")) == 0
    assert plan.source_files(drive(tmp_path / "missing.zip")) == 0
    assert plan.source_files(parse_params({})) == 0  # synthetic: generated


def test_processed_data_of_the_same_dataset_gives_the_real_counts(project):
    for split, stems in {"train": ["a", "b"], "val": ["c"], "test": ["d"]}.items():
        for stem in stems:
            save_array(project / "data/processed" / split / "images", stem,
                       np.zeros((40, 50, 3), np.uint8))  # fmt: skip
    manifest = {
        "dataset": "synthetic", "num_classes": 2, "in_channels": 3,
        "splits": {"train": ["a", "b"], "val": ["c"], "test": ["d"]},
    }  # fmt: skip
    write_json(project / "data/processed/manifest.json", manifest)
    data = plan.data_plan(tiny(preprocess={"patches_per_epoch": 11}))
    assert data.patches == 11 and data.counts == {"train": 2, "val": 1, "test": 1}
    assert data.sizes["test"] == data.label_sizes["test"] == (40, 50)
    # images stored at preprocess.scale 0.5: the models see them so, and are scored on the
    # full-size labels (the logits upsampled), which the evaluation estimates must include
    write_json(project / "data/processed/manifest.json", manifest | {"scale": 0.5})
    halved = plan.data_plan(tiny(preprocess={"scale": 0.5}))
    assert halved.sizes["test"] == (40, 50) and halved.label_sizes["test"] == (80, 100)
    write_json(project / "data/processed/manifest.json", manifest)
    # patches_per_epoch 0: the grid's windows, counted from the image size (2 x 2 per image)
    assert plan.data_plan(tiny(preprocess={"crop_size": 32, "crop_stride": 32})).patches == 2 * 4


def test_a_folder_dataset_needs_its_processed_data_first(project):
    p = tiny(dataset={"name": "folder", "source": "x"})
    with pytest.raises(PipelineError, match=r"run `dvc repro preprocess` first"):
        plan.data_plan(p)


def test_the_plan_counts_compiling_where_the_stage_would_compile(project):
    """train.compile auto: UNet++ on a CPU from 80 M patch pixels (here 3 full batches of
    4 x 16 px an epoch: 26,042 epochs)."""
    from pipeline.engine.numerics import CPU_COMPILE_S, numerics

    short, long = (plan.estimate(tiny(epochs=e), seconds=0.01) for e in (1, 26_042))
    assert short["archs"]["unetpp"]["compile_s"] == 0 and long["archs"]["unet"]["compile_s"] == 0
    assert long["archs"]["unetpp"]["compile_s"] == CPU_COMPILE_S
    forced = plan.estimate(tiny(epochs=1, train={"compile": True}), seconds=0.01)
    assert forced["archs"]["unet"]["compile_s"] == CPU_COMPILE_S
    assert "s torch.compile" in plan.format_plan(forced)
    # the numerics the training stage will run on this CPU
    expected = numerics("auto", True, torch.device("cpu")).describe()
    assert short["numerics"] == expected and expected in plan.format_plan(short)


def test_the_cli_prints_a_table_and_writes_json(project, capsys):
    (project / "params.yaml").write_text(json.dumps(tiny().model_dump()))
    out_json = project / "plan.json"
    plan.main(["--seconds", "0.01", "--json", str(out_json)])
    table = capsys.readouterr().out
    for stage in [*STAGES, "total"]:
        assert stage in table
    assert json.loads(out_json.read_text())["stages"].keys() == set(STAGES)


def test_clock():
    assert [clock(s) for s in (3.4, 123, 3723)] == ["3s", "2m03s", "1h02m03s"]


def test_every_epoch_logs_elapsed_time_and_an_eta(caplog):
    row = {
        "epoch": 2, "train_loss": 0.5, "val_loss": 0.4, "val_miou": 0.8, "val_dice": 0.7,
        "seconds": 30.0, "data_seconds": 1.0, "compute_seconds": 25.0, "val_seconds": 4.0,
        "loader_images_per_s": 100.0, "step_images_per_s": 50.0,
    }  # fmt: skip
    progress = Progress(epoch=2, rows=[row, row], train_seconds=60.0)
    with caplog.at_level(logging.INFO):
        epoch_summary("unet", row, 10, progress)
    assert "unet epoch 2/10 (elapsed 1m00s, ETA 4m00s)" in caplog.text
