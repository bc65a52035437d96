"""Data loader throughput vs training step rate: can the loader feed the GPU?

Samples the training patches from the preprocessed images (data/processed, from `dvc repro
preprocess`) with the training params (params.yaml: batch_size, augment, crop size, the model
of --arch, amp, channels_last), then measures

- the pipeline's training DataLoader alone (same dataset, sampler, pinned memory on CUDA and
  persistent workers as pipeline.stages.train), in images/s, for each worker count of --workers:
  the first epoch (worker start-up included) and the median of the later ones;
- the training step alone (pipeline.engine.loop.Engine on batches already on the device), in
  images/s, median of --windows windows;

and prints, per worker count, loader / step: below 1 the GPU waits for data (raise
train.num_workers). bench/epoch_profile.py shows the same split from real epoch logs.

    uv run dvc repro preprocess && uv run python bench/loader_throughput.py
    uv run python bench/loader_throughput.py --workers 0,2,4,8 --epochs 3 --arch unet
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.benchlib import (
    environment,
    out_stem,
    pick_device,
    pipeline_engine,
    pipeline_step,
    time_windows,
    write_outputs,
)

NAME = "loader_throughput"


def loader_rate(params, manifest, workers: int, epochs: int, device: torch.device) -> dict:
    """Images/s of the training DataLoader alone, built as pipeline.stages.train builds it."""
    from torch.utils.data import DataLoader

    from pipeline.data.loading import EpochSampler, train_dataset

    ds = train_dataset(manifest, params)
    sampler = EpochSampler(len(ds), params.seed)
    loader = DataLoader(
        ds,
        batch_size=params.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(params.seed),
    )
    rates = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(batch[0]) for batch in loader)
        rates.append(n / (time.perf_counter() - t0))
    del loader  # stops persistent workers
    later = rates[1:] or rates
    return {"first_epoch": rates[0], "steady": statistics.median(later), "patches": len(ds)}


def step_rate(params, manifest, arch: str, device: torch.device, windows: int, steps: int):
    """Images/s of the pipeline's training step alone, on synthetic batches of the crops'
    shape already on the device."""
    from pipeline.engine.losses import build_loss
    from pipeline.engine.numerics import numerics
    from pipeline.models import build_model

    tp = params.train
    num = numerics(tp.amp, tp.channels_last, device)
    options = params.model(arch).model_dump()
    model = build_model(arch, manifest.in_channels, manifest.num_classes, **options)
    deep = arch == "unetpp" and params.unetpp.deep_supervision
    engine = pipeline_engine(
        model.train(),
        device,
        num.amp_dtype,
        num.channels_last,
        tp.compile is True,  # the loader vs the step as it runs eager (auto: see train)
        loss_fn=build_loss(params.loss, deep, manifest),
        lr=params.lr,
        fused=num.fused,
    )
    crop = params.preprocess.crop_size
    channels = manifest.in_channels
    x = torch.randn(params.batch_size, channels, crop, crop, device=device)
    classes = max(manifest.num_classes, 2)
    y = torch.randint(0, classes, (params.batch_size, crop, crop), device=device)
    t = time_windows(lambda: pipeline_step(engine, x, y), device, steps, windows, warmup=2)
    return params.batch_size / t["step_s"]


COLUMNS = {
    "workers": "workers",
    "loader_first_epoch": "loader img/s (1st epoch)",
    "loader_steady": "loader img/s (later epochs)",
    "step": "step img/s",
    "ratio": "loader / step",
    "verdict": "verdict",
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,2,4", help="comma-separated worker counts")
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs per worker count")
    parser.add_argument("--arch", default="unetpp", choices=["unet", "unetpp"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/" + NAME + ")")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.core.common import PipelineError
    from pipeline.core.config import load_params
    from pipeline.data.manifest import load_manifest

    try:
        params, manifest = load_params(complete=False), load_manifest()
    except PipelineError as exc:
        sys.exit(f"{exc} (run `uv run dvc repro preprocess` first)")
    device = pick_device(args.device)
    step = step_rate(params, manifest, args.arch, device, args.windows, args.steps)
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        rate = loader_rate(params, manifest, workers, args.epochs, device)
        ratio = rate["steady"] / step
        rows.append(
            {
                "workers": workers,
                "loader_first_epoch": rate["first_epoch"],
                "loader_steady": rate["steady"],
                "step": step,
                "ratio": ratio,
                "verdict": "keeps up" if ratio >= 1 else "GPU waits for data",
                "patches": rate["patches"],
            }
        )
    given = sys.argv[1:] if argv is None else argv
    env = environment([device], ["bench/loader_throughput.py", *given])
    crop = params.preprocess.crop_size
    env.update(
        dataset=manifest.dataset,
        patches=rows[0]["patches"] if rows else 0,
        crop_size=crop,
        batch_size=params.batch_size,
        arch=args.arch,
    )
    notes = (
        f"{manifest.dataset}: {env['patches']} training patches of {crop} px, batch "
        f"{params.batch_size}, augment {params.train.augment}; step: {args.arch} as params.yaml "
        f"configures it, median of {args.windows} windows of {args.steps} steps. A ratio "
        "below 1 means the step waits for the loader: raise train.num_workers."
    )
    title = "Data loader vs training step"
    md = write_outputs(out_stem(args.out, NAME), title, env, rows, COLUMNS, notes)
    print(md)
    return {**env, "rows": rows}


if __name__ == "__main__":
    main()
