"""Model registry: `build_model(arch, in_channels, num_classes, **config)`.

Binary tasks (num_classes == 2) get one output channel read through a sigmoid; multi-class
tasks get num_classes channels read through a softmax (see
`pipeline.inference.forward.probabilities`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.models.config import ModelConfig, out_channels
from pipeline.models.unet import UNet
from pipeline.models.unetpp import UNetPlusPlus

__all__ = ["REGISTRY", "ModelConfig", "UNet", "UNetPlusPlus", "build_model", "out_channels"]

REGISTRY: dict[str, type[nn.Module]] = {"unet": UNet, "unetpp": UNetPlusPlus}


def build_model(arch: str, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """`arch` for `in_channels`-channel images and `num_classes` classes; `options` are
    ModelConfig's fields the arch takes (params.yaml's unet: / unetpp: sections)."""
    config = ModelConfig.of(arch, in_channels, num_classes, **options)
    return REGISTRY[arch](config)
