"""Stages `train_unet` and `train_unetpp`: `python -m pipeline.stages.train {unet,unetpp}`.

Trains on patches sampled afresh every epoch from the preprocessed images, validates on the
full-size val images every epoch (overlap-tile prediction), keeps the best epoch by
`train.monitor`, then scores it on the test split. Writes models/<arch>.pt,
reports/<arch>/{epochs.csv, epochs.xlsx, curves.png, metrics.json} and one MLflow run.

Every epoch also saves models/resume/<arch>.pt (model, optimizer, scheduler, scaler, RNG
states, epoch log, best epoch, MLflow run id): a stage that was killed continues from its last
completed epoch, in the same MLflow run, and ends with the metrics an uninterrupted run gives.
`train.processes: N` (or an outer `torchrun`) trains with DDP; rank 0 alone logs and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
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

from pipeline import paths
from pipeline.common import (
    PipelineError,
    atomic_path,
    check_writable,
    clock,
    seed_everything,
    sha256_file,
    timed,
    write_json,
)
from pipeline.config import Params, load_params
from pipeline.data.loading import EpochSampler, split_dataset, train_dataset
from pipeline.data.manifest import load_manifest
from pipeline.engine import distributed
from pipeline.engine.checkpoint import (
    cpu_state,
    load_resume,
    rng_state,
    save_checkpoint,
    save_resume,
    set_rng_state,
)
from pipeline.engine.distributed import SINGLE, Dist, pick_device
from pipeline.engine.loop import Engine, NonFiniteLoss, fit, is_better
from pipeline.engine.losses import build_eval_loss, build_loss
from pipeline.engine.numerics import Numerics, compile_decision, numerics
from pipeline.engine.optim import make_optimizer, make_scheduler
from pipeline.inference.evaluate import evaluate
from pipeline.inference.stats import count_params, image_shape, model_stats
from pipeline.models import REGISTRY, build_model
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared
from pipeline.tracking.registry import CHECKPOINT_TAG
from pipeline.tracking.runs import Tracker, log_to_parent, log_torch_model, mlflow_run

log = logging.getLogger(__name__)

ARCHS = tuple(sorted(REGISTRY))  # one training stage per registered architecture


def train(arch: str, params: Params, ctx: Dist = SINGLE) -> dict[str, Any]:
    """Train `arch` on the patches, keep its best epoch, score it on the test split, and write
    its checkpoint, epoch log, curves and metrics (rank 0); returns the test metrics."""
    check_request(arch, params, ctx)
    manifest = load_manifest()
    # where the results land must take them before the training they would hold runs
    check_writable(
        paths.checkpoint(arch).parent, paths.arch_reports(arch), paths.resume_state(arch).parent
    )
    device = pick_device(params.train.device, ctx)
    seed_everything(params.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest
    model = place_model(arch, params, manifest, device, ctx)
    patches = train_dataset(manifest, params)
    num = run_numerics(params, device, arch, len(patches))  # with train.compile's decision
    drop = num.compiled and len(patches) >= params.batch_size
    loader, sampler = patch_loader(patches, params, device, ctx, drop_last=drop)
    engine = make_engine(arch, params, manifest, model, len(loader), device, ctx, num)
    epochs = Epochs(arch, params, manifest, model, engine, ctx, num)
    epochs.resume()
    log.info(  # bench/scale.py times the stage's start to this line: the first step's wait
        "%s: data ready: %d training patches of %d px per epoch (%s) from %d images, %d val "
        "and %d test images",
        arch,
        len(patches),
        params.preprocess.crop_size,
        params.preprocess.sampling,
        len(manifest.splits["train"]),
        len(epochs.val),
        len(epochs.test_split),
    )
    with epochs.tracked() as tracked:  # the stage's MLflow run (rank 0; None untracked)
        try:
            fit(engine, loader, sampler, epochs.remaining(), params.epochs, arch, epochs.end)
        except NonFiniteLoss as exc:
            raise epochs.stopped(exc) from None
        metrics = epochs.test()
        if ctx.main:
            example = patches[0][0][None]  # (1, C, crop, crop): MLflow's input example
            outputs = (arch, params, manifest, model, metrics, epochs.progress, tracked, example)
            _write_outputs(*outputs)
        distributed.barrier(ctx)
    return metrics


def check_request(arch: str, params: Params, ctx: Dist) -> None:
    if arch not in ARCHS:
        raise PipelineError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if params.batch_size % ctx.world:
        raise PipelineError(
            f"batch_size ({params.batch_size}) must be divisible by the {ctx.world} DDP "
            "processes: it is the global batch"
        )


def place_model(arch, params: Params, manifest, device: torch.device, ctx: Dist) -> nn.Module:
    """The model on its device (SyncBatchNorm under CUDA DDP; NHWC where it pays)."""
    model = build_model(
        arch, manifest.in_channels, manifest.num_classes, **params.model(arch).model_dump()
    )
    if ctx.active and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = run_numerics(params, device).place(model.to(device))
    log.info(
        "%s: %s parameters, channels %s, device %s, %d process(es), %s",
        arch,
        f"{count_params(model):,}",
        model.encoder.channels,
        device,
        ctx.world,
        run_numerics(params, device).describe(),
    )
    return model


def run_numerics(
    params: Params, device: torch.device, arch: str = "", patches: int = 0
) -> Numerics:
    """train.amp and train.channels_last on this machine (pipeline.engine.numerics), and with
    `arch` and its `patches` per epoch whether train.compile compiles it (decided on the
    epochs' full batches)."""
    num = numerics(params.train.amp, params.train.channels_last, device)
    if not arch:
        return num
    steps = patches // params.batch_size * params.epochs
    step_pixels = params.batch_size * params.preprocess.crop_size**2
    compiled = compile_decision(params.train.compile, arch, steps, step_pixels, num)
    return dataclasses.replace(num, compiled=compiled)


def patch_loader(patches, params: Params, device: torch.device, ctx: Dist, drop_last=False):
    """This rank's batches of the training patches, reshuffled every epoch (`set_epoch`).
    `drop_last` for a compiled forward, which takes one batch shape: an epoch's partial last
    batch would compile it again (~35 s on a CPU); its few patches are left out instead."""
    tp = params.train
    sampler = EpochSampler(len(patches), params.seed, ctx.rank, ctx.world)
    loader = DataLoader(
        patches,
        batch_size=params.batch_size // ctx.world,  # batch_size is the global batch
        drop_last=drop_last,
        sampler=sampler,
        num_workers=tp.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=tp.num_workers > 0,
        # worker seeds from their own generator: the global RNG stays as a resume restores it
        generator=torch.Generator().manual_seed(params.seed),
    )
    return loader, sampler


def make_engine(
    arch, params: Params, manifest, model, steps_per_epoch: int, device, ctx, num: Numerics
) -> Engine:
    """What one step needs: the forward (DDP and/or compiled), the loss (UNet++: over its
    heads), optimizer, schedule, precision (`num`: run_numerics)."""
    tp = params.train
    deep = arch == "unetpp" and params.unetpp.deep_supervision
    dtype = num.amp_dtype
    forward = nn.parallel.DistributedDataParallel(model) if ctx.active else model
    if num.compiled:
        log.info("%s: torch.compile (train.compile %s)", arch, tp.compile)
        forward = torch.compile(forward)
    optimizer = make_optimizer(params, model, fused=num.fused)
    return Engine(
        model=forward,
        loss_fn=build_loss(params.loss, deep, manifest),
        optimizer=optimizer,
        scheduler=make_scheduler(params, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
        amp_dtype=dtype,
        grad_clip=tp.grad_clip,
        device=device,
        channels_last=num.channels_last,
        ctx=ctx,
    )


def write_epoch_log(rows: list[dict[str, Any]], arch: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    out = paths.arch_reports(arch)
    with atomic_path(out / "epochs.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "epochs.xlsx") as tmp:
        df.to_excel(tmp, index=False, sheet_name=f"{arch} epochs", engine="openpyxl")
    return df


def stage_params(arch: str, params: Params) -> dict[str, Any]:
    """The params this stage's results depend on: what a resume state must match (see
    `fingerprint`); what the run logs is what dvc.yaml declares."""
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


def fingerprint(arch: str, params: Params, ctx: Dist, num: Numerics) -> str:
    """Identifies a run: a resume state is used only by a run with the same params (but for
    the speed-only ones), processes, device type, precision and processed data."""
    used = stage_params(arch, params)
    for speed_only in ("num_workers",):
        used["train"].pop(speed_only)
    run = {
        "arch": arch,
        "params": used,
        "world": ctx.world,
        "device": num.device,
        # precision, memory format, optimizer kernel and compiling (which drops partial
        # batches) change the numbers, as do the CPU's bf16 instructions: a resume continues
        # only with the same
        "numerics": num.describe(),
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
    stopped: str = ""  # why training ended before params.epochs (budget.train_<arch>_s)


class Epochs:
    """The stage's side of the epoch loop: what happens after each pass over the patches
    (`end`: validate, keep the best, log to MLflow, stop on non-finite weights, save the
    resume state, one INFO line), and the resume, tracking and test around it."""

    def __init__(
        self, arch: str, params: Params, manifest, model, engine: Engine, ctx: Dist, num: Numerics
    ):
        self.arch, self.params, self.model, self.engine, self.ctx = arch, params, model, engine, ctx
        self.num = num  # how it computes (run_numerics)
        self.classes, self.dataset = manifest.class_names, manifest.dataset
        self.monitor = params.train.monitor
        self.val = split_dataset(manifest, "val")
        self.test_split = split_dataset(manifest, "test")
        self.eval_loss = build_eval_loss(params.loss, manifest)
        self.progress = Progress()
        self.run = Tracker(None)  # the stage's MLflow run (rank 0, tracking on)

    def score(self, dataset, loss_fn=None, tta: bool = True) -> dict[str, Any]:
        distributed.sync_buffers(self.model, self.ctx)
        inference = self.params.inference
        if not tta:
            inference = inference.model_copy(update={"tta": "none"})
        return evaluate(
            self.model,
            dataset,
            self.classes,
            inference,
            loss_fn=loss_fn,
            batch_size=self.params.batch_size,
            amp_dtype=self.engine.amp_dtype,
            ctx=self.ctx,
        )

    def resume(self) -> None:
        """Continue from models/resume/<arch>.pt when a run with the same fingerprint left it."""
        arch, params, ctx, engine = self.arch, self.params, self.ctx, self.engine
        path = paths.resume_state(arch)
        state = None
        if params.train.resume and ctx.main:
            state = load_resume(path, fingerprint(arch, params, ctx, self.num))
        state = distributed.broadcast_object(state, ctx)  # every rank resumes rank 0's state
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        engine.optimizer.load_state_dict(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
        if engine.scaler is not None and state["scaler"]:
            engine.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        log.info("%s: resuming after epoch %d from %s", arch, state["epoch"], path)
        self.progress = Progress(
            state["epoch"],
            state["rows"],
            state["best"],
            state["best_epoch"],
            state["best_state"],
            state["run_id"],
            state["train_seconds"],
        )

    def remaining(self) -> range:
        return range(self.progress.epoch + 1, self.params.epochs + 1)

    @contextlib.contextmanager
    def tracked(self):
        """The stage's MLflow run (rank 0), continued after a resume."""
        arch, progress = self.arch, self.progress
        if not self.ctx.main:
            yield Tracker(None)
            return
        used = declared(f"train_{arch}", self.params)
        with mlflow_run(
            self.params,
            f"train_{arch}",
            arch,
            progress.run_id,
            used=used,
            consumes="data/processed",
        ) as run:
            if run and run.info.run_id != progress.run_id:  # a continued run has these
                run.set_tags({"arch": arch, "dataset": self.dataset})
            if run:
                progress.run_id = run.info.run_id
            self.run = run
            yield run

    def end(self, epoch: int, stats: dict[str, float], started: float) -> bool:
        """After epoch `epoch`'s pass over the patches (`stats` from `train_epoch`); True
        stops training (the time limit)."""
        arch, params, progress = self.arch, self.params, self.progress
        t_val = time.perf_counter()
        # the plain forward: validation ranks epochs, test-time flips would double its cost
        val = self.score(self.val, self.eval_loss, tta=False)
        row = {
            "epoch": epoch,
            "lr": self.engine.optimizer.param_groups[0]["lr"],
            "train_loss": stats["loss"],  # the final output's, as val_loss
            "train_objective": stats["objective"],  # UNet++: the sum over its heads
            **{f"val_{k}": v for k, v in val.items()},
            "data_seconds": stats["data_seconds"],
            "compute_seconds": stats["compute_seconds"],
            "val_seconds": time.perf_counter() - t_val,
            "loader_images_per_s": stats["images"] / max(stats["data_seconds"], 1e-9),
            "step_images_per_s": stats["images"] / max(stats["compute_seconds"], 1e-9),
        }
        # plain Python numbers: the resume state must load with weights_only=True
        row = {k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
        value = float(epoch) if self.monitor == "last" else row[self.monitor]  # last: the latest
        if is_better(self.monitor, value, progress.best):
            progress.best, progress.best_epoch = value, epoch
            progress.best_state = cpu_state(self.model)
        self.run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        row["seconds"] = time.perf_counter() - started  # training, validation and logging
        progress.epoch = epoch
        progress.train_seconds += row["seconds"]
        progress.rows.append(row)
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise PipelineError(
                f"{arch} epoch {epoch}/{params.epochs}: the weights became NaN or infinite; "
                f"training stopped, the last good state (epoch {epoch - 1}) stays in "
                f"{paths.resume_state(arch)}. Lower lr or set train.grad_clip."
            )
        limit = getattr(params.budget, f"train_{arch}_s")  # dvc.yaml lists each stage's own
        if self.ctx.main:
            _save_resume(arch, params, self.ctx, self.model, self.engine, progress, self.num)
            _epoch_summary(arch, row, params.epochs, progress, limit)
            progress.stopped = out_of_time(arch, epoch, params.epochs, progress, limit)
        # every rank stops where rank 0 does
        progress.stopped = distributed.broadcast_object(progress.stopped, self.ctx)
        return bool(progress.stopped)

    def stopped(self, exc: NonFiniteLoss) -> PipelineError:
        epoch = self.progress.epoch
        kept = (
            f"the last good state (epoch {epoch}) stays in {paths.resume_state(self.arch)}"
            if epoch
            else "no epoch completed"
        )
        return PipelineError(
            f"{exc}: training stopped; {kept}, earlier outputs are untouched. "
            "Lower lr or set train.grad_clip."
        )

    def test(self) -> dict[str, Any]:
        """The best epoch's weights scored on the test split (+ params, GFLOPs, latency)."""
        progress, classes, monitor = self.progress, self.classes, self.monitor
        if progress.best_state is None:
            raise PipelineError(f"{self.arch}: {monitor} was NaN at every epoch; nothing to keep")
        self.model.load_state_dict(progress.best_state)
        test = self.score(self.test_split)
        metrics = {
            **test,
            **({"positive_class": classes[1]} if len(classes) == 2 else {}),
            "best_epoch": progress.best_epoch,
            **({} if monitor == "last" else {f"best_{monitor}": progress.best}),
            "train_seconds": round(progress.train_seconds, 2),
            "numerics": self.num.describe(),
            **({"stopped_early": progress.stopped} if progress.stopped else {}),
        }
        if self.ctx.main:
            lat = self.params.pruning  # latency_runs / latency_warmup: one setting for all
            # params, GFLOPs and latency on one full-size test image, on the training device
            shape = image_shape(self.test_split, self.model.size_multiple)
            # latency in fp32 on the contiguous model, as the prune stage times every depth
            plain = self.model
            if self.num.channels_last:
                plain = copy.deepcopy(self.model).to(memory_format=torch.contiguous_format)
            metrics.update(model_stats(plain, shape, lat.latency_runs, lat.latency_warmup))
            log.info(
                "%s test: miou %.4f dice %.4f global_accuracy %.4f (best epoch %d)",
                self.arch,
                test["miou"],
                test["dice"],
                test["global_accuracy"],
                progress.best_epoch,
            )
        return metrics


def _save_resume(arch, params, ctx, model, engine, progress: Progress, num: Numerics) -> None:
    save_resume(
        paths.resume_state(arch),
        {
            "fingerprint": fingerprint(arch, params, ctx, num),
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


def out_of_time(arch: str, epoch: int, epochs: int, progress: Progress, limit: float) -> str:
    """Why training stops after `epoch`: another epoch, as long as the last one, would end
    past the stage's time limit (budget.train_<arch>_s; 0 = none); "" to go on. After the
    first epoch (warm-up, compiling) only a limit already passed stops it."""
    if not limit or epoch >= epochs:
        return ""
    last = progress.rows[-1]["seconds"]
    if len(progress.rows) == 1:  # its warm-up (and compiling) is no pace: stop only past it
        last = 0.0
    if progress.train_seconds + last <= limit:
        return ""
    kept = "the last epoch" if progress.best_epoch == epoch else f"epoch {progress.best_epoch}"
    why = (
        f"stopped after epoch {epoch} of {epochs}: another (~{clock(last)}) would pass "
        f"budget.train_{arch}_s ({clock(limit)}) at {clock(progress.train_seconds)}; the best "
        f"so far ({kept}) is kept"
    )
    log.warning("%s %s", arch, why)
    return why


def pace(epochs: int, progress: Progress, limit: float) -> str:
    """The epoch line's note on the time limit: the limit, and whether the remaining epochs,
    at the last one's pace, end past it."""
    if not limit:
        return ""
    done = progress.rows[-1]["epoch"]
    projected = progress.train_seconds + progress.rows[-1]["seconds"] * (epochs - done)
    if projected <= limit or len(progress.rows) == 1:  # the first epoch warms up: no pace yet
        return f", limit {clock(limit)}"
    return f", limit {clock(limit)}: LATE, at this pace the run ends at {clock(projected)}"


def _epoch_summary(
    arch: str, row: dict[str, Any], epochs: int, progress: Progress, limit: float = 0.0
) -> None:
    """One INFO line per epoch (progress bars are hidden when stderr is not a terminal, e.g.
    under `dvc repro > log`), with the time spent and an ETA for the remaining epochs; under a
    time limit (budget.train_<arch>_s) also whether the pace keeps to it."""
    per_epoch = progress.train_seconds / len(progress.rows)
    log.info(
        "%s epoch %d/%d (elapsed %s, ETA %s%s): train_loss %.4f val_loss %.4f val_miou %.4f "
        "val_dice %.4f | %.1fs: data %.1fs, compute %.1fs, validation %.1fs; "
        "loader %.0f img/s vs step %.0f img/s",
        arch,
        row["epoch"],
        epochs,
        clock(progress.train_seconds),
        clock(per_epoch * (epochs - row["epoch"])),
        pace(epochs, progress, limit),
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


def _write_outputs(arch, params, manifest, model, metrics, progress, run, example):
    """Every output is written only now, so a failed run leaves the previous ones intact."""
    from pipeline.report import plots  # matplotlib: ~0.2 s of start-up, needed only here

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
            "in_channels": manifest.in_channels,
            "num_classes": manifest.num_classes,
            "options": params.model(arch).model_dump(),
        },
        params=params.model_dump(),
        metrics=metrics,
        best_epoch=progress.best_epoch,
        # pipeline.predict normalises, equalises, resizes and scales 16-bit images alike
        data=manifest.checkpoint_data(),
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
    out = paths.arch_reports(arch)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    run.log_metrics({f"test_{k}": v for k, v in numbers.items()})
    run.set_tags({"numerics": metrics["numerics"]})  # what train.amp: auto chose here
    for f in ("epochs.csv", "epochs.xlsx", "curves.png", "metrics.json"):
        run.log_artifact(out / f, artifact_path="reports")
    run.log_artifact(paths.checkpoint(arch), artifact_path="checkpoint")
    # the registry finds this run's models by the checkpoint they were made from
    run.set_tags({CHECKPOINT_TAG: sha256_file(paths.checkpoint(arch))})
    log.info("%s logged to MLflow as %s", arch, log_torch_model(model, example))
    from pipeline.serving import log_segmenter  # mlflow.pyfunc: only when tracking

    segmenter = log_segmenter(paths.checkpoint(arch), paths.EXAMPLE_IMAGE)
    log.info("%s segmenter (images in, masks out) logged as %s", arch, segmenter)
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
        with lifecycle.recorded(params, f"train_{args.arch}", ctx.main):
            train(args.arch, params, ctx)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    lifecycle.run(main)
