"""Training runs on a tiny synthetic project, in this process: reproducibility, resume,
non-finite losses, the epoch log's timings, every precision and loss option on CPU."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import pipeline.engine.loop as loop
import pipeline.stages.train as tr
from pipeline.core import paths
from pipeline.core.common import PipelineError, sha256_file
from pipeline.core.config import parse_params
from pipeline.engine.loop import Engine
from pipeline.stages.download import download
from pipeline.stages.preprocess import preprocess
from pipeline.tracking.registry import CHECKPOINT_TAG
from pipeline.training.progress import Progress, out_of_time, pace
from tests.fakes import tiny_params

TINY = tiny_params(
    seed=3,
    lr=0.01,
    epochs=3,
    dataset={"num_images": 6, "image_size": 64, "val_count": 1, "test_count": 1},
    preprocess={"crop_stride": 16},
    train={"scheduler": "cosine", "warmup_epochs": 0.5},  # resume must restore its state
    inference={"tile_size": 32, "tile_overlap": 8},
)
TIMINGS = ("seconds", "latency_ms", "images_per_s", "train_seconds")


def _params(**override):
    cfg = json.loads(json.dumps(TINY))
    for key, value in override.items():
        section, _, name = key.partition("__")
        if name:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[section] = value
    return parse_params(cfg)


@pytest.fixture
def data(project):
    p = _params()
    download(p)
    preprocess(p)
    return project


def _results(metrics: dict) -> str:
    """Metrics without wall-clock figures (those differ between identical runs), as JSON so
    that NaN equals NaN."""
    return json.dumps(
        {k: v for k, v in metrics.items() if not any(t in k for t in TIMINGS)}, sort_keys=True
    )


def _epoch_rows(arch: str) -> str:
    import pandas as pd

    df = pd.read_csv(paths.arch_reports(arch) / "epochs.csv")
    keep = [c for c in df.columns if not any(t in c for t in TIMINGS)]
    return df[keep].to_json()


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_same_params_and_seed_give_identical_metrics(data, arch):
    first = _results(tr.train(arch, _params()))
    rows = _epoch_rows(arch)
    second = _results(tr.train(arch, _params()))
    assert first == second
    assert _epoch_rows(arch) == rows
    assert first != _results(tr.train(arch, _params(seed=4)))


def test_epoch_log_records_loader_and_compute_time(data):
    tr.train("unet", _params())
    import pandas as pd

    df = pd.read_csv(paths.arch_reports("unet") / "epochs.csv")
    for col in ("data_seconds", "compute_seconds", "val_seconds", "seconds", "lr"):
        assert (df[col] >= 0).all(), col
    assert (df["seconds"] >= df["data_seconds"] + df["compute_seconds"]).all()
    assert (df["loader_images_per_s"] > 0).all() and (df["step_images_per_s"] > 0).all()
    # binary task: the split metrics carry the ranking metrics too
    assert {"val_auc_roc", "val_auc_pr", "val_sensitivity", "val_specificity"} <= set(df.columns)
    assert not paths.resume_state("unet").exists()  # a finished run leaves no resume state


def _interrupt_after(monkeypatch, epoch: int):
    """Make train_epoch raise when it starts `epoch` (as if the process died there)."""
    real = loop.train_epoch

    def dying(engine, loader, desc):
        if desc.startswith(f"unet epoch {epoch}/"):
            raise KeyboardInterrupt
        return real(engine, loader, desc)

    monkeypatch.setattr(loop, "train_epoch", dying)


def test_an_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(data, monkeypatch):
    full = _results(tr.train("unet", _params(epochs=4)))
    rows = _epoch_rows("unet")
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            tr.train("unet", _params(epochs=4))
    state = torch.load(paths.resume_state("unet"), weights_only=True)
    assert state["epoch"] == 2 and len(state["rows"]) == 2
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "best_state"} <= set(state)
    resumed = _results(tr.train("unet", _params(epochs=4)))
    assert resumed == full
    assert _epoch_rows("unet") == rows


def test_a_resume_state_of_other_params_is_not_used(data, monkeypatch):
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            tr.train("unet", _params())
    assert paths.resume_state("unet").exists()
    fresh = _results(tr.train("unet", _params(lr=0.001)))
    assert json.loads(_epoch_rows("unet"))["epoch"] == {"0": 1, "1": 2, "2": 3}  # none resumed
    assert fresh == _results(tr.train("unet", _params(lr=0.001)))


def test_resume_false_starts_afresh(data, monkeypatch):
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            tr.train("unet", _params())
    calls = []
    real = loop.train_epoch
    monkeypatch.setattr(loop, "train_epoch", lambda *a: calls.append(1) or real(*a))
    tr.train("unet", _params(train={**TINY["train"], "resume": False}))
    assert len(calls) == 3


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(data, monkeypatch):
    tr.train("unet", _params())
    before = {f: (paths.arch_reports("unet") / f).read_bytes() for f in ("metrics.json",)}
    checkpoint = paths.checkpoint("unet").read_bytes()
    real = Engine.step

    def step(self, images, labels, weight=None):
        loss = real(self, images, labels, weight)
        return loss * float("nan") if self.epoch_hint == 2 else loss

    calls = {"n": 0}
    real_epoch = loop.train_epoch

    def counting(engine, loader, desc):
        calls["n"] += 1
        engine.epoch_hint = calls["n"]
        return real_epoch(engine, loader, desc)

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(loop, "train_epoch", counting)
    with pytest.raises(PipelineError) as err:
        tr.train("unet", _params(lr=0.002))
    msg = str(err.value)
    assert "unet epoch 2/3, batch 1: loss is nan" in msg
    assert "last good state (epoch 1)" in msg and "\n" not in msg
    state = torch.load(paths.resume_state("unet"), weights_only=True)
    assert state["epoch"] == 1
    assert paths.checkpoint("unet").read_bytes() == checkpoint  # earlier outputs untouched
    for f, content in before.items():
        assert (paths.arch_reports("unet") / f).read_bytes() == content


@pytest.mark.parametrize(
    "override",
    [
        {"train": {"amp": "bf16", "scheduler": "poly", "optimizer": "sgd", "grad_clip": 1.0}},
        {"train": {"amp": "fp16", "scheduler": "step", "step_epochs": 1}},
        {"loss": {"focal_weight": 1.0, "class_weights": "median_frequency", "ds_weights": [1, 1]}},
        {"inference": {"tile_size": 0, "tile_overlap": 0}},
    ],
    ids=["bf16-poly-sgd-clip", "fp16-scaler-step", "focal-median-frequency", "whole-image"],
)
def test_training_options_run_on_cpu(data, override):
    cfg = json.loads(json.dumps(TINY))
    for section, values in override.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    metrics = tr.train("unetpp", parse_params(cfg))
    assert 0 <= metrics["miou"] <= 1 and metrics["best_epoch"] >= 1


def test_border_weight_maps_reach_training(project, monkeypatch):
    p = _params(preprocess={**TINY["preprocess"], "border_weights": {"enabled": True}})
    download(p)
    preprocess(p)
    seen = []
    real = Engine.step

    def step(self, images, labels, weight=None):
        seen.append(weight)
        return real(self, images, labels, weight)

    monkeypatch.setattr(Engine, "step", step)
    tr.train("unet", p)
    crop = p.preprocess.crop_size
    assert seen and all(w is not None and w.shape[1:] == (crop, crop) for w in seen)


def test_class_weights_of_the_wrong_length_name_the_param(data):
    with pytest.raises(PipelineError, match="loss.class_weights"):
        tr.train("unet", _params(loss={**TINY["loss"], "class_weights": [1.0, 2.0, 3.0]}))


def test_mlflow_run_has_hash_tags_and_a_loadable_pytorch_model(data, monkeypatch):
    import mlflow

    from pipeline.engine.checkpoint import load_checkpoint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{data / 'mlflow.db'}")
    tr.train("unet", _params(mlflow={"enabled": True, "experiment": "t"}))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("t")
    (run,) = client.search_runs([exp.experiment_id])
    tags = run.data.tags
    assert len(tags["params.sha256"]) == 64
    assert tags["data.hash"].startswith(("md5:", "sha256:"))
    logged = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    by_name = {m.name: m for m in logged}
    assert sorted(by_name) == ["model", "segmenter"]  # logits of tensors; masks of image files
    assert all(m.source_run_id == run.info.run_id for m in logged)
    # the registry finds the run by the checkpoint its models were made from
    assert tags[CHECKPOINT_TAG] == sha256_file(paths.checkpoint("unet"))
    models = [by_name["model"]]
    # any batch and size (a multiple of the model's), predicted like the checkpoint
    x = torch.randn(2, 3, 48, 64)
    pyfunc = mlflow.pyfunc.load_model(models[0].model_uri)
    reference, _ = load_checkpoint(paths.checkpoint("unet"))
    with torch.no_grad():
        expected = reference(x).numpy()
    assert pyfunc.predict(x.numpy()) == pytest.approx(expected, abs=1e-5)
    # the whole pipeline package travels with it: it loads where this checkout is not
    local = Path(mlflow.artifacts.download_artifacts(models[0].model_uri))
    assert (local / "code" / "pipeline" / "models" / "unet.py").is_file()


def test_an_unwritable_output_folder_stops_training_before_the_first_epoch(data, monkeypatch):
    """The results' folders are checked first, not after the whole run (a read-only models/;
    here models/ is a file, which stops root too)."""
    paths.MODELS.parent.mkdir(parents=True, exist_ok=True)
    paths.MODELS.write_text("not a folder")

    def never(*args, **kwargs):
        raise AssertionError("no epoch may run")

    monkeypatch.setattr(loop, "train_epoch", never)
    with pytest.raises(PipelineError) as err:
        tr.train("unet", _params())
    msg = str(err.value)
    assert msg.startswith(f"{paths.MODELS}: not writable (") and "\n" not in msg
    assert not (paths.arch_reports("unet") / "epochs.csv").exists()


def test_a_full_disk_while_saving_the_resume_state_names_the_file_and_keeps_the_last(
    data, monkeypatch
):
    """torch reports a full disk as "unexpected pos 64 vs 0": the error names the file and
    the cause, and the previous outputs and resume state stay whole."""
    import pipeline.engine.checkpoint as ck

    tr.train("unet", _params(epochs=1))
    checkpoint = paths.checkpoint("unet").read_bytes()
    real_save = ck.torch.save
    saves = {"n": 0}

    def full_disk(obj, path):
        saves["n"] += 1
        if saves["n"] == 2:  # the second epoch's resume state
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
        real_save(obj, path)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(PipelineError) as err:
        tr.train("unet", _params(lr=0.002))
    msg = str(err.value)
    assert msg == (
        f"{paths.resume_state('unet')}: could not be written: no space left on the device "
        "(0 MiB free)"
    )
    assert torch.load(paths.resume_state("unet"), weights_only=True)["epoch"] == 1
    assert paths.checkpoint("unet").read_bytes() == checkpoint
    assert not [p for p in paths.resume_state("unet").parent.iterdir() if ".tmp" in p.name]


def test_monitor_last_keeps_the_final_epoch(data):
    """For a schedule that decays to its end and a validation split too small to rank epochs
    (DRIVE's two images): the final weights, whatever the validation metrics say."""
    metrics = tr.train("unet", _params(train={**TINY["train"], "monitor": "last"}))
    assert metrics["best_epoch"] == TINY["epochs"]
    assert not any(k.startswith("best_") and k != "best_epoch" for k in metrics)


def test_validation_scores_the_plain_forward_and_test_the_flips(data):
    """inference.tta costs x2 / x4 per prediction: the per-epoch validation (which only ranks
    epochs) scores the plain forward, the test split the flipped copies as asked."""
    import pandas as pd

    from pipeline.data.loading import split_dataset
    from pipeline.data.manifest import load_manifest
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.numerics import numerics
    from pipeline.inference.evaluate import evaluate

    p = _params(
        train={**TINY["train"], "monitor": "last"}, inference={**TINY["inference"], "tta": "flips"}
    )
    metrics = tr.train("unet", p)
    model, _ = load_checkpoint(paths.checkpoint("unet"))
    manifest = load_manifest()
    run = numerics(p.train.amp, p.train.channels_last, torch.device("cpu"))  # as it trained
    model = run.place(model)

    def score(split, tta):
        inference = p.inference.model_copy(update={"tta": tta})
        dataset = split_dataset(manifest, split)
        return evaluate(model, dataset, manifest.class_names, inference, amp_dtype=run.amp_dtype)

    last = pd.read_csv(paths.arch_reports("unet") / "epochs.csv").iloc[-1]
    plain, flipped = score("test", "none"), score("test", "flips")
    assert plain["auc_roc"] != flipped["auc_roc"]  # the flips change the scores
    assert last["val_auc_roc"] == pytest.approx(score("val", "none")["auc_roc"], abs=1e-9)
    assert last["val_auc_roc"] != pytest.approx(score("val", "flips")["auc_roc"], abs=1e-9)
    assert metrics["auc_roc"] == pytest.approx(flipped["auc_roc"], abs=1e-9)


@pytest.mark.parametrize("choice", [True, False])
def test_a_compiled_run_drops_the_partial_batch_and_says_it_compiled(data, monkeypatch, choice):
    """A compiled forward takes one batch shape: the loader drops each epoch's partial batch
    (a new shape would compile again), and the run's numerics say it was compiled."""
    seen = {}
    real = tr.patch_loader

    def spy(patches, params, device, ctx, drop_last=False):
        seen["drop_last"] = drop_last
        return real(patches, params, device, ctx, drop_last=drop_last)

    monkeypatch.setattr(tr, "patch_loader", spy)
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the decision, not inductor
    metrics = tr.train("unet", _params(train={**TINY["train"], "compile": choice}))
    assert seen["drop_last"] is choice
    assert ("torch.compile" in metrics["numerics"]) is choice
    assert (
        json.loads((paths.arch_reports("unet") / "metrics.json").read_text())["numerics"]
        == (metrics["numerics"])
    )


def test_a_stage_past_its_time_limit_stops_and_keeps_the_best_epoch_so_far(data, caplog):
    """budget.train_<arch>_s: no epoch starts that would end past the limit (at the last
    epoch's pace; the first epoch only once the limit is passed); the best epoch so far is
    scored, and metrics.json says why it stopped."""
    caplog.set_level(logging.INFO, logger="pipeline.training")
    limited = _params(epochs=5, budget={"train_unet_s": 1e-3, "train_unetpp_s": 0.0})
    metrics = tr.train("unet", limited)
    assert "stopped after epoch 1 of 5" in metrics["stopped_early"]
    assert "budget.train_unet_s" in metrics["stopped_early"]
    assert metrics["best_epoch"] == 1
    saved = json.loads((paths.arch_reports("unet") / "metrics.json").read_text())
    assert saved["stopped_early"] == metrics["stopped_early"]
    assert "stopped after epoch 1 of 5" in caplog.text  # a warning says so
    free = tr.train("unetpp", limited)  # 0: no limit
    assert "stopped_early" not in free and free["best_epoch"] >= 1


def test_the_pace_counts_from_the_second_epoch_and_says_late():
    """The epoch line's note: the limit, and LATE when the remaining epochs at the last one's
    pace end past it; the first epoch (warm-up, compiling) sets no pace, and stops training
    only when the limit is already passed."""
    progress = Progress()
    progress.rows = [{"epoch": 1, "seconds": 50.0}]
    progress.train_seconds = 50.0
    assert pace(10, progress, 200.0) == ", limit 3m20s"  # 10 x 50 s > 200 s, yet no pace
    assert out_of_time("unet", 1, 10, progress, 200.0) == ""
    progress.rows.append({"epoch": 2, "seconds": 30.0})
    progress.train_seconds = 80.0
    assert "LATE, at this pace the run ends at 5m20s" in pace(10, progress, 200.0)
    progress.best_epoch = 2
    assert out_of_time("unet", 2, 10, progress, 100.0).startswith("stopped after epoch 2")
    assert out_of_time("unet", 2, 10, progress, 0.0) == ""  # 0: no limit
