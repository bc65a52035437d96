"""The default recipe's training step on the CPU: what the pipeline runs (fp32, contiguous)
against the two faster variants a CPU offers, and whether they give the same results.

The models are params.yaml's `unet:` and `unetpp:` (UNet++ with its deep-supervision loss), on
batches of `batch_size` crops of `preprocess.crop_size` px with the dataset's channels, as
`dvc repro` trains them; the step is pipeline.engine.loop.Engine's (bench.benchlib). Variants:

- fp32: what the pipeline runs on a CPU (`train.amp: auto` is off there; `train.channels_last`
  applies on CUDA only);
- channels_last: the same fp32 step with NHWC tensors (oneDNN picks other kernels);
- bf16: autocast to bfloat16, what `train.amp: bf16` runs on a CPU; how much it gains
  depends on the CPU's bf16 instructions (AVX512-BF16, AMX);
- bf16_channels_last: both (the pipeline has no switch for it on a CPU).

For each variant: the step time (median of --windows windows of --steps steps, after
--warmup steps) and the speed-up over fp32; then --check steps from the same seed on the
same batches, whose losses are compared with a separate fp32 run's (so fp32's own row checks
that it repeats itself): `identical` says whether every loss is bit for bit the same, `first
diff` at which step they first differ, `loss diff` the largest relative difference. A variant
that is not identical changes every metric of the run (the trajectories drift apart), so it
cannot be a drop-in speed-up of the default.

    uv run python bench/cpu_step.py                     # torch's threads (one per core)
    uv run python bench/cpu_step.py --threads 2 --archs unetpp --check 10
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.benchlib import (
    environment,
    out_stem,
    pipeline_engine,
    pipeline_step,
    time_windows,
    write_outputs,
)

NAME = "cpu_step"
TITLE = "The default recipe's training step on the CPU: fp32, channels_last, bf16"
VARIANTS = {  # name -> (autocast dtype, channels_last)
    "fp32": (None, False),
    "channels_last": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16_channels_last": (torch.bfloat16, True),
}
COLUMNS = {
    "arch": "model",
    "variant": "variant",
    "step_ms": "step ms (median)",
    "speedup": "speed-up",
    "identical": "identical",
    "first_diff": "first diff (step)",
    "loss_rel_diff": "loss diff",
}


def recipe(params_path: str | None):
    """(params, manifest) of the default run: params.yaml's, and the processed data's
    manifest, or without one the synthetic dataset's RGB images and two classes."""
    from types import SimpleNamespace

    from pipeline import paths
    from pipeline.config import load_params
    from pipeline.data.manifest import IGNORE_INDEX, load_manifest

    params = load_params(None if params_path is None else Path(params_path), complete=False)
    if paths.MANIFEST.is_file():
        return params, load_manifest()
    # what build_loss reads when loss.class_weights is null (the default's)
    return params, SimpleNamespace(in_channels=3, num_classes=2, ignore_index=IGNORE_INDEX)


def build(arch: str, params, manifest):
    """The model and its training loss as pipeline.stages.train builds them."""
    from pipeline.engine.losses import build_loss
    from pipeline.models import build_model

    config = params.model(arch).model_dump()
    model = build_model(arch, manifest.in_channels, manifest.num_classes, **config)
    return model, build_loss(params.loss, bool(config.get("deep_supervision")), manifest)


def batches(params, manifest, count: int) -> list[tuple[torch.Tensor, ...]]:
    """`count` fixed random batches of the recipe's shape."""
    g = torch.Generator().manual_seed(0)
    b, size = params.batch_size, params.preprocess.crop_size
    channels, classes = manifest.in_channels, manifest.num_classes
    return [
        (
            torch.randn(b, channels, size, size, generator=g),
            torch.randint(0, classes, (b, size, size), generator=g),
        )
        for _ in range(count)
    ]


def engine_for(arch: str, variant: str, params, manifest):
    torch.manual_seed(params.seed)
    model, loss = build(arch, params, manifest)
    dtype, cl = VARIANTS[variant]
    engine = pipeline_engine(model, torch.device("cpu"), dtype, cl, False, loss, params.lr)
    engine.model.train()
    return engine


def losses(engine, data: Sequence[tuple[torch.Tensor, ...]]) -> list[float]:
    """The objective of each step, as train_epoch reads it back."""
    out = []
    for images, labels in data:
        images, labels = engine.to_device([images, labels])
        value = engine.step(images, labels)[0].item()
        engine.apply()
        out.append(value)
    return out


def measure(args) -> list[dict]:
    params, manifest = recipe(args.params)
    data = batches(params, manifest, max(args.check, 2))
    rows = []
    for arch in args.archs:
        # a run of its own: so fp32's row checks that fp32 repeats itself bit for bit
        reference = losses(engine_for(arch, "fp32", params, manifest), data[: args.check])
        base_ms: float | None = None
        for variant in args.variants:
            engine, batch = engine_for(arch, variant, params, manifest), itertools.cycle(data)
            t = time_windows(
                lambda e=engine, b=batch: pipeline_step(e, *next(b)),
                torch.device("cpu"),
                args.steps,
                args.windows,
                args.warmup,
            )
            got = losses(engine_for(arch, variant, params, manifest), data[: args.check])
            pairs = list(zip(got, reference, strict=True))
            diffs = [i for i, (a, b) in enumerate(pairs) if a != b]
            ms = t["step_s"] * 1e3
            base_ms = ms if base_ms is None else base_ms
            row = {
                "arch": arch,
                "variant": variant,
                "step_ms": ms,
                "step_ms_min": t["step_s_min"] * 1e3,
                "step_ms_max": t["step_s_max"] * 1e3,
                "speedup": base_ms / ms,
                "identical": not diffs,
                "first_diff": diffs[0] + 1 if diffs else None,
                "loss_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs),
            }
            rows.append(row)
            print(
                f"{arch} {variant}: {ms:.1f} ms/step, x{row['speedup']:.2f}, "
                f"identical {row['identical']}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", help="params file (default: the repo's params.yaml)")
    parser.add_argument("--archs", nargs="+", default=["unet", "unetpp"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps")
    parser.add_argument("--check", type=int, default=24, help="steps compared with fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/" + NAME + ")")
    args = parser.parse_args(argv)
    if args.variants[0] != "fp32":
        parser.error("--variants: fp32 comes first (the others are compared with it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    env = {**environment([torch.device("cpu")]), "threads": torch.get_num_threads()}
    notes = (
        f"{env['threads']} torch threads. identical: every one of the compared steps' losses "
        "equals fp32's bit for bit; loss diff: the largest relative difference of a step's "
        "loss from fp32's over those steps."
    )
    print(write_outputs(out_stem(args.out, NAME), TITLE, env, rows, COLUMNS, notes))


if __name__ == "__main__":
    main()
