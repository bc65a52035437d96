"""What a training run is built from: the model on its device, the precision and compile
decision (`run_numerics`), this rank's patch loader and the `Engine` one step needs."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.core.config import Params
from pipeline.data.loading import EpochSampler
from pipeline.engine.distributed import Dist
from pipeline.engine.loop import Engine
from pipeline.engine.losses import build_loss
from pipeline.engine.numerics import Numerics, compile_decision, numerics
from pipeline.engine.optim import make_optimizer, make_scheduler
from pipeline.inference.stats import count_params
from pipeline.models import build_model

log = logging.getLogger(__name__)


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
