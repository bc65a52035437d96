"""ONNX export: every model runs in onnxruntime as in torch, at any batch and image size."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pipeline.core.common import PipelineError, run_cli
from pipeline.engine.checkpoint import save_checkpoint
from pipeline.export import check_onnx, export_onnx, main
from tests.fakes import tiny_model

ATOL = 1e-4


def tiny(arch: str, **options) -> nn.Module:
    return tiny_model(arch, **options)


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x.numpy()})[0]


def input_shape(path: Path) -> list[int | str]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.get_inputs()[0].shape


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_onnx_matches_torch_at_any_batch_and_size(tmp_path, arch, upsampling, norm):
    model = tiny(arch, upsampling=upsampling, norm=norm).train()  # UNet++: a list of heads
    path = export_onnx(model, tmp_path / "model.onnx", 3, size=(32, 32))
    assert model.training, "the caller's model keeps its mode"
    assert input_shape(path) == ["batch", 3, "height", "width"]
    for shape in [(1, 3, 32, 32), (3, 3, 48, 40), (2, 3, 27, 45)]:  # 27, 45: odd at each level
        assert check_onnx(path, model, torch.randn(shape)) < ATOL


def test_static_export_fixes_every_axis(tmp_path):
    model = tiny("unetpp")
    path = export_onnx(model, tmp_path / "model.onnx", 3, size=(32, 40), dynamic=False)
    assert input_shape(path) == [1, 3, 32, 40]
    assert check_onnx(path, model, torch.randn(1, 3, 32, 40)) < ATOL
    with pytest.raises(PipelineError, match=r"model\.onnx: onnxruntime fails on \(2, 3, 32, 40\)"):
        check_onnx(path, model, torch.randn(2, 3, 32, 40))


class WidthIs32(nn.Module):
    """Branches on the width: torch.export sees the size fixed and refuses a dynamic one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] if x.shape[-1] == 32 else -x[:, :1]


class EvenWidth(nn.Module):
    """Branches on the width's parity, as `match_size` does: torch.export keeps the branch
    traced without a word, so the graph is wrong at odd widths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] if x.shape[-1] % 2 == 0 else -x[:, :1]


@pytest.mark.parametrize("model", [WidthIs32(), EvenWidth()], ids=lambda m: type(m).__name__)
def test_a_model_that_cannot_take_other_sizes_gets_fixed_height_and_width(tmp_path, caplog, model):
    with caplog.at_level(logging.WARNING):
        path = export_onnx(model, tmp_path / "model.onnx", 3, size=(24, 32))
    assert "height/width fixed at 24x32" in caplog.text
    assert input_shape(path) == ["batch", 3, 24, 32]
    assert check_onnx(path, model, torch.randn(3, 3, 24, 32)) == 0


def test_a_failed_export_leaves_no_file_and_the_previous_one_intact(tmp_path, monkeypatch):
    def crash(model, args, f, **kwargs):
        Path(f).write_bytes(b"half an onnx file")
        raise RuntimeError("exporter crashed\ndetails")

    monkeypatch.setattr(torch.onnx, "export", crash)
    path = tmp_path / "model.onnx"
    with pytest.raises(PipelineError) as err:
        export_onnx(tiny("unet"), path, 3, size=(32, 32))
    assert str(err.value) == f"{path}: ONNX export failed (exporter crashed)"
    assert list(tmp_path.iterdir()) == []

    path.write_bytes(b"previous export")
    with pytest.raises(PipelineError):
        export_onnx(tiny("unet"), path, 3, size=(32, 32))
    assert path.read_bytes() == b"previous export"
    assert list(tmp_path.iterdir()) == [path]


def test_a_size_the_model_refuses_is_one_line_before_any_export(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported anyway"))
    valid = tiny("unet", padding=0)  # valid convolutions take only some sizes
    with pytest.raises(PipelineError, match=r"cannot take 45x45: .* nearest valid padded size"):
        export_onnx(valid, tmp_path / "model.onnx", 3, size=(45, 45))
    assert list(tmp_path.iterdir()) == []


# --- CLI --------------------------------------------------------------------------------------


def save_tiny(path: Path, arch: str) -> nn.Module:
    options = {"base_channels": 4, "depth": 2}
    model = tiny(arch, **options).eval()
    config = {"in_channels": 3, "num_classes": 2, "options": options}
    save_checkpoint(path, model, arch=arch, model_config=config)
    return model


@pytest.mark.parametrize("depth", [None, 1, 2])
def test_cli_exports_every_depth_of_a_deep_supervised_unetpp(tmp_path, depth):
    model = save_tiny(tmp_path / "unetpp.pt", "unetpp")
    out = tmp_path / "unetpp.onnx"
    argv = ["--model", str(tmp_path / "unetpp.pt"), "--out", str(out), "--size", "32", "32"]
    run_cli(main, argv + ([] if depth is None else ["--depth", str(depth)]))
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():  # --depth k: head k of the full model; none: the deepest head
        expected = model.forward_heads(x)[depth or model.depth].numpy()
    assert np.abs(run_onnx(out, x) - expected).max() < ATOL


@pytest.mark.parametrize(
    ("arch", "extra", "message"),
    [
        ("unetpp", ["--depth", "3"], r"unetpp\.pt: no head at depth 3"),
        ("unet", ["--depth", "1"], r"unet\.pt: --depth needs a UNet\+\+, not unet"),
        (None, [], r"missing\.pt: checkpoint not found"),
    ],
)
def test_cli_errors_are_one_line_and_exit_1(tmp_path, caplog, arch, extra, message):
    checkpoint = tmp_path / (f"{arch}.pt" if arch else "missing.pt")
    if arch:
        save_tiny(checkpoint, arch)
    argv = ["--model", str(checkpoint), "--out", str(tmp_path / "out.onnx"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    assert exit_info.value.code == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "\n" not in record.getMessage()
    assert re.search(message, record.getMessage())
    assert not (tmp_path / "out.onnx").exists()
