"""Self-describing checkpoints: weights, model config, params, metrics, data description.

Only tensors, numbers, strings, lists and dicts go in, so `torch.load(weights_only=True)` works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.common import PipelineError, atomic_path
from pipeline.models import build_model


def save_checkpoint(path: Path, model: nn.Module, **info: Any) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, **info}, tmp)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: checkpoint not found (run the training stage)") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise PipelineError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    try:
        cfg = ckpt["model_config"]
        model = build_model(ckpt["arch"], cfg["in_channels"], cfg["num_classes"], **cfg["options"])
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"{path}: not a checkpoint of this pipeline ({msg})") from None
    return model.to(device).eval(), ckpt
