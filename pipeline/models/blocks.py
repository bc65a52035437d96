"""The classic U-Net building blocks, shared by UNet and UNet++."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DoubleConv(nn.Module):
    """(conv 3x3 -> [BatchNorm] -> ReLU) x 2. padding=1 keeps the size; 0 is the paper's
    valid convolution, which shrinks each side by 2 px."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch", padding: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in in (in_ch, out_ch):
            layers.append(nn.Conv2d(c_in, out_ch, 3, padding=padding, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pool then DoubleConv: halves the size."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch", padding: int = 1):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch, norm, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


def match_size(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Centre-crop or zero-pad x (B, C, h, w) to ref's spatial size."""
    dh, dw = ref.shape[-2] - x.shape[-2], ref.shape[-1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    # F.pad with negative amounts crops
    return F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


class Up(nn.Module):
    """Upsample the deeper feature map, join it with the skip(s), DoubleConv.

    `skip_ch` is the total channel count of the skips: one tensor in UNet, the j dense
    skips X(i,0..j-1) in UNet++. With same padding the upsampled map is padded to the skip's
    size (odd sizes); with valid convolutions the larger skips are centre-cropped instead.
    """

    def __init__(
        self,
        in_ch: int,
        skip_ch: int,
        out_ch: int,
        upsampling: str = "transpose",
        norm: str = "batch",
        padding: int = 1,
    ):
        super().__init__()
        if upsampling == "transpose":
            self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        elif upsampling == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, 1),
            )
        else:
            raise ValueError(f"upsampling must be 'transpose' or 'bilinear', got {upsampling!r}")
        self.conv = DoubleConv(skip_ch + out_ch, out_ch, norm, padding)
        self.crop_skips = padding == 0

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.up(x)  # (B, out_ch, 2h, 2w)
        if self.crop_skips:
            skips = [match_size(s, x) for s in skips]  # valid convs: crop the skips
        else:
            x = match_size(x, skips[0])  # same padding, odd sizes: pad the upsampled map
        return self.conv(torch.cat([*skips, x], dim=1))


class OutConv(nn.Module):
    """1x1 convolution to class logits."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def encoder(in_ch: int, channels: tuple[int, ...], norm: str, padding: int) -> nn.ModuleList:
    """X(0,0) = DoubleConv, X(i,0) = Down: one module per level, channels[i] each."""
    return nn.ModuleList(
        [DoubleConv(in_ch, channels[0], norm, padding)]
        + [Down(channels[i - 1], channels[i], norm, padding) for i in range(1, len(channels))]
    )
