"""Classic U-Net (Ronneberger et al. 2015) from the shared blocks."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.blocks import OutConv, Up, encoder


class UNet(nn.Module):
    """channels: per level, e.g. (64, 128, 256, 512, 1024) for the paper (depth = len - 1).

    padding=1 (same) keeps output size == input size; padding=0 is the paper's valid variant.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: tuple[int, ...],
        upsampling: str = "transpose",
        norm: str = "batch",
        padding: int = 1,
    ):
        super().__init__()
        self.depth = len(channels) - 1
        self.encoder = encoder(in_channels, channels, norm, padding)
        self.decoder = nn.ModuleList(
            Up(channels[i + 1], channels[i], channels[i], upsampling, norm, padding)
            for i in reversed(range(self.depth))
        )
        self.head = OutConv(channels[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)  # level i: (B, channels[i], H / 2**i, W / 2**i)
        x = feats.pop()
        for up in self.decoder:
            x = up(x, [feats.pop()])
        return self.head(x)  # (B, out_channels, H, W)
