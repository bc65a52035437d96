"""pipeline.engine.numerics: `train.amp: auto` picks bf16 only where the CPU runs it natively,
NHWC and the fused optimizer come with it, and the fp32 path stays the reference."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import parse_params
from pipeline.engine import numerics as num
from pipeline.engine.optim import make_optimizer
from pipeline.inference.tiling import predict_tiled
from pipeline.models import build_model

CPU = torch.device("cpu")


@pytest.fixture
def cpu(monkeypatch):
    """A CPU with the given bf16 instructions: cpu(amx=True, avx512_bf16=True)."""

    def make(amx: bool = False, avx512_bf16: bool = False, isa: str | None = None):
        probes = {"_is_amx_tile_supported": amx, "_is_avx512_bf16_supported": avx512_bf16}
        monkeypatch.setattr(num, "_has", lambda probe, flag: probes[probe])
        for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
            monkeypatch.delenv(var, raising=False)
        if isa is not None:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        num.cpu_bf16.cache_clear()

    yield make
    num.cpu_bf16.cache_clear()


def test_auto_is_bf16_on_a_cpu_with_amx_or_avx512_bf16_and_fp32_without(cpu):
    cpu(amx=True, avx512_bf16=True)
    assert num.cpu_bf16() == "AMX" and num.amp_dtype("auto", CPU) is torch.bfloat16
    cpu(avx512_bf16=True)
    assert num.cpu_bf16() == "AVX512-BF16" and num.amp_dtype("auto", CPU) is torch.bfloat16
    cpu()  # AVX2 or plain AVX512: oneDNN would emulate bf16, slower than fp32
    assert num.cpu_bf16() is None and num.amp_dtype("auto", CPU) is None


def test_explicit_choices_do_not_depend_on_the_cpu(cpu):
    cpu()
    assert num.amp_dtype("bf16", CPU) is torch.bfloat16
    assert num.amp_dtype("fp16", CPU) is torch.float16
    cpu(amx=True)
    assert num.amp_dtype("none", CPU) is None


@pytest.mark.parametrize(
    ("isa", "found"),
    [("AVX2", None), ("avx512_core", None), ("AVX512_CORE_BF16", "AVX512-BF16"),
     ("AVX10_1_512", "AVX512-BF16"), ("AVX512_CORE_AMX", "AMX"), ("ALL", "AMX")],
)  # fmt: skip
def test_onednn_max_cpu_isa_caps_what_counts_as_native(cpu, isa, found):
    cpu(amx=True, avx512_bf16=True, isa=isa)
    assert num.cpu_bf16() == found


def test_the_cpu_fast_path_adds_nhwc_and_the_fused_optimizer_and_fp32_stays_as_it_was(cpu):
    cpu(amx=True, avx512_bf16=True)
    fast = num.numerics("auto", True, CPU)
    assert (fast.amp_dtype, fast.channels_last, fast.fused) == (torch.bfloat16, True, True)
    assert fast.describe() == "bf16 autocast, channels_last, fused optimizer (CPU: AMX)"
    compiled = num.Numerics(torch.bfloat16, True, True, "cpu", compiled=True).describe()
    assert compiled == "bf16 autocast, channels_last, fused optimizer, torch.compile (CPU: AMX)"
    assert not num.numerics("auto", False, CPU).channels_last  # train.channels_last: false
    reference = num.numerics("none", True, CPU)
    assert (reference.amp_dtype, reference.channels_last, reference.fused) == (None, False, False)
    cpu()
    plain = num.numerics("auto", True, CPU)
    assert (plain.amp_dtype, plain.channels_last, plain.fused) == (None, False, False)
    assert plain.describe() == "fp32 (CPU: no native bf16)"


def test_cuda_keeps_its_path(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu = num.numerics("auto", True, torch.device("cuda"))
    assert (gpu.amp_dtype, gpu.channels_last, gpu.fused) == (torch.bfloat16, True, False)
    assert gpu.describe() == "bf16 autocast, channels_last (CUDA)"


def test_a_placed_model_is_nhwc_and_predicts_what_the_contiguous_one_does():
    torch.manual_seed(0)
    model = build_model("unetpp", 3, 2, base_channels=4, depth=2).eval()
    assert num.module_format(model) == torch.contiguous_format
    images = torch.rand(1, 3, 40, 52)
    with torch.no_grad():
        plain = predict_tiled(model, images, 16, 4, model.size_multiple, "gaussian")
        whole = predict_tiled(model, images, 0, 0, model.size_multiple, "gaussian")
        nhwc = num.Numerics(None, True, False).place(model)
        assert num.module_format(nhwc) == torch.channels_last
        tiled = predict_tiled(nhwc, images, 16, 4, model.size_multiple, "gaussian")
        full = predict_tiled(nhwc, images, 0, 0, model.size_multiple, "gaussian")
    torch.testing.assert_close(tiled, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_the_fused_optimizer_steps_like_the_per_tensor_one(optimizer):
    params = parse_params({"train": {"optimizer": optimizer, "weight_decay": 0.01}})
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Conv2d(2, 3, 3)
        opt = make_optimizer(params, model, fused=fused)
        assert opt.defaults.get("fused") is (True if fused else None)
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(1, 2, 5, 5)).square().mean().backward()
            opt.step()
        results.append(model.weight.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


PX64, PX96 = 8 * 64**2, 8 * 96**2  # patch pixels of a step of 8 crops
BF16_CPU = num.Numerics(torch.bfloat16, True, True, "cpu")
FP32_CPU = num.Numerics(None, False, False, "cpu")
GPU = num.Numerics(torch.bfloat16, True, False, "cuda")


@pytest.mark.parametrize(
    ("choice", "arch", "steps", "pixels", "run", "expected"),
    [
        ("auto", "unetpp", 2442, PX64, BF16_CPU, True),  # 80 M pixels repay ~35 s of compiling
        ("auto", "unetpp", 2441, PX64, BF16_CPU, False),
        ("auto", "unetpp", 1086, PX96, BF16_CPU, True),  # larger patches: fewer steps
        ("auto", "unetpp", 288, PX64, BF16_CPU, False),  # the default
        ("auto", "unet", 100_000, PX64, BF16_CPU, False),  # UNet's step gains a few % on a CPU
        ("auto", "unetpp", 100_000, PX64, FP32_CPU, False),  # measured in bf16 only: eager
        ("auto", "unetpp", 100_000, PX64, GPU, False),  # the GPU presets say true themselves
        (True, "unet", 1, PX64, FP32_CPU, True),  # true / false are obeyed
        (False, "unetpp", 100_000, PX64, BF16_CPU, False),
    ],
)
def test_compile_auto_compiles_where_the_run_repays_it(choice, arch, steps, pixels, run, expected):
    assert num.compile_decision(choice, arch, steps, pixels, run) is expected


def test_train_compile_takes_auto_or_a_boolean():
    from pipeline.core.common import PipelineError

    assert parse_params({"train": {"compile": "auto"}}).train.compile == "auto"
    assert parse_params({"train": {"compile": True}}).train.compile is True
    with pytest.raises(PipelineError, match="train.compile"):
        parse_params({"train": {"compile": "sometimes"}})


def test_the_loader_drops_the_partial_batch_only_when_asked():
    from pipeline.stages import train as tr

    params = parse_params({"batch_size": 8})
    patches = list(range(2014))  # 251 full batches and one of 6
    dropped, _ = tr.patch_loader(patches, params, CPU, tr.SINGLE, drop_last=True)
    kept, _ = tr.patch_loader(patches, params, CPU, tr.SINGLE)
    assert (len(dropped), len(kept)) == (251, 252)
    assert {len(b) for b in dropped} == {8}


def test_the_run_numerics_hold_the_compile_decision(cpu):
    from pipeline.stages import train as tr

    cpu(amx=True)
    # 2,510 steps of 8 x 64 px: 82 M patch pixels
    params = parse_params({"epochs": 10, "batch_size": 8, "preprocess": {"crop_size": 64}})
    assert tr.run_numerics(params, CPU, "unetpp", 2014).compiled
    assert not tr.run_numerics(params, CPU, "unet", 2014).compiled
    assert not tr.run_numerics(params, CPU).compiled  # no arch: precision and layout only
    cpu()  # the fp32 reference path stays eager under auto
    assert not tr.run_numerics(params, CPU, "unetpp", 2014).compiled


def test_the_report_names_each_models_numerics_when_they_differ():
    from pipeline.report.tables import numerics_text

    same = {
        "UNet": {"numerics": "fp32 (CPU: no native bf16)"},
        "UNet++": {"numerics": "fp32 (CPU: no native bf16)"},
    }
    assert numerics_text(same) == "fp32 (CPU: no native bf16)"
    mixed = {"UNet": {"numerics": "bf16 autocast (CUDA)"}, "UNet++": {}}  # an older run
    assert numerics_text(mixed) == "UNet: bf16 autocast (CUDA); UNet++: not recorded"
