"""ONNX export of the pipeline's models, verified against torch with onnxruntime.

    python -m pipeline.export --model models/unetpp.pt --depth 2 --out models/unetpp_l2.onnx

The graph maps `image` (B, C, H, W) to `logits` (B, out_channels, H, W): the deepest head for
UNet++ (prune first for a shallower one); valid convolutions give a smaller H x W. Batch,
height and width are dynamic where the model allows it; if the export does not run at a
second size, height and width are fixed at `size` (with a warning). The file records which:
its input shape reads ("batch", C, "height", "width") or ("batch", C, H, W).

Exporter: torch.export (`dynamo=True`), the maintained one; the TorchScript exporter is
deprecated. Both record only the branches taken on the example input, and `Up` skips its pad
when sizes already match, so a graph traced on 32x32 has no pad and fails on odd sizes. We
trace on a size that is odd at every level instead (the pad is recorded, and pads by 0 on even
sizes), then check the graph at another size before keeping it.
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from pipeline.core.common import PipelineError, atomic_path, check_output_file, run_cli
from pipeline.engine.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

# the exporter's optimizer logs every pass at INFO ("Removed 241 unused nodes"): noise here
logging.getLogger("onnxscript").setLevel(logging.WARNING)
logging.getLogger("onnx_ir").setLevel(logging.WARNING)

TOLERANCE = 1e-3  # largest |logit difference| onnxruntime vs torch that an export may have
BATCH = {0: "batch"}
SPATIAL = {0: "batch", 2: "height", 3: "width"}


def export_onnx(
    model: nn.Module,
    path: Path,
    in_channels: int,
    size: tuple[int, int] = (256, 256),
    dynamic: bool = True,
    opset: int | None = None,
) -> Path:
    """Write `model` in eval mode to `path` as ONNX; the caller's model is left as it is.

    The file appears only once onnxruntime has run it and matched torch to TOLERANCE.
    dynamic=False fixes every axis: (1, in_channels, *size).
    """
    path = Path(path)
    model = _cpu_eval(model)
    refusal = _refusal(model, _randn(1, in_channels, *size))
    if refusal:  # before the exporter, which would log pages of tracebacks for it
        raise PipelineError(f"{path}: the model cannot take {size[0]}x{size[1]}: {refusal}")
    try:
        with atomic_path(path) as tmp:
            if dynamic:
                axes = _export_dynamic(model, tmp, in_channels, size, opset, name=path)
            else:
                axes, x = {}, _randn(1, in_channels, *size)
                _export(model, tmp, x, None, opset)
                _verify(tmp, model, x)
    except Exception as exc:
        log.debug("ONNX export to %s failed", path, exc_info=True)
        raise PipelineError(f"{path}: ONNX export failed ({_reason(exc)})") from None
    # `path` is final here (the file went through a temporary name); a caller building a whole
    # folder atomically may still hold it under a temporary folder: name the file only
    log.info("%s: exported (dynamic: %s)", path.name, ", ".join(axes.values()) or "none")
    return path


def check_onnx(path: Path, model: nn.Module, inputs: torch.Tensor) -> float:
    """Max |difference| between onnxruntime's logits and torch's (eval, no grad) on `inputs`."""
    try:
        return _max_diff(path, _cpu_eval(model), inputs.detach().cpu().float())
    except (ValueError, RuntimeError) as exc:
        raise PipelineError(f"{path}: {_reason(exc)}") from None


def _export_dynamic(model, tmp, in_channels, size, opset, name) -> dict[int, str]:
    """Dynamic batch, height and width if the graph runs right at another size; else batch.
    Returns the dynamic axes."""
    (h, w), depth = size, getattr(model, "depth", 0)
    m = 2**depth
    odd = (h | (m - 1), w | (m - 1))  # odd at every level: the pad in `Up` gets traced
    if depth and _refusal(model, _randn(1, in_channels, *odd)) is None:
        trace, check = odd, (-(-h // m) * m, -(-w // m) * m)  # check where no level is odd
    else:  # a model that takes only some sizes: trace the one asked for, check the next
        step = getattr(model, "size_multiple", None) or m
        trace, check = size, (h + step, w + step)
    try:
        _export(model, tmp, _randn(2, in_channels, *trace), SPATIAL, opset)
        _verify(tmp, model, _randn(3, in_channels, *check))
        return SPATIAL
    except Exception as exc:  # whatever went wrong, a fixed size may still export
        log.warning("%s: height/width fixed at %dx%d (%s)", name, h, w, _reason(exc))
        _export(model, tmp, _randn(2, in_channels, h, w), BATCH, opset)
        _verify(tmp, model, _randn(3, in_channels, h, w))
        return BATCH


def _export(model, path, example, axes, opset) -> None:
    torch.onnx.export(
        model,
        (example,),
        path,
        input_names=["image"],
        output_names=["logits"],
        opset_version=opset,
        dynamo=True,
        dynamic_shapes=None if axes is None else (axes,),  # names: any size, named in the file
        # one file: the default may put weights in a side file named after the temporary path
        external_data=False,
        verbose=False,
    )


def _verify(path: Path, model: nn.Module, x: torch.Tensor) -> None:
    diff = _max_diff(path, model, x)
    if diff > TOLERANCE:
        raise RuntimeError(f"onnxruntime differs from torch by {diff:.2g} on {tuple(x.shape)}")


def _max_diff(path: Path, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = model(x).numpy()  # the models refuse sizes they cannot take: ValueError
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures come back as exceptions; don't print them too
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (got,) = session.run(["logits"], {"image": x.numpy()})
    except Exception as exc:  # onnxruntime's own types (Fail, InvalidArgument, ...)
        raise RuntimeError(f"onnxruntime fails on {tuple(x.shape)}: {_reason(exc)}") from None
    if got.shape != expected.shape:
        raise RuntimeError(f"onnxruntime gives {got.shape}, torch {expected.shape}")
    return float(np.abs(got - expected).max())


def _cpu_eval(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().eval()


def _randn(*shape: int) -> torch.Tensor:
    # a private generator: exporting must not shift the caller's seeded random stream
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _refusal(model: nn.Module, x: torch.Tensor) -> str | None:
    """Why the model cannot take x's size (valid convolutions and smp encoders refuse most
    odd ones, every model too small ones), or None."""
    try:
        with torch.no_grad():
            model(x)
    except (ValueError, RuntimeError) as exc:
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause (torch.export wraps the useful message), with the
    next one if it only introduces that."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint from training")
    parser.add_argument("--depth", type=int, help="UNet++: prune to the head at this depth")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(256, 256),
        metavar=("H", "W"),
        help="example input size (the fixed size if height/width cannot be dynamic)",
    )
    args = parser.parse_args(argv)
    check_output_file(args.out, "--out")
    model, ckpt = load_checkpoint(args.model, "cpu")
    if args.depth is not None:
        if not hasattr(model, "prune"):
            raise PipelineError(f"{args.model}: --depth needs a UNet++, not {ckpt['arch']}")
        try:
            model = model.prune(args.depth)
        except ValueError as exc:
            raise PipelineError(f"{args.model}: {exc}") from None
    export_onnx(model, args.out, ckpt["model_config"]["in_channels"], tuple(args.size))


if __name__ == "__main__":
    run_cli(main)
