"""The default recipe's training step on the CPU: fp32 eager (the reference path) against what
`train.amp: auto` runs on this CPU and the variants it was chosen from, with torch.compile.

The models are params.yaml's `unet:` and `unetpp:` (UNet++ with its deep-supervision loss), on
batches of `batch_size` crops of `preprocess.crop_size` px with the dataset's channels, as
`dvc repro` trains them; the step is pipeline.engine.loop.Engine's (bench.benchlib). Variants:

- fp32: the reference path, what a CPU without native bf16 runs (and `train.amp: none`);
- channels_last: the same fp32 step with NHWC tensors (oneDNN picks other kernels);
- bf16: autocast to bfloat16; how much it gains depends on the CPU's bf16 instructions
  (AVX512-BF16, AMX; without them oneDNN emulates it, slower than fp32);
- bf16_channels_last: both;
- auto: what `train.amp: auto` runs on this CPU (pipeline.engine.numerics: on a bf16 CPU
  bf16 + NHWC + the fused optimizer; elsewhere exactly fp32);
- auto_compile: auto under torch.compile (`train.compile: true`); its compile time (the
  warm-up's extra seconds) and graph breaks (torch._dynamo.explain) are reported.

Step times are interleaved (a window of every variant in turn, --windows rounds of --steps
steps, after --warmup steps each) so that a noisy neighbour slows them all alike; the
speed-up is the median window's over fp32's. Then --check steps from the same seed on the
same batches, whose losses are compared with a separate fp32 run's (so fp32's own row checks
that it repeats itself): `identical` says whether every loss is bit for bit the same, `first
diff` at which step they first differ, `loss diff` the largest relative difference.

    uv run python bench/cpu_step.py --threads 2
    ONEDNN_MAX_CPU_ISA=AVX512_CORE uv run python bench/cpu_step.py --threads 2 \
        --variants fp32 bf16 auto --out reports/benchmarks/cpu_step_no_bf16   # an older CPU
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
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
TITLE = "The default recipe's training step on the CPU: fp32 eager vs train.amp auto and compile"
VARIANTS = {  # name -> (autocast dtype, channels_last, fused optimizer, torch.compile)
    "fp32": (None, False, False, False),
    "channels_last": (None, True, False, False),
    "bf16": (torch.bfloat16, False, False, False),
    "bf16_channels_last": (torch.bfloat16, True, False, False),
    "auto": "auto",  # pipeline.engine.numerics on this CPU
    "auto_compile": "auto",
}
COLUMNS = {
    "arch": "model",
    "variant": "variant",
    "step_ms": "step ms (median)",
    "speedup": "speed-up",
    "compile_s": "compile s",
    "graph_breaks": "graph breaks",
    "identical": "identical",
    "first_diff": "first diff (step)",
    "loss_rel_diff": "loss diff",
}


def recipe(params_path: str | None):
    """(params, manifest) of the default run: params.yaml's, and the processed data's
    manifest, or without one the synthetic dataset's RGB images and two classes."""
    from types import SimpleNamespace

    from pipeline.core import paths
    from pipeline.core.config import load_params
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


def settings(variant: str) -> tuple[torch.dtype | None, bool, bool, bool]:
    """(autocast dtype, channels_last, fused optimizer, compile) of a variant on this CPU."""
    if VARIANTS[variant] == "auto":
        from pipeline.engine.numerics import numerics

        num = numerics("auto", True, torch.device("cpu"))
        return num.amp_dtype, num.channels_last, num.fused, variant.endswith("compile")
    return VARIANTS[variant]


def engine_for(arch: str, variant: str, params, manifest):
    torch.manual_seed(params.seed)
    model, loss = build(arch, params, manifest)
    dtype, cl, fused, compiled = settings(variant)
    cpu = torch.device("cpu")
    engine = pipeline_engine(model, cpu, dtype, cl, compiled, loss, params.lr, fused=fused)
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


def graph_breaks(arch: str, params, manifest, variant: str) -> str:
    """torch._dynamo.explain's graph breaks of the model's forward, with their reasons."""
    import torch._dynamo

    model, _ = build(arch, params, manifest)
    dtype, cl, _, _ = settings(variant)
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    x = batches(params, manifest, 1)[0][0].contiguous(memory_format=fmt)
    with torch.autocast("cpu", dtype, enabled=dtype is not None):
        report = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    reasons = sorted({str(b.reason).splitlines()[0][:80] for b in report.break_reasons})
    return str(report.graph_break_count) + (f" ({'; '.join(reasons)})" if reasons else "")


def measure(args) -> list[dict]:
    params, manifest = recipe(args.params)
    data = batches(params, manifest, max(args.check, 2))
    cpu = torch.device("cpu")
    rows = []
    for arch in args.archs:
        # a run of its own: so fp32's row checks that fp32 repeats itself bit for bit
        reference = losses(engine_for(arch, "fp32", params, manifest), data[: args.check])
        runs = {}
        for variant in args.variants:  # warm-up, compiling where asked
            engine, batch = engine_for(arch, variant, params, manifest), itertools.cycle(data)
            step = lambda e=engine, b=batch: pipeline_step(e, *next(b))  # noqa: E731
            warm = time_windows(step, cpu, 1, 1, args.warmup)
            runs[variant] = {"step": step, "warm": warm, "windows": []}
        for _ in range(args.windows):  # interleaved: a slow moment slows every variant alike
            for run in runs.values():
                run["windows"].append(time_windows(run["step"], cpu, args.steps, 1, 0)["step_s"])
        base_ms = statistics.median(runs[args.variants[0]]["windows"]) * 1e3
        for variant, run in runs.items():
            got = losses(engine_for(arch, variant, params, manifest), data[: args.check])
            pairs = list(zip(got, reference, strict=True))
            diffs = [i for i, (a, b) in enumerate(pairs) if a != b]
            step_s = statistics.median(run["windows"])
            compiled = settings(variant)[3]
            row = {
                "arch": arch,
                "variant": variant,
                "numerics": describe(variant),
                "step_ms": step_s * 1e3,
                "step_ms_min": min(run["windows"]) * 1e3,
                "step_ms_max": max(run["windows"]) * 1e3,
                "speedup": base_ms / (step_s * 1e3),
                # the warm-up's seconds beyond its steps' share: compilation
                "compile_s": run["warm"]["warmup_s"] - args.warmup * step_s if compiled else None,
                "graph_breaks": graph_breaks(arch, params, manifest, variant) if compiled else None,
                "identical": not diffs,
                "first_diff": diffs[0] + 1 if diffs else None,
                "loss_rel_diff": max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs),
            }
            rows.append(row)
            print(
                f"{arch} {variant}: {row['step_ms']:.1f} ms/step, x{row['speedup']:.2f}, "
                f"identical {row['identical']}",
                flush=True,
            )
    return rows


def describe(variant: str) -> str:
    dtype, cl, fused, compiled = settings(variant)
    from pipeline.engine.numerics import Numerics

    text = Numerics(dtype, cl, fused).describe()
    return text.replace(" (", ", torch.compile (") if compiled else text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", help="params file (default: the repo's params.yaml)")
    parser.add_argument("--archs", nargs="+", default=["unet", "unetpp"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=7, help="timed windows (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps")
    parser.add_argument("--check", type=int, default=24, help="steps compared with fp32")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="keep inductor's on-disk cache (a re-run's compile) instead of an empty one",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="output path stem (default reports/benchmarks/" + NAME + ")")
    args = parser.parse_args(argv)
    if args.variants[0] != "fp32":
        parser.error("--variants: fp32 comes first (the others are compared with it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_cache:  # a first run's compile: inductor's on-disk cache starts empty
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cpu_step_inductor_")
    rows = measure(args)
    env = {**environment([torch.device("cpu")]), "threads": torch.get_num_threads()}
    from pipeline.engine.numerics import cpu_bf16

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    env["cpu_bf16"] = cpu_bf16() or "none"
    notes = (
        f"{env['threads']} torch threads; this CPU's native bf16: {env['cpu_bf16']}"
        + (f" (ONEDNN_MAX_CPU_ISA={isa})" if isa else "")
        + ". Windows of the variants interleaved. identical: every one of the compared steps' "
        "losses equals fp32's bit for bit; loss diff: the largest relative difference of a "
        "step's loss from fp32's over those steps; compile s: the warm-up's seconds beyond "
        "its steps' (torch.compile's compilation"
        + (", inductor's on-disk cache kept)." if args.warm_cache else ", an empty cache).")
    )
    print(write_outputs(out_stem(args.out, NAME), TITLE, env, rows, COLUMNS, notes))


if __name__ == "__main__":
    main()
