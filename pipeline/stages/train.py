"""Stages `train_unet` and `train_unetpp`: `python -m pipeline.stages.train {unet,unetpp}`.

Trains on patches sampled afresh every epoch from the preprocessed images, validates on the
full-size val images every epoch (overlap-tile prediction), keeps the best epoch by
`train.monitor`, then scores it on the test split. Writes models/<arch>.pt,
reports/<arch>/{epochs.csv, epochs.xlsx, curves.png, metrics.json} and one MLflow run.

Every epoch also saves models/resume/<arch>.pt (model, optimizer, scheduler, scaler, RNG
states, epoch log, best epoch, MLflow run id): a stage that was killed continues from its last
completed epoch, in the same MLflow run, and ends with the metrics an uninterrupted run gives.
`train.processes: N` (or an outer `torchrun`) trains with DDP; rank 0 alone logs and writes.
The parts are in `pipeline.training` (setup, epochs, progress, outputs); this stage wires them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import torch

from pipeline.core import paths
from pipeline.core.common import PipelineError, check_writable, seed_everything
from pipeline.core.config import Params, load_params
from pipeline.data.loading import train_dataset
from pipeline.data.manifest import load_manifest
from pipeline.engine import distributed
from pipeline.engine.distributed import SINGLE, Dist, pick_device
from pipeline.engine.loop import NonFiniteLoss, fit
from pipeline.models import REGISTRY
from pipeline.stages import lifecycle
from pipeline.training.epochs import Epochs
from pipeline.training.outputs import write_outputs
from pipeline.training.setup import make_engine, patch_loader, place_model, run_numerics

log = logging.getLogger(__name__)

ARCHS = tuple(sorted(REGISTRY))  # one training stage per registered architecture


def train(arch: str, params: Params, ctx: Dist = SINGLE) -> dict[str, Any]:
    """Train `arch` on the patches, keep its best epoch, score it on the test split, and write
    its checkpoint, epoch log, curves and metrics (rank 0); returns the test metrics."""
    check_request(arch, params, ctx)
    manifest = load_manifest()
    # where the results land must take them before the training they would hold runs; only
    # rank 0 writes (on another node, the other ranks' disks may hold nothing of it)
    if ctx.main:
        check_writable(
            paths.checkpoint(arch).parent,
            paths.arch_reports(arch),
            paths.resume_state(arch).parent,
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
            write_outputs(*outputs)
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
