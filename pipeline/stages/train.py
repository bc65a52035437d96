"""Stages `train_unet` and `train_unetpp`: `python -m pipeline.stages.train {unet,unetpp}`.

Trains on the preprocessed crops, validates on the full-size val images every epoch
(overlap-tile prediction), keeps the best epoch by `train.monitor`, then scores it on the test
split. Writes models/<arch>.pt, reports/<arch>/{epochs.csv, epochs.xlsx, curves.png,
metrics.json} and one MLflow run.

Every epoch also saves models/resume/<arch>.pt (model, optimizer, scheduler, scaler, RNG
states, epoch log, best epoch, MLflow run id): a stage that was killed continues from its last
completed epoch, in the same MLflow run, and ends with the metrics an uninterrupted run gives.
`train.processes: N` (or an outer `torchrun`) trains with DDP; rank 0 alone logs and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import paths
from pipeline.common import (
    PipelineError,
    atomic_path,
    check_writable,
    clock,
    run_cli,
    seed_everything,
    timed,
    write_json,
)
from pipeline.config import Params, load_params
from pipeline.data.loading import EpochSampler, crops_dataset, load_manifest, split_dataset
from pipeline.engine import distributed
from pipeline.engine.checkpoint import (
    cpu_state,
    load_resume,
    rng_state,
    save_checkpoint,
    save_resume,
    set_rng_state,
)
from pipeline.engine.distributed import SINGLE, Dist, amp_dtype, pick_device
from pipeline.engine.loop import Engine, NonFiniteLoss, is_better, train_epoch
from pipeline.engine.losses import build_eval_loss, build_loss
from pipeline.engine.optim import make_optimizer, make_scheduler
from pipeline.inference.evaluate import evaluate
from pipeline.inference.stats import count_params, image_shape, model_stats
from pipeline.models import REGISTRY, build_model
from pipeline.report import plots
from pipeline.tracking.runs import log_to_parent, log_torch_model, mlflow_run

log = logging.getLogger(__name__)

ARCHS = tuple(sorted(REGISTRY))  # one training stage per registered architecture


def write_epoch_log(rows: list[dict[str, Any]], arch: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    out = paths.arch_reports(arch)
    with atomic_path(out / "epochs.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "epochs.xlsx") as tmp:
        df.to_excel(tmp, index=False, sheet_name=f"{arch} epochs", engine="openpyxl")
    return df


def stage_params(arch: str, params: Params) -> dict[str, Any]:
    """The params this stage's results depend on (logged to MLflow, part of the fingerprint)."""
    deep = arch == "unetpp" and params.unetpp.deep_supervision
    loss = params.loss.model_dump(exclude=None if deep else {"ds_weights"})
    return {
        "seed": params.seed,
        "lr": params.lr,
        "epochs": params.epochs,
        "batch_size": params.batch_size,
        arch: params.model(arch).model_dump(),
        "loss": loss,
        "train": params.train.model_dump(exclude={"resume"}),
        "inference": params.inference.model_dump(),
    }


def fingerprint(arch: str, params: Params, ctx: Dist, device: torch.device) -> str:
    """Identifies a run: a resume state is used only by a run with the same params (but for
    the speed-only ones), processes, device type, precision and processed data."""
    used = stage_params(arch, params)
    for speed_only in ("num_workers", "channels_last", "compile"):
        used["train"].pop(speed_only)
    run = {
        "arch": arch,
        "params": used,
        "world": ctx.world,
        "device": device.type,
        "amp": str(amp_dtype(params.train.amp, device)),
    }
    blob = json.dumps(run, sort_keys=True).encode()
    return hashlib.sha256(blob + paths.MANIFEST.read_bytes()).hexdigest()


@dataclass
class Progress:
    """The part of a run that a resume restores besides the weights and optimizer."""

    epoch: int = 0  # last completed epoch
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    run_id: str | None = None
    train_seconds: float = 0.0


def _resume(arch, params, ctx, model, engine) -> Progress:
    path = paths.resume_state(arch)
    state = None
    if params.train.resume and ctx.main:
        state = load_resume(path, fingerprint(arch, params, ctx, engine.device))
    state = distributed.broadcast_object(state, ctx)  # every rank resumes rank 0's state
    if state is None:
        return Progress()
    model.load_state_dict(state["model"])
    engine.optimizer.load_state_dict(state["optimizer"])
    engine.scheduler.load_state_dict(state["scheduler"])
    if engine.scaler is not None and state["scaler"]:
        engine.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    log.info("%s: resuming after epoch %d from %s", arch, state["epoch"], path)
    return Progress(
        state["epoch"],
        state["rows"],
        state["best"],
        state["best_epoch"],
        state["best_state"],
        state["run_id"],
        state["train_seconds"],
    )


def _save_resume(arch, params, ctx, model, engine, progress: Progress) -> None:
    save_resume(
        paths.resume_state(arch),
        {
            "fingerprint": fingerprint(arch, params, ctx, engine.device),
            "epoch": progress.epoch,
            "model": cpu_state(model),
            "optimizer": engine.optimizer.state_dict(),
            "scheduler": engine.scheduler.state_dict(),
            "scaler": engine.scaler.state_dict() if engine.scaler is not None else {},
            "rng": rng_state(),
            "rows": progress.rows,
            "best": progress.best,
            "best_epoch": progress.best_epoch,
            "best_state": progress.best_state,
            "run_id": progress.run_id,
            "train_seconds": progress.train_seconds,
        },
    )


def _epoch_summary(arch: str, row: dict[str, Any], epochs: int, progress: Progress) -> None:
    """One INFO line per epoch (progress bars are hidden when stderr is not a terminal, e.g.
    under `dvc repro > log`), with the time spent and an ETA for the remaining epochs."""
    per_epoch = progress.train_seconds / len(progress.rows)
    log.info(
        "%s epoch %d/%d (elapsed %s, ETA %s): train_loss %.4f val_loss %.4f val_miou %.4f "
        "val_dice %.4f | %.1fs: data %.1fs, compute %.1fs, validation %.1fs; "
        "loader %.0f img/s vs step %.0f img/s",
        arch,
        row["epoch"],
        epochs,
        clock(progress.train_seconds),
        clock(per_epoch * (epochs - row["epoch"])),
        row["train_loss"],
        row["val_loss"],
        row["val_miou"],
        row["val_dice"],
        row["seconds"],
        row["data_seconds"],
        row["compute_seconds"],
        row["val_seconds"],
        row["loader_images_per_s"],
        row["step_images_per_s"],
    )
    if row["data_seconds"] > row["compute_seconds"]:
        log.warning(
            "%s: waiting for data (%.1fs) took longer than computing (%.1fs); "
            "raise train.num_workers",
            arch,
            row["data_seconds"],
            row["compute_seconds"],
        )


def train(arch: str, params: Params, ctx: Dist = SINGLE) -> dict[str, Any]:
    if arch not in ARCHS:
        raise PipelineError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if params.batch_size % ctx.world:
        raise PipelineError(
            f"batch_size ({params.batch_size}) must be divisible by the {ctx.world} DDP "
            "processes: it is the global batch"
        )
    manifest = load_manifest()
    # where the results land must take them before the training they would hold runs
    check_writable(
        paths.checkpoint(arch).parent, paths.arch_reports(arch), paths.resume_state(arch).parent
    )
    device = pick_device(params.train.device, ctx)
    tp = params.train
    seed_everything(params.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest

    mp = params.model(arch)
    options = mp.model_dump()
    model = build_model(arch, manifest["in_channels"], manifest["num_classes"], **options)
    if ctx.active and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = device.type == "cuda" and tp.channels_last
    model = model.to(device)
    if channels_last:  # NHWC: faster convolutions on tensor cores
        model = model.to(memory_format=torch.channels_last)
    multiple = model.size_multiple  # full images are mirror-padded to this for the forward
    log.info(
        "%s: %s parameters, channels %s, device %s, %d process(es)",
        arch,
        f"{count_params(model):,}",
        model.encoder.channels,
        device,
        ctx.world,
    )

    train_ds = crops_dataset(manifest, tp.augment, params.seed)
    sampler = EpochSampler(len(train_ds), params.seed, ctx.rank, ctx.world)
    loader = DataLoader(
        train_ds,
        batch_size=params.batch_size // ctx.world,  # batch_size is the global batch
        sampler=sampler,
        num_workers=tp.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=tp.num_workers > 0,
        # worker seeds from their own generator: the global RNG stays as a resume restores it
        generator=torch.Generator().manual_seed(params.seed),
    )
    val_ds, test_ds = split_dataset(manifest, "val"), split_dataset(manifest, "test")

    deep = arch == "unetpp" and params.unetpp.deep_supervision
    dtype = amp_dtype(tp.amp, device)
    forward = nn.parallel.DistributedDataParallel(model) if ctx.active else model
    if tp.compile:
        forward = torch.compile(forward)
    optimizer = make_optimizer(params, model)
    engine = Engine(
        model=forward,
        loss_fn=build_loss(params.loss, deep, manifest),
        optimizer=optimizer,
        scheduler=make_scheduler(params, optimizer, len(loader)),
        scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
        amp_dtype=dtype,
        grad_clip=tp.grad_clip,
        device=device,
        channels_last=channels_last,
        ctx=ctx,
    )
    eval_loss = build_eval_loss(params.loss, manifest)
    classes, monitor = manifest["class_names"], tp.monitor

    def score(dataset, loss_fn=None) -> dict[str, Any]:
        distributed.sync_buffers(model, ctx)
        return evaluate(
            model,
            dataset,
            classes,
            device,
            multiple,
            params.inference,
            loss_fn,
            ctx,
            params.batch_size,
            dtype,
        )

    progress = _resume(arch, params, ctx, model, engine)
    tracked = mlflow_run(
        params,
        f"train_{arch}",
        arch,
        progress.run_id,
        used=stage_params(arch, params),
        consumes="data/processed",
    )
    with tracked if ctx.main else contextlib.nullcontext(None) as run:
        if run:
            import mlflow

            if run.info.run_id != progress.run_id:  # a continued run has these already
                with timed("tracking"):
                    mlflow.set_tags({"arch": arch, "dataset": manifest["dataset"]})
            progress.run_id = run.info.run_id
        epochs = tqdm(
            range(progress.epoch + 1, params.epochs + 1),
            desc=arch,
            unit="epoch",
            initial=progress.epoch,
            total=params.epochs,
            disable=None if ctx.main else True,
        )
        for epoch in epochs:
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            desc = f"{arch} epoch {epoch}/{params.epochs}"
            try:
                fit = train_epoch(engine, loader, desc)
            except NonFiniteLoss as exc:
                kept = (
                    f"the last good state (epoch {progress.epoch}) stays in "
                    f"{paths.resume_state(arch)}"
                    if progress.epoch
                    else "no epoch completed"
                )
                raise PipelineError(
                    f"{exc}: training stopped; {kept}, earlier outputs are untouched. "
                    "Lower lr or set train.grad_clip."
                ) from None
            t_val = time.perf_counter()
            val = score(val_ds, eval_loss)
            row = {
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": fit["loss"],  # the final output's, as val_loss
                "train_objective": fit["objective"],  # UNet++: the sum over its heads
                **{f"val_{k}": v for k, v in val.items()},
                "data_seconds": fit["data_seconds"],
                "compute_seconds": fit["compute_seconds"],
                "val_seconds": time.perf_counter() - t_val,
                "loader_images_per_s": fit["images"] / max(fit["data_seconds"], 1e-9),
                "step_images_per_s": fit["images"] / max(fit["compute_seconds"], 1e-9),
            }
            # plain Python numbers: the resume state must load with weights_only=True
            row = {k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
            value = float(epoch) if monitor == "last" else row[monitor]  # last: the latest
            if is_better(monitor, value, progress.best):
                progress.best, progress.best_epoch = value, epoch
                progress.best_state = cpu_state(model)
            if run:
                with timed("tracking"):
                    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            row["seconds"] = time.perf_counter() - t0  # training, validation and logging
            progress.epoch = epoch
            progress.train_seconds += row["seconds"]
            progress.rows.append(row)
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise PipelineError(
                    f"{desc}: the weights became NaN or infinite; training stopped, the last "
                    f"good state (epoch {epoch - 1}) stays in {paths.resume_state(arch)}. "
                    "Lower lr or set train.grad_clip."
                )
            if ctx.main:
                _save_resume(arch, params, ctx, model, engine, progress)
                _epoch_summary(arch, row, params.epochs, progress)
            distributed.barrier(ctx)

        if progress.best_state is None:
            raise PipelineError(f"{arch}: {monitor} was NaN at every epoch; nothing to keep")
        model.load_state_dict(progress.best_state)
        test = score(test_ds)
        metrics = {
            **test,
            **({"positive_class": classes[1]} if len(classes) == 2 else {}),
            "best_epoch": progress.best_epoch,
            **({} if monitor == "last" else {f"best_{monitor}": progress.best}),
            "train_seconds": round(progress.train_seconds, 2),
        }
        if ctx.main:
            lat = params.pruning  # latency_runs / latency_warmup: one setting for every model
            # params, GFLOPs and latency on one full-size test image, on the training device
            metrics.update(
                model_stats(
                    model, image_shape(test_ds, multiple), lat.latency_runs, lat.latency_warmup
                )
            )
            log.info(
                "%s test: miou %.4f dice %.4f global_accuracy %.4f (best epoch %d)",
                arch,
                test["miou"],
                test["dice"],
                test["global_accuracy"],
                progress.best_epoch,
            )
            example = train_ds[0][0][None]  # (1, C, crop, crop): MLflow's input example
            _write_outputs(arch, params, manifest, model, options, metrics, progress, run, example)
        distributed.barrier(ctx)
    return metrics


def _write_outputs(arch, params, manifest, model, options, metrics, progress, run, example):
    """Every output is written only now, so a failed run leaves the previous ones intact."""
    df = write_epoch_log(progress.rows, arch)
    out = paths.arch_reports(arch)
    monitor = params.train.monitor
    curve_metric = "val_miou" if monitor in ("val_loss", "last") else monitor
    plots.learning_curves({arch: df}, out / "curves.png", curve_metric)
    save_checkpoint(
        paths.checkpoint(arch),
        model,
        arch=arch,
        model_config={
            "in_channels": manifest["in_channels"],
            "num_classes": manifest["num_classes"],
            "options": options,
        },
        params=params.model_dump(),
        metrics=metrics,
        best_epoch=progress.best_epoch,
        data={
            **{k: manifest[k] for k in ("dataset", "class_names", "mean", "std", "ignore_index")},
            "clahe": manifest.get("clahe", 0.0),  # pipeline.predict equalises images alike
            "scale": manifest.get("scale", 1.0),  # ...and resizes them alike
            "bit_depth": manifest.get("bit_depth", 0),  # ...and scales 16-bit images alike
        },
    )
    write_json(out / "metrics.json", metrics)
    if run:
        with timed("tracking"):
            _log_outputs(arch, model, metrics, run, example)
    # the run is complete: a later run starts afresh instead of "resuming" a finished one
    paths.resume_state(arch).unlink(missing_ok=True)


def _log_outputs(arch, model, metrics, run, example) -> None:
    """The test metrics, the reports, the checkpoint and the model on the stage's MLflow run;
    the headline metrics on the execution's parent run too."""
    import mlflow

    out = paths.arch_reports(arch)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    mlflow.log_metrics({f"test_{k}": v for k, v in numbers.items()})
    for f in ("epochs.csv", "epochs.xlsx", "curves.png", "metrics.json"):
        mlflow.log_artifact(str(out / f), artifact_path="reports")
    mlflow.log_artifact(str(paths.checkpoint(arch)), artifact_path="checkpoint")
    log.info("%s logged to MLflow as %s", arch, log_torch_model(model, example))
    headline = ("miou", "dice", "global_accuracy", "mean_accuracy", "f1", "auc_roc")
    log_to_parent(run, {f"{arch}_test_{k}": metrics[k] for k in headline if k in metrics})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", help=f"one of: {', '.join(ARCHS)}")
    args = parser.parse_args(argv)
    params = load_params()
    if params.train.processes > 1 and not distributed.under_torchrun():
        code = distributed.relaunch(params.train.processes, "pipeline.stages.train", [args.arch])
        if code:
            sys.exit(code)  # the ranks have logged their error
        return
    ctx = distributed.init(pick_device(params.train.device).type)
    if not ctx.main:  # rank 0 speaks for all
        logging.getLogger().setLevel(logging.WARNING)
    try:
        train(args.arch, params, ctx)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run_cli(main)
