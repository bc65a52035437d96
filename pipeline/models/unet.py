"""Classic U-Net (Ronneberger et al. 2015) from the shared blocks."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.blocks import OutConv, Up, make_encoder
from pipeline.models.config import ModelConfig


class UNet(nn.Module):
    """Channels per level from `config` (base 64, depth 4: the paper's 64..1024).

    padding=1 (same) keeps output size == input size; padding=0 is the paper's valid variant.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.depth = config.depth
        upsampling, norm, padding = config.upsampling, config.norm, config.padding
        self.encoder = make_encoder(
            config.encoder, config.in_channels, config.channels, norm, padding,
            config.encoder_weights,
        )  # fmt: skip
        channels = self.encoder.channels  # on an smp encoder, the encoder's widths
        # same padding takes any size (odd ones are padded inside Up; full images are best
        # mirror-padded to this multiple first); valid convolutions take only the sizes whose
        # every pooled map is even (checked in forward)
        self.size_multiple = self.encoder.size_multiple if padding else None
        self.decoder = nn.ModuleList(
            Up(channels[i + 1], channels[i], channels[i], upsampling, norm, padding)
            for i in reversed(range(self.depth))
        )
        self.head = OutConv(channels[0], config.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size_multiple is None:
            check_valid_size(x, self.depth)
        self.encoder.check_input(x)
        size = x.shape[-2:]
        feats = self.encoder.features(x, self.depth)
        x = feats.pop()
        for up in self.decoder:
            x = up(x, [feats.pop()])
        # (B, out_channels, H, W), or smaller for valid convolutions
        return self.encoder.to_input_size(self.head(x), size)


def valid_output_size(size: int, depth: int) -> int | None:
    """Output side of the valid-convolution UNet for an input side, or None if it cannot take
    it (a pooled map of odd size or a map that vanishes): 572 -> 388 for depth 4."""
    for _ in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            return None
        size //= 2
    size -= 4
    for _ in range(depth):
        size = size * 2 - 4
    return size if size > 0 else None


def check_valid_size(x: torch.Tensor, depth: int) -> None:
    h, w = x.shape[-2:]
    if valid_output_size(h, depth) and valid_output_size(w, depth):
        return
    ph, pw = (
        next(s for s in range(n, n + 2 ** (depth + 3)) if valid_output_size(s, depth))
        for n in (h, w)
    )
    raise ValueError(
        f"input {h}x{w}: the valid-convolution UNet of depth {depth} cannot take it; "
        f"nearest valid padded size {ph}x{pw}"
    )
