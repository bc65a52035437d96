"""Inference latency of UNet++ pruned to each depth L1..L4, and of UNet, per device.

The models are the pipeline's (pipeline.models.build_model; `UNetPlusPlus.prune(k)` gives the
standalone depth-k network the prune stage measures), randomly initialised (latency does not
depend on the weights), in eval mode, on one batch of --batch images of --size x --size. The
latency is pipeline.inference.stats.latency_ms: the median of --runs forwards after --warmup, CUDA
synchronised after each; params and GFLOPs come from pipeline.inference.stats too. CPU always, CUDA
when available (--devices to choose); --dtype bf16 runs the CUDA forwards under bf16 autocast.

    uv run python bench/inference_latency.py                      # 512x512, batch 1
    uv run python bench/inference_latency.py --size 128 --runs 5 --devices cpu
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from bench.benchlib import device_name, environment, out_stem, write_outputs

NAME = "inference_latency"


class Autocast(nn.Module):
    """Runs the wrapped model's forward under autocast (what `--dtype bf16` measures)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, self.dtype):
            return self.model(x)


def models(base: int, depth: int, depths: list[int]) -> list[tuple[str, nn.Module]]:
    """(name, eval-mode model): UNet++ pruned to each depth, then UNet, all 3 in / 2 classes
    (one sigmoid output channel, as the pipeline builds binary models)."""
    from pipeline.models import build_model

    torch.manual_seed(0)
    unetpp = build_model("unetpp", 3, 2, base_channels=base, depth=depth)
    unet = build_model("unet", 3, 2, base_channels=base, depth=depth)
    out = [(f"UNet++ L{k}", unetpp.prune(k)) for k in depths] + [("UNet", unet)]
    return [(name, m.eval()) for name, m in out]


def measure(args, devices: list[torch.device]) -> list[dict]:
    from pipeline.inference.stats import count_params, gflops, latency_ms

    shape = (args.batch, 3, args.size, args.size)
    rows = []
    built = models(args.base, args.depth, args.depths)
    flops = {name: gflops(m, shape) for name, m in built}  # per image, device-independent
    for device in devices:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for name, model in built:
            model = model.to(device)
            bf16 = device.type == "cuda" and args.dtype == "bf16"
            timed = Autocast(model, torch.bfloat16).eval() if bf16 else model
            ms = latency_ms(timed, shape, args.runs, args.warmup)
            rows.append(
                {
                    "device": device_name(device),
                    "model": name,
                    "precision": "bf16 autocast" if bf16 else "fp32",
                    "params": count_params(model),
                    "gflops_per_image": flops[name],
                    "latency_ms": ms,
                    "images_per_s": args.batch / ms * 1e3,
                }
            )
            model.to("cpu")
    return rows


COLUMNS = {
    "device": "device",
    "model": "model",
    "precision": "precision",
    "params": "params",
    "gflops_per_image": "GFLOPs / image",
    "latency_ms": "latency ms (median)",
    "images_per_s": "images/s",
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20, help="timed forwards (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--base", type=int, default=32, help="channels of the first level")
    parser.add_argument("--depth", type=int, default=4, help="UNet++ depth (and UNet's)")
    parser.add_argument("--devices", default="auto", help="cpu,cuda or auto (cpu + cuda if any)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="on CUDA")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/" + NAME + ")")
    args = parser.parse_args(argv)
    args.depths = list(range(1, args.depth + 1))
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ["cpu", "cuda"] if args.devices == "auto" else args.devices.split(",")
    devices = [torch.device(n) for n in names if n != "cuda" or torch.cuda.is_available()]
    if "cuda" in names and not torch.cuda.is_available() and args.devices != "auto":
        sys.exit("--devices cuda: no CUDA device is available")

    rows = measure(args, devices)
    given = sys.argv[1:] if argv is None else argv
    env = environment(devices, ["bench/inference_latency.py", *given])
    env.update(input=f"{args.batch}x3x{args.size}x{args.size}", runs=args.runs)
    notes = (
        f"Input {env['input']}; median of {args.runs} forwards after {args.warmup} warm-up "
        f"ones (pipeline.inference.stats.latency_ms). UNet++ and UNet with base {args.base}, "
        "BatchNorm, transposed convolutions; L4 is the full UNet++. GFLOPs per image by "
        "torch's FlopCounterMode (2 per multiply-add)."
    )
    md = write_outputs(out_stem(args.out, NAME), "Inference latency", env, rows, COLUMNS, notes)
    print(md)
    return {**env, "rows": rows}


if __name__ == "__main__":
    main()
