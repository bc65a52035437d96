"""Overlap-tile prediction (Ronneberger et al. 2015) for images of any size.

The image is mirror-padded by overlap // 2 on every side, so border pixels see mirrored context
instead of zeros, then cut into `tile` x `tile` tiles at stride tile - overlap, the last one
flush with the far border. Each tile's logits are weighted by a window (a Gaussian as in
nnU-Net, so a pixel's prediction comes mostly from the tile it is central in, or constant)
and accumulated; dividing by the accumulated weight gives a seamless (B, K, H, W) map.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.engine.numerics import module_format
from pipeline.inference.forward import predict_logits

BLENDS = ("gaussian", "constant")
MIN_WEIGHT = 1e-3  # the window's floor: a tile corner still counts where no other tile reaches


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles covering [0, length): every `stride`, the last one flush with the
    end (it may overlap its neighbour by more). One tile at 0 if the tile covers it all."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile and stride must be positive, got tile {tile}, stride {stride}")
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]


def blend_window(height: int, width: int, blend: str = "gaussian") -> torch.Tensor:
    """(height, width) float32 weights with maximum 1: a Gaussian with sigma = side / 8 (per
    axis), floored at MIN_WEIGHT, or all ones for "constant"."""
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; valid: {', '.join(BLENDS)}")
    if blend == "constant":
        return torch.ones(height, width)

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (pos / (n / 8)) ** 2)

    window = axis(height)[:, None] * axis(width)[None, :]
    return (window / window.max()).clamp_min(MIN_WEIGHT).float()


def mirror_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflection-pad (B, C, H, W) by any amount.

    torch's "reflect" needs pad < side, so a large pad is done in steps (mirroring the mirrored
    image: a periodic reflection, as numpy's "reflect" does). A side of 1 px has nothing to
    mirror: it is replicated.
    """
    for dim, before, after in ((-2, top, bottom), (-1, left, right)):
        for amount, at_start in ((before, True), (after, False)):
            while amount > 0:
                size = x.shape[dim]
                step = amount if size == 1 else min(amount, size - 1)
                pad = [0, 0, 0, 0]
                pad[(0 if dim == -1 else 2) + (0 if at_start else 1)] = step
                x = F.pad(x, pad, mode="replicate" if size == 1 else "reflect")
                amount -= step
    return x


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# test-time augmentation: the flips (tensor dims) whose predictions are averaged
TTA_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "hflip": ((), (-1,)),
    "flips": ((), (-1,), (-2,), (-2, -1)),
}


@torch.no_grad()
def predict_tiled(
    model: nn.Module,
    images: torch.Tensor,
    tile: int,
    overlap: int,
    multiple: int,
    blend: str = "gaussian",
    batch_size: int = 8,
    tta: str = "none",
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Logits (B, K, H, W) float32 of `model` (in eval mode) on normalised images (B, C, H, W).

    tile == 0: one whole-image forward, mirror-padded to a multiple of `multiple`. Otherwise
    overlap-tile prediction; `tile` must be divisible by `multiple` (the model's
    `size_multiple`). Where the padded image is smaller than a tile, the tile shrinks to the
    padded side rounded up to `multiple` (the image is mirror-padded to it): one forward for
    a small image. Tiles of all images go through the model `batch_size` at a time; memory
    is the image's accumulators plus one batch of tiles.

    `tta` (a key of TTA_FLIPS): the image is also predicted flipped, each prediction flipped
    back, and the logits averaged (as ttach's mean merge; nnU-Net mirrors likewise); every
    flip costs one more prediction of the whole image.

    `progress(done, total)`, if given, is called after every batch of tiles (tiles of every
    image and flip), for progress lines on large images.
    """
    if tta not in TTA_FLIPS:
        raise ValueError(f"tta {tta!r}: valid are {', '.join(TTA_FLIPS)}")
    passes = len(TTA_FLIPS[tta])
    total: torch.Tensor | None = None
    for i, dims in enumerate(TTA_FLIPS[tta]):
        x = images.flip(dims) if dims else images
        report = None
        if progress is not None:
            report = functools.partial(_pass_progress, progress, i, passes)
        out = _predict_once(model, x, tile, overlap, multiple, blend, batch_size, report)
        out = out.flip(dims) if dims else out
        total = out if total is None else total.add_(out)
    assert total is not None
    return total / len(TTA_FLIPS[tta]) if tta != "none" else total


def _pass_progress(progress, index: int, passes: int, done: int, total: int) -> None:
    progress(index * total + done, passes * total)


def _predict_once(
    model: nn.Module,
    images: torch.Tensor,
    tile: int,
    overlap: int,
    multiple: int,
    blend: str,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """predict_tiled without test-time augmentation."""
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if tile < 0 or tile % multiple:
        raise ValueError(f"tile ({tile}) must be 0 or a positive multiple of {multiple}")
    if tile and not 0 <= overlap < tile:
        raise ValueError(f"overlap ({overlap}) must lie in 0..{tile - 1} (the tile size - 1)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if tile == 0:
        out = predict_logits(model, images, multiple).float()
        if progress is not None:
            progress(images.shape[0], images.shape[0])
        return out

    b, _, h, w = images.shape
    margin, (th, tw), (ph, pw), grid = _layout(h, w, tile, overlap, multiple)
    # the margin gives the image's border pixels mirrored context; a side shorter than a tile
    # is extended (mirrored too) to the smaller tile that covers it
    x = mirror_pad(images, margin, ph - h - margin, margin, pw - w - margin)  # (B, C, PH, PW)
    window = blend_window(th, tw, blend).to(images.device)  # (th, tw)
    weight = torch.zeros(ph, pw, device=images.device)  # the same tiling for every image
    for y, z in grid:
        weight[y : y + th, z : z + tw] += window

    jobs = [(i, y, z) for i in range(b) for y, z in grid]
    nhwc = module_format(model) == torch.channels_last  # NHWC tiles for an NHWC model
    acc: torch.Tensor | None = None  # (B, K, PH, PW): K is known after the first forward
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        tiles = torch.stack([x[i, :, y : y + th, z : z + tw] for i, y, z in chunk])
        if nhwc:
            tiles = tiles.contiguous(memory_format=torch.channels_last)  # (n, C, th, tw)
        out = model(tiles)  # (n, K, th, tw), maybe bf16 under autocast
        if isinstance(out, (list, tuple)):  # UNet++ in training mode: every head, deepest last
            out = out[-1]
        if out.shape[-2:] != tiles.shape[-2:]:
            raise ValueError(
                f"the model maps {th}x{tw} tiles to {out.shape[-2]}x{out.shape[-1]}: "
                "overlap-tile blending needs an output the size of its input (same padding)"
            )
        out = out.float() * window
        if acc is None:
            acc = torch.zeros(b, out.shape[1], ph, pw, device=images.device)
        for (i, y, z), logits in zip(chunk, out, strict=True):
            acc[i, :, y : y + th, z : z + tw] += logits
        if progress is not None:
            progress(start + len(chunk), len(jobs))
    assert acc is not None  # at least one tile per image
    acc /= weight  # every pixel lies in some tile, and the window is > 0 everywhere
    return acc[..., margin : margin + h, margin : margin + w]


def tile_count(height: int, width: int, tile: int, overlap: int, multiple: int) -> int:
    """How many forwards predict_tiled runs per image of this size (1 for tile == 0)."""
    return len(_layout(height, width, tile, overlap, multiple)[3]) if tile else 1


def _layout(h: int, w: int, tile: int, overlap: int, multiple: int):
    """(margin, tile (th, tw), padded size (PH, PW), tile origins [(y, x), ...])."""
    margin = overlap // 2
    ph, pw = h + 2 * margin, w + 2 * margin
    th, tw = min(tile, _round_up(ph, multiple)), min(tile, _round_up(pw, multiple))
    ph, pw = max(ph, th), max(pw, tw)
    stride = tile - overlap
    grid = [(y, x) for y in tile_origins(ph, th, stride) for x in tile_origins(pw, tw, stride)]
    return margin, (th, tw), (ph, pw), grid
