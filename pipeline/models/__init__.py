"""Model registry: `build_model(arch, in_channels, num_classes, **config)`.

Binary tasks (num_classes == 2) get one output channel read through a sigmoid; multi-class
tasks get num_classes channels read through a softmax (see
`pipeline.inference.forward.probabilities`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from pipeline.models.blocks import level_channels
from pipeline.models.unet import UNet
from pipeline.models.unetpp import UNetPlusPlus


def out_channels(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


def _unet(
    in_channels,
    num_classes,
    base_channels=64,
    depth=4,
    upsampling="transpose",
    norm="batch",
    padding=1,
    encoder="none",
    encoder_weights=None,
) -> nn.Module:
    return UNet(
        in_channels,
        out_channels(num_classes),
        level_channels(base_channels, depth),
        upsampling,
        norm,
        padding,
        encoder,
        encoder_weights,
    )


def _unetpp(
    in_channels,
    num_classes,
    base_channels=32,
    depth=4,
    upsampling="transpose",
    norm="batch",
    deep_supervision=True,
    encoder="none",
    encoder_weights=None,
) -> nn.Module:
    return UNetPlusPlus(
        in_channels,
        out_channels(num_classes),
        level_channels(base_channels, depth),
        upsampling,
        norm,
        deep_supervision,
        encoder=encoder,
        encoder_weights=encoder_weights,
    )


REGISTRY: dict[str, Callable[..., nn.Module]] = {"unet": _unet, "unetpp": _unetpp}


def build_model(arch: str, in_channels: int, num_classes: int, **config: Any) -> nn.Module:
    if arch not in REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(sorted(REGISTRY))}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    valid = list(inspect.signature(REGISTRY[arch]).parameters)[2:]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"{arch}: unknown option {unknown[0]!r}; valid: {', '.join(valid)}")
    return REGISTRY[arch](in_channels, num_classes, **config)
