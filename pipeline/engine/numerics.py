"""The numerics of a run, chosen per machine: autocast precision, memory format, optimizer kernel.

`train.amp: auto` gives bf16 autocast where the hardware runs it natively and fp32 elsewhere:

- CUDA: bf16 on GPUs that have it natively (Ampere on), fp16 + grad scaler on older ones;
- CPU: bf16 when it has AVX512-BF16 or AMX instructions (detected, never assumed: without
  them oneDNN emulates bf16 and a step is several times slower than fp32), else fp32, the
  reference path, bit for bit what every earlier release computed.

On top of bf16 the CPU runs NHWC (`train.channels_last`) and the fused optimizer kernel:
bench/cpu_step.py measured a step 1.8-2.0x (UNet) and 1.9-2.1x (UNet++) faster than fp32
eager on a 2-core AMX Xeon. In fp32 NHWC made UNet's step slower there, so the fp32 path stays
as it was. `ONEDNN_MAX_CPU_ISA` (oneDNN's own switch, e.g. `AVX512_CORE` or `AVX2`) caps what
counts as native, so a bf16 machine can stand in for an older one.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_flags() -> set[str]:
    """/proc/cpuinfo's flags (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _has(probe: str, flag: str) -> bool:
    """torch's cpuinfo probe `probe` (a private API: /proc/cpuinfo's `flag` where it is gone)."""
    fn = getattr(torch.cpu, probe, None)
    return bool(fn()) if fn is not None else flag in _cpu_flags()


def _isa_cap() -> set[str]:
    """The bf16 instructions ONEDNN_MAX_CPU_ISA lets oneDNN use (all when unset)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).lower()
    if cap in ("", "all", "default") or "amx" in cap:
        return {"AMX", "AVX512-BF16"}
    return {"AVX512-BF16"} if any(s in cap for s in ("bf16", "fp16", "avx10")) else set()


@functools.cache
def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions ("AMX" or "AVX512-BF16"), or None without them."""
    allowed = _isa_cap()
    if "AMX" in allowed and _has("_is_amx_tile_supported", "amx_bf16"):
        return "AMX"
    if "AVX512-BF16" in allowed and _has("_is_avx512_bf16_supported", "avx512_bf16"):
        return "AVX512-BF16"
    return None


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype (None: fp32). auto: see the module docstring."""
    if choice == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        return torch.bfloat16 if cpu_bf16() else None
    return AMP_DTYPES.get(choice)


@dataclass(frozen=True)
class Numerics:
    """How a run computes: autocast dtype (None: fp32), NHWC, the fused optimizer kernel."""

    amp_dtype: torch.dtype | None
    channels_last: bool
    fused: bool
    device: str = "cpu"
    compiled: bool = False  # torch.compile (train.compile, compile_decision)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def place(self, model: nn.Module) -> nn.Module:
        return model.to(memory_format=self.memory_format) if self.channels_last else model

    def describe(self) -> str:
        """One line for the log, checkpoint, MLflow and report: 'bf16 autocast, channels_last,
        fused optimizer, torch.compile (CPU: AMX)'."""
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}
        parts = [precision[self.amp_dtype]]
        parts += ["channels_last"] * self.channels_last + ["fused optimizer"] * self.fused
        parts += ["torch.compile"] * self.compiled
        where = self.device.upper()
        if self.device == "cpu":
            where += f": {cpu_bf16() or 'no native bf16'}"
        return f"{', '.join(parts)} ({where})"


def numerics(amp: str, channels_last: bool, device: torch.device) -> Numerics:
    """What a run on `device` uses for train.amp `amp` and train.channels_last."""
    dtype = amp_dtype(amp, device)
    if device.type == "cuda":
        return Numerics(dtype, channels_last, fused=False, device="cuda")
    # the CPU: NHWC and the fused kernel pay with bf16; fp32 stays the reference path
    fast = dtype is torch.bfloat16
    return Numerics(dtype, channels_last and fast, fused=fast, device=device.type)


def module_format(model: nn.Module) -> torch.memory_format:
    """The memory format of `model`'s first 4-d weight: feed it inputs alike."""
    for p in model.parameters():
        if p.dim() == 4:
            nhwc = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if nhwc else torch.contiguous_format
    return torch.contiguous_format


# torch.compile on a CPU (bench/cpu_step.py, 2-core AMX Xeon, default recipe, bf16 + NHWC):
# UNet++'s step of 8 x 64 px patches 103-121 -> 94-103 ms (10-15%) for 30-37 s of compiling
# (an empty inductor cache). Compiling costs the same for any patch size while the saving grows
# with the pixels a step trains on, so the rule counts the run's patch pixels: 80 M is ~2,400
# steps of 8 x 64 px (where it breaks even) and ~1,100 of 8 x 96 px. UNet's step gains 2-6%:
# never worth its ~30 s. Not measured in fp32 on a CPU nor on CUDA: `auto` leaves those eager
# (the GPU presets set `compile: true`).
COMPILE_MIN_PIXELS = 80_000_000
CPU_COMPILE_S = 35.0  # what pipeline.plan adds for compiling one model on a CPU


def compile_decision(
    choice: bool | str, arch: str, steps: int, step_pixels: int, num: Numerics
) -> bool:
    """train.compile -> whether to torch.compile this run's forward. auto: UNet++ on a CPU in
    bf16 when its `steps` of `step_pixels` patch pixels (batch x crop^2) reach
    COMPILE_MIN_PIXELS; nothing else (see above)."""
    if choice != "auto":
        return bool(choice)
    measured = num.device == "cpu" and num.amp_dtype is torch.bfloat16 and arch == "unetpp"
    return measured and steps * step_pixels >= COMPILE_MIN_PIXELS
