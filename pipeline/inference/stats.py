"""Model statistics: parameters, FLOPs (torch's flop counter) and latency (median after warm-up)."""

from __future__ import annotations

import platform
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def image_shape(dataset, multiple: int) -> tuple[int, ...]:
    """(1, C, H, W) of the dataset's first image, mirror-padded as for a whole-image forward:
    the input the stats are measured on."""
    from pipeline.inference.forward import pad_to_multiple

    padded, _ = pad_to_multiple(dataset[0][0][None], multiple)
    return (1, *padded.shape[1:])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: nn.Module, shape: tuple[int, ...]) -> float:
    """GFLOPs of one forward pass on an input of `shape` (B, C, H, W), per image."""
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(shape, device=device))
    return counter.get_total_flops() / shape[0] / 1e9


@torch.no_grad()
def latency_ms(model: nn.Module, shape: tuple[int, ...], runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in ms (CUDA synchronised when on a GPU)."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def model_stats(model: nn.Module, shape: tuple[int, ...], runs: int, warmup: int) -> dict:
    """params, GFLOPs per image and median latency on `shape` (B, C, H, W), with the device,
    batch and input size they were measured at."""
    device = next(model.parameters()).device
    return {
        "params": count_params(model),
        "gflops": round(gflops(model, shape), 4),
        "latency_ms": round(latency_ms(model, shape, runs, warmup), 3),
        "device": device_name(device),
        "batch": shape[0],
        "input": "x".join(map(str, shape[1:])),
    }
