"""A trained checkpoint ready to segment images exactly as training saw them.

One place for what `pipeline.predict` and the MLflow pyfunc model (`pipeline.serving.pyfunc`)
both do to an image: read it as training did (greyscale or RGB, 16-bit scaled by the data's bit
depth), equalise it (CLAHE, if preprocess did), normalise it with the training split's mean and
std, resize it by `preprocess.scale`, predict it full-size by overlap-tile (with the
checkpoint's `inference` params: tiles, overlap, blend, test-time flips), bring the logits back
to the image's size and read them: sigmoid for one channel, softmax for several."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.common import PipelineError, scaled_size
from pipeline.data.sources import DEFAULT_MAX_IMAGE_PIXELS, equalize, read_image
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.distributed import pick_device
from pipeline.inference.forward import predict, probabilities
from pipeline.inference.tiling import BLENDS, TTA_FLIPS, predict_tiled, tile_count

LIMIT = "PIPELINE_MAX_IMAGE_PIXELS"  # the largest image predict and the served model take


def max_pixels() -> int:
    """The environment's PIPELINE_MAX_IMAGE_PIXELS (0 = no limit), else PIL's own limit."""
    value = os.environ.get(LIMIT, "")
    if not value:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not value.isdigit():
        raise PipelineError(f"{LIMIT}={value!r}: a number of pixels (0 = no limit)")
    return int(value)


class Segmenter:
    """`Segmenter.load(path)`, then `read(file)` -> image, `logits(image)`, `labels(logits)`,
    `positive(logits)` / `probabilities(logits)`.

    `depth` prunes a UNet++ to that head; `tile`, `overlap` and `tta` override the
    checkpoint's `inference` params (`source` names where each value came from in errors).
    """

    def __init__(
        self,
        model: nn.Module,
        ckpt: dict[str, Any],
        source: str,
        depth: int | None = None,
        tile: int | None = None,
        overlap: int | None = None,
        tta: str | None = None,
    ):
        self.source = source
        self.device = next(model.parameters()).device
        self.arch = ckpt["arch"]
        model, self.name = _select_depth(model, self.arch, depth, f"{source}: --depth")
        self.model = model.to(self.device)  # prune() builds the sub-network on the CPU
        self.multiple = getattr(model, "size_multiple", None)
        if self.multiple is None:  # the valid-convolution UNet maps an image to a smaller one
            raise PipelineError(
                f"{source}: a valid-convolution UNet (padding 0) predicts a smaller map than "
                "its input; segmenting images needs a same-padding model"
            )
        self.tile, self.overlap, self.blend, self.tta = _tiling(
            ckpt, source, tile, overlap, self.multiple, tta
        )
        data = ckpt.get("data") or {}
        self.in_channels = ckpt["model_config"]["in_channels"]
        self.mode = {1: "L", 3: "RGB"}.get(self.in_channels)
        if self.mode is None:
            raise PipelineError(f"{source}: {self.in_channels} input channels; images have 1 or 3")
        self.num_classes = ckpt["model_config"]["num_classes"]
        if self.num_classes > 256:
            raise PipelineError(f"{source}: {self.num_classes} classes; a label PNG holds 256")
        self.class_names = data.get("class_names") or [str(i) for i in range(self.num_classes)]
        mean, std = _normalisation(data, self.in_channels, source)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.bit_depth = int(data.get("bit_depth", 0))  # 16-bit images scaled as in training
        self.scale = float(data.get("scale", 1.0))  # preprocess.scale of the training data
        self.clahe = data.get("clahe", 0.0)

    @classmethod
    def load(cls, path: Path, depth: int | None = None, device: str = "auto", **tiling: Any):
        """The checkpoint at `path` on `device` (auto: CUDA if available)."""
        model, ckpt = load_checkpoint(Path(path), pick_device(device, name="--device"))
        return cls(model, ckpt, str(path), depth, **tiling)

    @property
    def how(self) -> str:
        """How images are predicted, for a log line."""
        how = f"tiles {self.tile} px, overlap {self.overlap}, {self.blend}"
        how = how if self.tile else "whole image"
        return how + (f", tta {self.tta}" if self.tta != "none" else "")

    def pruned(self, depth: int, what: str = "--depth") -> Segmenter:
        """This segmenter with its UNet++ pruned to head `depth`: the same weights, reading,
        normalisation and tiling (the served model's `depth` param); `what` names the
        argument in errors."""
        model, name = _select_depth(self.model, self.arch, depth, what)
        other = copy.copy(self)
        other.model, other.name = model.to(self.device), name
        other.multiple = model.size_multiple  # divides the full model's: the tiles still fit
        return other

    def read(self, file: Path | IO[bytes], name: str | None = None) -> np.ndarray:
        """An image file (a path or an open binary file) as (H, W) or (H, W, 3) uint8; a bad
        one is a one-line PipelineError naming it (`name` for an open file)."""
        try:
            return read_image(
                file, self.mode, self.bit_depth, name=name, max_pixels=max_pixels(), limit=LIMIT
            )
        except (PipelineError, MemoryError):
            raise
        except Exception as exc:  # what PIL raises beyond read_image's net (e.g. a file it
            # calls a decompression bomb): one line naming the file, not a traceback
            text = str(exc).splitlines()[0] if str(exc) else ""
            who = file if name is None else name
            raise PipelineError(f"{who}: unreadable image ({type(exc).__name__}: {text})") from None

    def tiles(self, h: int, w: int) -> int:
        """How many tiles an (h, w) image is predicted in."""
        return tile_count(*self._size(h, w), self.tile, self.overlap, self.multiple)

    @torch.no_grad()
    def logits(self, image: np.ndarray, progress=None) -> torch.Tensor:
        """(H, W[, C]) uint8 image -> (1, 1 | C, H, W) float32 logits at the image's size."""
        # the contrast equalisation preprocess applied to the training images, if any
        x = torch.from_numpy(equalize(image, self.clahe)).to(self.device, torch.float32)
        x = x[..., None] if x.ndim == 2 else x  # (H, W, C)
        if x.shape[-1] != self.in_channels:
            raise PipelineError(
                f"image of {x.shape[-1]} channel(s) for a model of {self.in_channels}"
            )
        x = ((x / 255 - self.mean) / self.std).permute(2, 0, 1)[None]  # (1, C, H, W)
        h, w = x.shape[-2:]
        if self.scale != 1.0:  # trained on images resized by preprocess.scale: predict so
            x = F.interpolate(
                x, size=self._size(h, w), mode="bilinear", antialias=True, align_corners=False
            )
        logits = predict_tiled(
            self.model,
            x,
            self.tile,
            self.overlap,
            self.multiple,
            self.blend,
            tta=self.tta,
            progress=progress,
        ).float()
        if self.scale != 1.0:  # a label for every pixel of the image
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits

    def labels(self, logits: torch.Tensor) -> np.ndarray:
        """(1, 1 | C, H, W) logits -> (H, W) uint8 class indices."""
        return predict(logits)[0].cpu().numpy().astype(np.uint8)

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """(1, 1 | C, H, W) logits -> (C, H, W) float32 class probabilities (C = 2 if binary)."""
        return probabilities(logits)[0].cpu().numpy().astype(np.float32)

    def _size(self, h: int, w: int) -> tuple[int, int]:
        return scaled_size(h, w, self.scale) if self.scale != 1.0 else (h, w)


def _select_depth(model, arch: str, depth: int | None, what: str):
    """(the model, pruned to `depth` for UNet++; a name for the log). `what` names the
    argument in errors ("<checkpoint>: --depth")."""
    if depth is None:
        return model, arch
    if not hasattr(model, "prune"):
        raise PipelineError(f"{what} needs a UNet++, not {arch}")
    try:
        return model.prune(depth).eval(), f"{arch} L{depth}"
    except ValueError as exc:
        raise PipelineError(f"{what} {depth}: {exc}") from None


def _tiling(
    ckpt: dict[str, Any],
    source: str,
    tile: int | None,
    overlap: int | None,
    multiple: int,
    tta: str | None = None,
) -> tuple[int, int, str, str]:
    """(tile, overlap, blend, tta): the arguments over the checkpoint's `inference` params."""
    params = ckpt.get("params") or {}
    inference = params.get("inference") or {}  # older checkpoints: whole-image prediction
    # name where a bad value came from: the argument, or the params saved with the model
    tile_from = "--tile" if tile is not None else f"{source}: inference.tile_size"
    overlap_from = "--overlap" if overlap is not None else f"{source}: inference.tile_overlap"
    tile = int(inference.get("tile_size", 0)) if tile is None else tile
    overlap = int(inference.get("tile_overlap", 0)) if overlap is None else overlap
    blend = inference.get("blend", "gaussian")
    if blend not in BLENDS:
        raise PipelineError(f"{source}: inference.blend {blend!r}; valid: {', '.join(BLENDS)}")
    tta_from = "--tta" if tta is not None else f"{source}: inference.tta"
    tta = inference.get("tta", "none") if tta is None else tta  # older checkpoints: none
    if tta not in TTA_FLIPS:
        raise PipelineError(f"{tta_from} {tta!r}; valid: {', '.join(TTA_FLIPS)}")
    if tile < 0 or tile % multiple:
        raise PipelineError(
            f"{tile_from} {tile}: must be 0 (whole image) or a multiple of {multiple}, "
            "the model's size multiple"
        )
    if overlap < 0 or (tile and overlap >= tile):
        raise PipelineError(
            f"{overlap_from} {overlap}: must lie in 0..{max(tile - 1, 0)} for tile {tile}"
        )
    return tile, overlap, blend, tta


def _normalisation(
    data: dict[str, Any], in_channels: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's per-channel mean and std (of pixel / 255), or a one-line error."""
    mean, std = data.get("mean"), data.get("std")
    if mean is None or std is None or len(mean) != in_channels or len(std) != in_channels:
        raise PipelineError(
            f"{source}: checkpoint lacks the data's mean/std for {in_channels} channel(s)"
        )
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
