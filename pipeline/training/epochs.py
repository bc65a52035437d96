"""The stage's side of the epoch loop (`Epochs`): validate, keep the best, log, save the resume
state after each pass over the patches; the resume, MLflow run and test around it. A resume
state is used only by a run with the same `fingerprint`."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import time
from typing import Any

import torch

from pipeline.core import paths
from pipeline.core.common import (
    PipelineError,
)
from pipeline.core.config import Params
from pipeline.data.loading import split_dataset
from pipeline.engine import distributed
from pipeline.engine.checkpoint import (
    cpu_state,
    load_resume,
    rng_state,
    save_resume,
    set_rng_state,
)
from pipeline.engine.distributed import Dist
from pipeline.engine.loop import Engine, NonFiniteLoss, is_better
from pipeline.engine.losses import build_eval_loss
from pipeline.engine.numerics import Numerics
from pipeline.inference.evaluate import evaluate
from pipeline.inference.stats import image_shape, model_stats
from pipeline.tracking.dvc import declared
from pipeline.tracking.runs import Tracker, mlflow_run
from pipeline.training.progress import Progress, epoch_summary, out_of_time

log = logging.getLogger(__name__)


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
            save_state(arch, params, self.ctx, self.model, self.engine, progress, self.num)
            epoch_summary(arch, row, params.epochs, progress, limit)
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


def save_state(arch, params, ctx, model, engine, progress: Progress, num: Numerics) -> None:
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
