"""Training throughput of the classic UNet: the pipeline's training step vs a plain fp32 loop.

The model is the U-Net paper's network as the pipeline builds it (pipeline.models.unet.UNet:
64 base channels, 4 poolings, 2x2 transposed-convolution upsampling, BatchNorm, same padding,
3 input and 2 output channels: 31.0M parameters). Both loops run in this process on the same
synthetic batches, already on the device (no data loading: see loader_throughput.py):

- pipeline: pipeline.engine.loop.Engine, the step `dvc repro` runs: bf16 autocast, channels_last
  and torch.compile on CUDA (--no-amp, --no-channels-last, --no-compile turn each off), CE +
  soft Dice loss, Adam, the loss read back every step;
- plain: the loop of the seed documents, in fp32: model.train(); for x, y: opt.zero_grad();
  out = model(x); loss = criterion(out, y); loss.backward(); opt.step().

Prints images/s (median of --windows timed windows of --steps steps, CUDA synchronised at the
windows' ends), the FLOPs of one training step (forward + backward, torch's FlopCounterMode),
the achieved TFLOP/s and, on a GPU whose bf16 dense peak is known, the share of it.

    uv run python bench/train_throughput.py                       # 256x256, batch 32, GPU
    uv run python bench/train_throughput.py --device cpu --size 128 --batch 4 --steps 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import nn

from bench.benchlib import (
    environment,
    out_stem,
    pick_device,
    pipeline_engine,
    pipeline_step,
    time_windows,
    train_step_flops,
    write_outputs,
)

NAME = "train_throughput"
# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of the device name;
# the first match wins, so the specific names come first
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
)


def peak_bf16_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def build_unet(base: int, depth: int) -> nn.Module:
    """The paper's U-Net: two output channels under a softmax (the pipeline gives a binary
    task one sigmoid channel instead, 65 parameters fewer at base 64)."""
    from pipeline.models import build_model
    from pipeline.models.blocks import OutConv

    model = build_model("unet", 3, 2, base_channels=base, depth=depth, upsampling="transpose")
    model.head = OutConv(base, 2)
    return model


def plain_step(model: nn.Module, optimizer, criterion) -> Callable:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()

    return step


def measure(args, device: torch.device) -> list[dict]:
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True  # as the pipeline sets it on CUDA
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    batches = [
        (
            torch.randn(shape, generator=g).to(device),
            torch.randint(0, 2, (args.batch, args.size, args.size), generator=g).to(device),
        )
        for _ in range(2)
    ]
    flops = train_step_flops(build_unet(args.base, args.depth), shape)
    peak = peak_bf16_tflops(device)

    def cycle(step_fn):
        state = {"i": 0}

        def step():
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            step_fn(x, y)

        return step

    rows = []
    for mode in args.modes:
        torch.manual_seed(0)
        model = build_unet(args.base, args.depth).to(device)
        if mode == "pipeline":
            # bf16, channels_last and compile are the pipeline's CUDA path; the CPU path is fp32
            amp = on_cuda and args.amp
            cl = on_cuda and args.channels_last
            comp = on_cuda and args.compile
            engine = pipeline_engine(model, device, torch.bfloat16 if amp else None, cl, comp)
            model.train()
            step = cycle(lambda x, y, e=engine: pipeline_step(e, x, y))
            precision = "bf16 autocast" if amp else "fp32"
        else:
            amp = cl = comp = False
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            step = cycle(plain_step(model, opt, nn.CrossEntropyLoss()))
            precision = "fp32"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = time_windows(step, device, args.steps, args.windows, args.warmup)
        images_s = args.batch / t["step_s"]
        tflops = flops / t["step_s"] / 1e12
        rows.append(
            {
                "mode": mode,
                "precision": precision,
                "channels_last": cl,
                "compiled": comp,
                "images_per_s": images_s,
                "step_ms": t["step_s"] * 1e3,
                "step_ms_min": t["step_s_min"] * 1e3,
                "step_ms_max": t["step_s_max"] * 1e3,
                "warmup_s": t["warmup_s"],
                "tflops_per_step": flops / 1e12,
                "achieved_tflops": tflops,
                "peak_bf16_tflops": peak,
                "pct_of_bf16_peak": 100 * tflops / peak if peak else None,
                "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
                if on_cuda
                else None,
            }
        )
        del model, step
        if on_cuda:
            torch.cuda.empty_cache()
    base = next((r for r in rows if r["mode"] == "plain"), None)
    for r in rows:
        r["speedup_vs_plain"] = r["images_per_s"] / base["images_per_s"] if base else None
    return rows


COLUMNS = {
    "mode": "loop",
    "precision": "precision",
    "channels_last": "channels_last",
    "compiled": "compiled",
    "images_per_s": "images/s",
    "step_ms": "step ms (median)",
    "achieved_tflops": "TFLOP/s",
    "pct_of_bf16_peak": "% of bf16 peak",
    "speedup_vs_plain": "speed-up",
    "peak_memory_gib": "peak GiB",
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="input height = width")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compiles)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--base", type=int, default=64, help="channels of the first level")
    parser.add_argument("--depth", type=int, default=4, help="poolings")
    parser.add_argument("--modes", default="pipeline,plain", help="comma-separated")
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/" + NAME + ")")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"pipeline", "plain"}:
        parser.error("--modes: pipeline and/or plain")

    device = pick_device(args.device)
    params = sum(p.numel() for p in build_unet(args.base, args.depth).parameters())
    print(f"UNet base {args.base}, depth {args.depth}, in 3 / out 2: {params:,} parameters")
    rows = measure(args, device)
    given = sys.argv[1:] if argv is None else argv
    env = environment([device], ["bench/train_throughput.py", *given])
    env.update(
        model=f"UNet base {args.base} depth {args.depth} transpose-conv, in 3 / out 2",
        params=params,
        input=f"{args.batch}x3x{args.size}x{args.size}",
        steps=args.steps,
        windows=args.windows,
        warmup=args.warmup,
    )
    flops = rows[0]["tflops_per_step"] if rows else 0
    notes = (
        f"UNet {params:,} params; batch {env['input']}; {flops:.3f} TFLOP per training step "
        f"(forward + backward, FlopCounterMode); median of {args.windows} windows of "
        f"{args.steps} steps after {args.warmup} warm-up steps (warmup_s in the JSON includes "
        "torch.compile). The fp32 loop on CUDA uses cuDNN's default TF32 convolutions; "
        "'% of bf16 peak' compares both loops with the dense bf16 tensor-core peak."
    )
    md = write_outputs(out_stem(args.out, NAME), "Training throughput", env, rows, COLUMNS, notes)
    print(md)
    return {**env, "rows": rows}


if __name__ == "__main__":
    main()
