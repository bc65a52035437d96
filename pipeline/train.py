"""Stages `train_unet` and `train_unetpp`: `python -m pipeline.train {unet,unetpp}`.

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
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import distributed, paths, plots
from pipeline.checkpoint import (
    cpu_state,
    load_resume,
    rng_state,
    save_checkpoint,
    save_resume,
    set_rng_state,
)
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
from pipeline.data import EpochSampler, crops_dataset, load_manifest, split_dataset
from pipeline.distributed import SINGLE, Dist, amp_dtype, pick_device
from pipeline.inference import evaluate
from pipeline.losses import build_eval_loss, build_loss
from pipeline.models import REGISTRY, build_model
from pipeline.optim import make_optimizer, make_scheduler
from pipeline.stats import count_params, image_shape, model_stats
from pipeline.tracking import log_to_parent, log_torch_model, mlflow_run

log = logging.getLogger(__name__)

ARCHS = tuple(sorted(REGISTRY))  # one training stage per registered architecture


class NonFiniteLoss(PipelineError):
    """The loss became NaN or infinite: training stops, the last good state is kept."""


@dataclass
class Engine:
    """What one optimisation step needs; `model` is what forward runs (DDP and/or compiled)."""

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    amp_dtype: torch.dtype | None = None
    grad_clip: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    ctx: Dist = field(default_factory=Dist)

    def to_device(self, batch: list[torch.Tensor]) -> list[torch.Tensor]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images, *rest = batch
        images = images.to(self.device, non_blocking=True, memory_format=fmt)
        return [images, *(t.to(self.device, non_blocking=True) for t in rest)]

    def step(self, images, labels, weight=None) -> torch.Tensor:
        """Forward, backward and clipping; returns (loss, gradient norm, final-output loss),
        detached. The loss is the objective (UNet++: the weighted sum over its heads), the
        final-output loss the deepest head's alone (what validation scores). The norm is
        inf/NaN when the gradients are; with a scaler that only skips the step (expected)."""
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(images)
        loss = self.loss_fn(outputs, labels, weight)  # the losses compute in float32
        final = getattr(self.loss_fn, "final_loss", None)
        final = loss.detach() if final is None else final
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # so clipping sees the true gradients
        else:
            loss.backward()
        norm = loss.new_zeros(())  # with a scaler, inf gradients only skip the step (expected)
        if self.grad_clip or self.scaler is None:
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        return torch.stack([loss.detach().float(), norm.float(), final.float()])

    def apply(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def train_epoch(engine: Engine, loader: DataLoader, desc: str) -> dict[str, float]:
    """One pass over the training crops.

    Returns the mean loss per image (over every rank): `loss` of the final output (comparable
    with the validation loss) and `objective` (what is minimised: for UNet++ the weighted sum
    over its heads); the images seen, and where the time went: loader vs steps.
    """
    ctx = engine.ctx
    engine.model.train()
    loss_sum, objective_sum, n_seen, data_s, compute_s = 0.0, 0.0, 0, 0.0, 0.0
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None if ctx.main else True)
    t = time.perf_counter()
    for i, batch in enumerate(bar, start=1):
        images, labels, *weight = engine.to_device(batch)
        t_data = time.perf_counter()
        data_s += t_data - t
        out = engine.step(images, labels, weight[0] if weight else None)
        value, norm, final = distributed.mean_values(out, ctx)  # every rank takes the same decision
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{desc}, batch {i}: loss is {value}")
        if not math.isfinite(norm):
            raise NonFiniteLoss(f"{desc}, batch {i}: gradient norm is {norm}")
        engine.apply()  # runs on asynchronously; the next step's loss read-out waits for it
        t = time.perf_counter()
        compute_s += t - t_data
        batch_images = len(images) * ctx.world
        objective_sum += value * batch_images
        loss_sum += final * batch_images
        n_seen += batch_images
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{n_seen / (data_s + compute_s):.0f}")
    return {
        "loss": loss_sum / max(n_seen, 1),
        "objective": objective_sum / max(n_seen, 1),
        "images": n_seen,
        "data_seconds": data_s,
        "compute_seconds": compute_s,
    }


def write_epoch_log(rows: list[dict[str, Any]], arch: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    out = paths.arch_reports(arch)
    with atomic_path(out / "epochs.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "epochs.xlsx") as tmp:
        df.to_excel(tmp, index=False, sheet_name=f"{arch} epochs", engine="openpyxl")
    return df


def is_better(monitor: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if monitor == "val_loss" else value > best


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
        mp.channels,
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
        code = distributed.relaunch(params.train.processes, "pipeline.train", [args.arch])
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
