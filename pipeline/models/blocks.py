"""The classic U-Net building blocks, shared by UNet and UNet++."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.common import PipelineError
from pipeline.core.encoders import check_encoder


def level_channels(base_channels: int, depth: int) -> tuple[int, ...]:
    """Channels per level, doubling at each pooling: (16, 32, 64, 128, 256) for 16 and 4."""
    return tuple(base_channels * 2**i for i in range(depth + 1))


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


class ConvEncoder(nn.ModuleList):
    """The classic encoder: X(0,0) = DoubleConv, X(i,0) = Down, channels[i] at level i
    (resolution 1/2**i)."""

    def __init__(self, in_ch: int, channels: tuple[int, ...], norm: str, padding: int):
        super().__init__(
            [DoubleConv(in_ch, channels[0], norm, padding)]
            + [Down(channels[i - 1], channels[i], norm, padding) for i in range(1, len(channels))]
        )
        self.channels = tuple(channels)
        self.size_multiple = 2 ** (len(channels) - 1)

    def check_input(self, x: torch.Tensor) -> None:
        """Any size: odd ones are padded inside Up."""

    def to_input_size(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return logits  # level 0 is at full resolution

    def features(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Levels 0..depth, only those computed."""
        feats = []
        for i in range(depth + 1):
            x = self[i](x)
            feats.append(x)  # level i: (B, channels[i], H / 2**i, W / 2**i)
        return feats


def _smp_encoder(name: str, in_ch: int, depth: int, weights: str | None) -> nn.Module:
    """smp's get_encoder; pretrained weights that cannot be fetched (offline, no cache) are one
    line saying how to go on, not the Hugging Face hub's traceback."""
    from segmentation_models_pytorch.encoders import get_encoder

    try:
        return get_encoder(name, in_channels=in_ch, depth=depth, weights=weights)
    except (OSError, ValueError) as exc:  # connection, offline mode, not in the cache
        if weights is None:
            raise
        raise PipelineError(
            f"encoder_weights: {weights}: the pretrained {name} weights could not be downloaded "
            f"({type(exc).__name__}); offline, set encoder_weights: null (random init), or "
            "fetch them once where the Hugging Face hub is reachable (they are cached in "
            "HF_HOME, ~/.cache/huggingface) and copy that cache here"
        ) from None
    except KeyError:  # an encoder smp has no such weights for
        raise PipelineError(
            f"encoder_weights: {weights}: smp has no {weights} weights for encoder {name}; "
            "set encoder_weights: null or pick another encoder"
        ) from None


class SmpEncoder(nn.Module):
    """A segmentation-models-pytorch encoder (resnet34, efficientnet-b0, ...) as levels
    0..depth. smp's first "feature" is the input itself, so level i is its stride 2**(i+1) map
    and decoders on it end at half resolution (`to_input_size` upsamples their logits)."""

    def __init__(self, name: str, in_ch: int, depth: int, weights: str | None = None):
        super().__init__()
        check_encoder(name)
        if not 1 <= depth <= 4:
            raise ValueError(f"depth {depth}: an smp encoder gives levels for depth 1..4")
        self.name = name
        self.body = _smp_encoder(name, in_ch, depth + 1, weights)
        self.channels = tuple(self.body.out_channels[1 : depth + 2])
        self.size_multiple = 2 ** (depth + 1)
        # smp stops a shallower encoder's forward early but keeps its deeper stages' weights:
        # drop them, so a depth-k model (and UNet++ pruned to k) holds only what runs
        side = 2 * self.size_multiple
        drop_unused_modules(self.body, torch.zeros(1, in_ch, side, side))

    def check_input(self, x: torch.Tensor) -> None:
        check_input_size(x, self.size_multiple, f"a model on the smp encoder {self.name}")

    def to_input_size(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear")

    def features(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        return list(self.body(x)[1 : depth + 2])


def make_encoder(
    name: str,
    in_ch: int,
    channels: tuple[int, ...],
    norm: str,
    padding: int = 1,
    weights: str | None = None,
) -> ConvEncoder | SmpEncoder:
    """ "none": the classic encoder with `channels`; otherwise the smp encoder of that name with
    len(channels) - 1 levels and its own widths (read them from `.channels`)."""
    if name == "none":
        return ConvEncoder(in_ch, channels, norm, padding)
    if padding == 0:
        raise ValueError("valid convolutions (padding=0) need the classic encoder")
    return SmpEncoder(name, in_ch, len(channels) - 1, weights)


def check_input_size(x: torch.Tensor, multiple: int, what: str) -> None:
    """Refuse a size the network cannot take, naming the nearest valid (padded) size."""
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
        raise ValueError(
            f"input {h}x{w}: {what} takes sizes divisible by {multiple}; pad to {ph}x{pw} "
            "(pipeline.inference.forward.pad_to_multiple mirror-pads)"
        )


class Dropped(nn.Module):
    """Stands in for a dropped sub-module that its parent may still call (past its last used
    output): passes the input through, whatever the call's signature."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


def drop_unused_modules(module: nn.Module, x: torch.Tensor) -> nn.Module:
    """Replace the sub-modules whose weights cannot reach the output by empty ones.

    A truncated smp encoder stops its forward early (some one stage late) but keeps its deeper
    stages' weights; this makes a shallow model really smaller. "Used" is decided by autograd
    on one forward pass, so outputs are unchanged: what is dropped never reached them.
    """
    mode = module.training
    try:
        with torch.enable_grad():  # also when built inside a caller's no_grad block
            out = module.eval()(x)
            outs = out if isinstance(out, (list, tuple)) else [out]
            sum(o.sum() for o in outs if o.requires_grad).backward()
    finally:
        module.train(mode)
    used = {id(p) for p in module.parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)

    def prune(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            params = list(child.parameters())
            if params and not any(id(p) in used for p in params):
                setattr(parent, name, Dropped())
            else:
                prune(child)

    prune(module)
    return module
