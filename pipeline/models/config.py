"""ModelConfig: everything that builds a UNet or a UNet++, with the one set of defaults (the
same as params.yaml's `unet:` and `unetpp:` sections). The models take it and keep it as
`model.config`; a pruned UNet++ is its config with a smaller depth."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from pipeline.models.blocks import level_channels

# the options each architecture takes (build_model's keywords), in the order errors list them
OPTIONS = {
    "unet": (
        "base_channels", "depth", "upsampling", "norm", "padding", "encoder", "encoder_weights",
    ),
    "unetpp": (
        "base_channels", "depth", "upsampling", "norm", "deep_supervision", "encoder",
        "encoder_weights",
    ),
}  # fmt: skip


def out_channels(num_classes: int) -> int:
    """Binary tasks: one logit read through a sigmoid; else one per class (softmax)."""
    return 1 if num_classes == 2 else num_classes


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "unet" | "unetpp"
    in_channels: int
    num_classes: int  # 2: one sigmoid channel; more: one softmax channel per class
    base_channels: int = 16  # channels per level: base * 2**level
    depth: int = 4  # poolings
    upsampling: str = "transpose"  # transpose (2x2 transposed conv) | bilinear (+ 1x1 conv)
    norm: str = "batch"  # batch | none
    encoder: str = "none"  # the classic conv encoder, or an smp encoder name
    encoder_weights: str | None = None  # None: random init; "imagenet" downloads
    padding: int = 1  # UNet: 1 same convolutions, 0 the paper's valid ones
    deep_supervision: bool = True  # UNet++: a head on every X(0, j)
    heads: tuple[int, ...] | None = None  # UNet++: the heads kept (None: by deep_supervision)

    def __post_init__(self) -> None:
        if self.arch not in OPTIONS:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(OPTIONS)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    @classmethod
    def of(cls, arch: str, in_channels: int, num_classes: int, **options: Any) -> ModelConfig:
        """build_model's arguments, options checked against what `arch` takes."""
        if arch not in OPTIONS:
            raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(sorted(OPTIONS))}")
        unknown = sorted(set(options) - set(OPTIONS[arch]))
        if unknown:
            valid = ", ".join(OPTIONS[arch])
            raise ValueError(f"{arch}: unknown option {unknown[0]!r}; valid: {valid}")
        return cls(arch, in_channels, num_classes, **options)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels per level of the classic encoder: (16, 32, 64, 128, 256) for 16 and 4."""
        return level_channels(self.base_channels, self.depth)

    @property
    def out_channels(self) -> int:
        return out_channels(self.num_classes)

    def options(self) -> dict[str, Any]:
        """The arch's options (what a checkpoint stores to rebuild the model)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in OPTIONS[self.arch]}

    def pruned(self, depth: int, heads: tuple[int, ...]) -> ModelConfig:
        """The sub-network up to head `depth`: its weights come from the full model, so no
        pretrained encoder weights are fetched for it."""
        return replace(self, depth=depth, heads=heads, encoder_weights=None)
