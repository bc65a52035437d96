"""Self-describing checkpoints: weights, model config, params, metrics, data description;
and the per-epoch resume state of a training run (models/resume/<arch>.pt).

Only tensors, numbers, strings, lists and dicts go in, so `torch.load(weights_only=True)` works.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.common import PipelineError, atomic_path
from pipeline.models import build_model

log = logging.getLogger(__name__)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights: a snapshot that later training steps do not change."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def torch_save(obj: Any, path: Path, target: Path) -> None:
    """torch.save to `path` (the temporary of `target`); a failed write (torch reports a full
    disk as "unexpected pos 64 vs 0") is one line naming the file and the cause."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as exc:
        free = shutil.disk_usage(path.parent).free
        if getattr(exc, "errno", None) == errno.ENOSPC or free < 64 * 2**20:
            cause = f"no space left on the device ({free / 2**20:.0f} MiB free)"
        else:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"{target}: could not be written: {cause}") from None


def save_checkpoint(path: Path, model: nn.Module, **info: Any) -> None:
    with atomic_path(path) as tmp:
        torch_save({"state_dict": cpu_state(model), **info}, tmp, path)


CHECKPOINT_KEYS = ("arch", "model_config", "state_dict")  # what loading one needs


def _not_a_checkpoint(obj: Any) -> str | None:
    """What a loaded file holds instead of a checkpoint (for the error), or None if it is one."""
    if not isinstance(obj, dict):
        return f"a {'tensor' if isinstance(obj, torch.Tensor) else type(obj).__name__}"
    if "fingerprint" in obj and "model" in obj:
        return "a training run's resume state (models/resume/), which training alone reads"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"bare weights (a state_dict of {len(obj)} tensors, no arch or model_config)"
    if missing := [k for k in CHECKPOINT_KEYS if k not in obj]:
        keys = ", ".join(repr(k)[:40] for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
        return f"a dict of {keys or 'nothing'}, without {', '.join(missing)}"
    return None


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, checkpoint dict)."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: checkpoint not found (run the training stage)") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise PipelineError(f"{path}: not a readable checkpoint ({type(exc).__name__})") from None
    if (holds := _not_a_checkpoint(ckpt)) is not None:
        raise PipelineError(
            f"{path}: not a checkpoint of this pipeline: it holds {holds}; a checkpoint is the "
            f"dict training saves as models/<arch>.pt, with {', '.join(CHECKPOINT_KEYS)}"
        )
    try:
        cfg = ckpt["model_config"]
        options = dict(cfg["options"])
        if "encoder_weights" in options:  # the checkpoint holds the weights: fetch nothing
            options["encoder_weights"] = None
        model = build_model(ckpt["arch"], cfg["in_channels"], cfg["num_classes"], **options)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, IndexError, AttributeError, TypeError, ValueError, RuntimeError) as exc:
        # the keys are there, their contents are not what training writes
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"{path}: not a checkpoint of this pipeline ({msg})") from None
    return model.to(device).eval(), ckpt


# --- resume state: everything needed to continue an interrupted run exactly -----------------


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and plain numbers (weights_only-loadable)."""
    import random

    import numpy as np

    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # this process's GPU only (under DDP each rank owns one)
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def save_resume(path: Path, state: dict[str, Any]) -> None:
    """Atomically: a kill while writing leaves the previous epoch's state in place."""
    with atomic_path(path) as tmp:
        torch_save(state, tmp, path)


def load_resume(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The saved state if it belongs to a run with the same fingerprint (params and data),
    else None: a changed param or dataset starts afresh instead of mixing two runs."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say so and start afresh
        log.warning("%s: unreadable resume state (%s); starting afresh", path, type(exc).__name__)
        return None
    if not isinstance(state, dict):  # e.g. a tensor saved there by hand
        log.warning("%s: not a resume state (%s); starting afresh", path, type(state).__name__)
        return None
    if state.get("fingerprint") != fingerprint:
        log.info("%s: saved for other params or data; starting afresh", path)
        return None
    return state
