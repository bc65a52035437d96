"""`python -m pipeline.plan`: what `dvc repro` will cost with the current params, on this machine,
before paying for it.

Nothing is trained. For each architecture a few real training steps run at the real crop size
and batch (forward, loss, backward, optimizer step, plus the loader's augmentation of a batch),
and one full-size image of each split goes through the real evaluation (overlap-tile or
whole-image prediction, loss and metrics); the stage times follow from the counts of patches
and images:

    download     = start-up + files in a local archive or folder x FILE_S
    preprocess   = start-up + PREPROCESS_DECODES x a crop's decode x images' pixels in crops
                   / preprocess workers
    train_<arch> = start-up + epochs x (steps x step + val images x val image)
                   + test images x test image + latency forwards
    prune        = start-up + for each depth: test images x its test image + latency forwards
                   (+ ONNX exports)
    report       = start-up + report.panels x 2 predictions

Start-up (imports, the MLflow store, DVC's bookkeeping) is a fixed cost per stage measured on a
2-core machine (START_UP). The counts come from data/processed/manifest.json when it was made
from the current dataset params, otherwise from the dataset's known layout (DRIVE, CamVid,
synthetic); a folder dataset needs `dvc repro preprocess` first.

    uv run python -m pipeline.plan              # a table; --json PATH also writes the figures
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.core import paths
from pipeline.core.common import (
    PipelineError,
    check_output_file,
    clock,
    preprocess_workers,
    run_cli,
    scaled_size,
    seed_everything,
    write_json,
)
from pipeline.core.config import DRIVE_TRAIN_IMAGES, IGNORE_INDEX, Params, load_params
from pipeline.data.crops import crop_origins
from pipeline.data.manifest import Manifest
from pipeline.data.store import array_path, array_shape
from pipeline.models import build_model

log = logging.getLogger(__name__)

# Seconds each stage spends outside the work timed here: Python imports (bytecode compiled at
# set-up), the stage's own set-up and outputs, DVC hashing its outputs; MLFLOW: opening the
# store and logging runs, models and artifacts. Measured under `dvc repro` on an idle 2-core
# machine with every stage's time split (bench/startup.py, reports/benchmarks/startup.md).
START_UP = {
    "download": 2.0,
    "preprocess": 2.5,
    "train": 10.0,
    "prune": 5.0,
    "report": 5.0,
}
# download from a local archive or folder: extracting a file and DVC hashing it (CamVid's 1,402
# files: 1.6 s); a URL's transfer time is unknown beforehand and left out
FILE_S = 0.001
# preprocess decodes each raw image and label and writes them as .npy (a copy), and DVC hashes
# them: about 2 decodes per pixel written, shared by the workers
PREPROCESS_DECODES = 2
MLFLOW = {"download": 4.0, "preprocess": 2.5, "train": 5.0, "prune": 2.5, "report": 2.5}
# a compiled UNet++ step on a CPU (bf16, NHWC), as a share of the eager one the plan times:
# 0.90 at batch 8 x 64 px (reports/benchmarks/cpu_step.md), 0.78 at 8 x 96 px (DRIVE's epochs,
# reports/results/drive-auto-20m-v1.json); the middle of the two
COMPILED_STEP = 0.85
# ONNX export (pipeline.export): importing onnx/onnxruntime once, then per model a fixed cost
# plus tracing and checking onnxruntime against torch at two input sizes, about 12 full-size
# forwards (measured on DRIVE: 4 s for L1 to 17 s for L4)
ONNX_IMPORT_S, ONNX_MODEL_S, ONNX_FORWARDS = 5.0, 3.0, 12

# (height, width) and split sizes of the datasets with a known layout
KNOWN_SIZES = {"drive": (584, 565), "camvid": (360, 480)}
CAMVID_SPLITS = {"train": 367, "val": 101, "test": 233}


@dataclass
class DataPlan:
    """What the stages iterate over: counts and sizes, (H, W) per split as the models see
    them (resized by preprocess.scale) and as they are scored (the labels' full size)."""

    dataset: str
    in_channels: int
    num_classes: int
    patches: int  # training patches per epoch
    sizes: dict[str, tuple[int, int]]
    counts: dict[str, int]
    source: str  # where the counts come from
    label_sizes: dict[str, tuple[int, int]]  # labels are kept full-size: scored there


@dataclass
class ArchPlan:
    arch: str
    step_s: float  # one training step (batch_size patches), the loader's share included
    loader_s: float  # the loader's share: augmenting and collating one batch
    steps_per_epoch: int
    eval_image_s: dict[str, float]  # one full-size image of each split, evaluated
    latency_forward_s: float  # one full-size forward (model_stats' latency runs)
    epoch_s: float = 0.0
    stage_s: float = 0.0
    depth_eval_s: dict[int, float] = field(default_factory=dict)  # UNet++: pruned depths
    compile_s: float = 0.0  # train.compile: compiling the forward (its steps timed eager)


def data_plan(params: Params) -> DataPlan:
    ds, pp = params.dataset, params.preprocess
    manifest = None
    if paths.MANIFEST.is_file():
        manifest = json.loads(paths.MANIFEST.read_text())
        if manifest.get("dataset") != ds.name:
            manifest = None
    if manifest is not None:
        counts = {s: len(v) for s, v in manifest["splits"].items()}
        sizes, label_sizes = {}, {}
        stored = manifest.get("scale", 1.0)  # the processed images' preprocess.scale
        for split, stems in manifest["splits"].items():
            h, w = array_shape(array_path(split, "images", stems[0]))[:2]
            full = (round(h / stored), round(w / stored))
            sizes[split] = scaled_size(*full, pp.scale)  # what the models will see
            label_sizes[split] = full
        classes, channels = manifest["num_classes"], manifest["in_channels"]
        source = str(paths.MANIFEST.relative_to(paths.ROOT))
    elif ds.name == "folder":
        raise PipelineError(
            "dataset.name folder: the plan needs the images' sizes; run "
            "`dvc repro preprocess` first"
        )
    else:
        if ds.name == "synthetic":
            side = ds.image_size
            counts = {"val": ds.val_count, "test": ds.test_count}
            counts["train"] = ds.num_images - ds.val_count - ds.test_count
            hw = (side, side)
        elif ds.name == "drive":
            counts = {"train": DRIVE_TRAIN_IMAGES - ds.val_count, "val": ds.val_count, "test": 20}
            hw = KNOWN_SIZES["drive"]
        else:
            counts, hw = dict(CAMVID_SPLITS), KNOWN_SIZES["camvid"]
        sizes = dict.fromkeys(counts, scaled_size(*hw, pp.scale))  # what the models see
        label_sizes = dict.fromkeys(counts, hw)
        classes, channels = (11, 3) if ds.name == "camvid" else (2, 3)
        source = f"the {ds.name} layout (no matching data/processed yet)"
    h, w = (max(n, pp.crop_size) for n in sizes["train"])
    grid = len(crop_origins(h, pp.crop_size, pp.crop_stride)) * len(
        crop_origins(w, pp.crop_size, pp.crop_stride)
    )
    patches = pp.patches_per_epoch or counts["train"] * grid
    return DataPlan(ds.name, channels, classes, patches, sizes, counts, source, label_sizes)


def source_files(params: Params) -> int:
    """Files in a local `dataset.source` (archive members or a folder's files); 0 for the
    synthetic set, a URL or a source that is not there (download will say so)."""
    import tarfile
    import zipfile

    from pipeline.data.archives import archive_kind, is_url

    source = params.dataset.source
    if params.dataset.name == "synthetic" or not source or is_url(source):
        return 0
    path = paths.resolve_source(source)
    try:
        if path.is_dir():
            return sum(1 for p in path.rglob("*") if p.is_file())
        kind = archive_kind(path) if path.is_file() else None
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                return sum(1 for i in zf.infolist() if not i.is_dir())
        if kind == "tar":
            with tarfile.open(path) as tf:
                return sum(1 for m in tf if m.isfile())
    except (OSError, zipfile.BadZipFile, tarfile.TarError):
        pass
    return 0


def _fake_manifest(data: DataPlan, params: Params) -> Manifest:
    """A manifest shaped like the real one will be (classes, channels), for timing."""
    return Manifest(
        dataset=data.dataset,
        num_classes=data.num_classes,
        class_names=[f"class{i}" for i in range(data.num_classes)],
        in_channels=data.in_channels,
        ignore_index=IGNORE_INDEX,
        mean=[0.5] * data.in_channels,
        std=[0.25] * data.in_channels,
        train_class_pixels=[1000 * (i + 1) for i in range(data.num_classes)],
        splits={},
    )


def _labels(num_classes: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, num_classes, shape)


def time_steps(engine, batch, seconds: float, max_steps: int = 20) -> float:
    """Seconds of one training step: the lower quartile of up to `max_steps` steps after three
    warm-up steps (robust to a step slowed by something else on the machine, which a median
    of a dozen steps was not: a plan once read 0.19 s for 0.12 s steps)."""
    engine.model.train()
    times: list[float] = []
    for i in range(max_steps + 3):
        t = time.perf_counter()
        engine.step(*batch)
        engine.apply()
        if i >= 3:
            times.append(time.perf_counter() - t)
        if len(times) >= 5 and sum(times) > seconds:
            break
    return statistics.quantiles(times, n=4)[0]


def time_loader(manifest: Manifest, params: Params) -> float:
    """Seconds to augment, normalise and collate one batch of patches (the DataLoader's work)."""
    from pipeline.data.loading import _hwc, transforms

    crop = params.preprocess.crop_size
    rng = np.random.default_rng(0)
    image = _hwc(rng.integers(0, 256, (crop, crop, manifest.in_channels), np.uint8))
    label = rng.integers(0, 2, (crop, crop), np.uint8)
    transform = transforms(manifest, params.train.augment, crop, params.seed)
    n = min(params.batch_size, 16)
    t = time.perf_counter()
    for _ in range(n):
        out = transform(image=image, mask=label)
        torch.from_numpy(out["image"].transpose(2, 0, 1).copy())
    per_item = (time.perf_counter() - t) / n
    return per_item * params.batch_size


def time_crop_read(manifest: Manifest, params: Params) -> float:
    """Seconds to decode a crop-sized piece of an image and its label from PNG (the unit of
    preprocess's cost)."""
    crop = params.preprocess.crop_size
    rng = np.random.default_rng(0)
    # a smooth image compresses like a photograph, unlike noise
    ramp = np.linspace(0, 255, crop, dtype=np.float32)
    image = np.clip(ramp[:, None] + rng.normal(0, 8, (crop, crop)), 0, 255).astype(np.uint8)
    image = np.repeat(image[..., None], manifest.in_channels, -1).squeeze()
    blobs = []
    for array in (image, (ramp[:, None] > 128).astype(np.uint8).repeat(crop, 1)):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=1)
        blobs.append(buf.getvalue())
    t = time.perf_counter()
    for _ in range(20):
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as img:
                np.array(img)
    return (time.perf_counter() - t) / 20


def _numerics(params: Params):
    """What the training stage runs on this machine's CPU (pipeline.engine.numerics)."""
    from pipeline.engine.numerics import numerics

    return numerics(params.train.amp, params.train.channels_last, torch.device("cpu"))


def _amp(params: Params):
    return _numerics(params).amp_dtype


def time_eval(
    model, data: DataPlan, params: Params, split: str, loss_fn=None, amp: bool = True
) -> float:
    """Seconds to evaluate one full-size image of `split` (prediction, loss, metrics), under
    train.amp's autocast as the training and prune stages do (`amp`), or in float32."""
    from pipeline.inference.evaluate import evaluate

    h, w = data.sizes[split]
    image = torch.randn(data.in_channels, h, w)
    # scored at the labels' full size: with preprocess.scale < 1 the logits are upsampled
    label = _labels(data.num_classes, *data.label_sizes[split])
    dataset = [(image, label)]
    classes = [str(i) for i in range(data.num_classes)]
    dtype = _amp(params) if amp else None
    times = []
    for _ in range(2):  # the first call pays once-per-process set-up (oneDNN kernels, buffers)
        t = time.perf_counter()
        evaluate(
            model, dataset, classes, params.inference, loss_fn=loss_fn,
            batch_size=params.batch_size, amp_dtype=dtype,
        )  # fmt: skip
        times.append(time.perf_counter() - t)
    return min(times)


def time_forward(model, data: DataPlan) -> float:
    """Seconds of one full-size forward, as model_stats' latency runs (no autocast there)."""
    from pipeline.inference.forward import pad_to_multiple

    h, w = data.sizes["test"]
    x, _ = pad_to_multiple(torch.randn(1, data.in_channels, h, w), model.size_multiple)
    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        model(x)
    return time.perf_counter() - t


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """INFO lines of `logger` dropped: the class weights of the timing manifest mean nothing."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)


def plan_arch(arch: str, params: Params, data: DataPlan, seconds: float) -> ArchPlan:
    from pipeline.engine.loop import Engine
    from pipeline.engine.losses import build_eval_loss, build_loss
    from pipeline.engine.optim import make_optimizer

    seed_everything(params.seed)
    manifest = _fake_manifest(data, params)
    mp = params.model(arch)
    num = _numerics(params)
    model = num.place(build_model(arch, data.in_channels, data.num_classes, **mp.model_dump()))
    deep = arch == "unetpp" and params.unetpp.deep_supervision
    with _quiet("pipeline.engine.losses"):
        loss_fn, eval_loss = (
            build_loss(params.loss, deep, manifest),
            build_eval_loss(params.loss, manifest),
        )
    engine = Engine(
        model=model,
        loss_fn=loss_fn,
        optimizer=make_optimizer(params, model, fused=num.fused),
        amp_dtype=num.amp_dtype,
        channels_last=num.channels_last,
        grad_clip=params.train.grad_clip,
    )
    b, crop = params.batch_size, params.preprocess.crop_size
    batch = (torch.randn(b, data.in_channels, crop, crop), _labels(data.num_classes, b, crop, crop))
    if params.preprocess.border_weights.enabled:  # the loss then weights every pixel
        batch += (torch.rand(b, crop, crop) + 1,)
    step = time_steps(engine, batch, seconds)
    loader = time_loader(manifest, params)
    workers = params.train.num_workers
    # workers load in parallel with the step (on other cores); without them it adds up
    step_total = max(step, loader / workers) if workers else step + loader
    evals = {
        "val": time_eval(model, data, params, "val", eval_loss),
        "test": time_eval(model, data, params, "test"),
    }
    steps = math.ceil(data.patches / b)
    return ArchPlan(arch, step_total, loader, steps, evals, time_forward(model, data))


def plan_depths(params: Params, data: DataPlan) -> dict[int, tuple[float, float]]:
    """(test image evaluation, one forward) seconds of each pruned UNet++ depth, and of the
    full model (depth 0: the prune stage exports it too)."""
    mp = params.unetpp
    model = build_model("unetpp", data.in_channels, data.num_classes, **mp.model_dump())
    out = {0: (0.0, time_forward(model, data))}
    for k in sorted(params.pruning.depths):
        sub = model.prune(k).eval()
        forward = time_forward(sub, data)  # latency: fp32, contiguous, as the prune stage's
        # the prune stage scores on the CPU with the training stage's numerics
        out[k] = (time_eval(_numerics(params).place(sub), data, params, "test"), forward)
    return out


def estimate(params: Params, seconds: float = 2.0, data: DataPlan | None = None) -> dict[str, Any]:
    """Every stage's estimated wall time in seconds, with the figures they come from; `data`
    gives the counts and sizes where no manifest has them yet (pipeline.autoconf)."""
    data = data or data_plan(params)
    mlflow = params.mlflow.enabled
    pr = params.pruning
    latency_forwards = pr.latency_runs + pr.latency_warmup + 1  # +1: the FLOP count
    stages: dict[str, float] = {}

    def fixed(stage: str) -> float:
        return START_UP[stage] + (MLFLOW[stage] if mlflow else 0.0)

    stages["download"] = fixed("download") + FILE_S * source_files(params)
    manifest = _fake_manifest(data, params)
    crop_read = time_crop_read(manifest, params)
    images = sum(data.counts.values())
    # PREPROCESS_DECODES crop decodes' worth per crop-sized piece of every full image, spread
    # over the workers
    full_px = statistics.fmean(h * w for h, w in data.label_sizes.values())
    px_ratio = full_px / params.preprocess.crop_size**2
    workers = preprocess_workers(params.preprocess.workers, images)
    stages["preprocess"] = (
        fixed("preprocess") + crop_read * PREPROCESS_DECODES * images * px_ratio / workers
    )
    archs = {}
    for arch in ("unet", "unetpp"):
        a = plan_arch(arch, params, data, seconds)
        a.compile_s = compile_seconds(arch, params, data.patches)
        step = a.step_s * (COMPILED_STEP if a.compile_s else 1.0)  # timed eager
        a.epoch_s = a.steps_per_epoch * step + data.counts["val"] * a.eval_image_s["val"]
        a.stage_s = (
            fixed("train")
            + a.compile_s
            + params.epochs * a.epoch_s
            + data.counts["test"] * a.eval_image_s["test"]
            + latency_forwards * a.latency_forward_s
        )
        archs[arch] = a
        stages[f"train_{arch}"] = a.stage_s
        log.info(
            "%s: step %.3f s (%d patches of %d px; loader %.3f s), %d steps per epoch; "
            "a full-size image %.2f s (val) %.2f s (test)",
            arch,
            a.step_s,
            params.batch_size,
            params.preprocess.crop_size,
            a.loader_s,
            a.steps_per_epoch,
            a.eval_image_s["val"],
            a.eval_image_s["test"],
        )
    depths = plan_depths(params, data)
    archs["unetpp"].depth_eval_s = {k: v[0] for k, v in depths.items() if k}
    prune = fixed("prune") + sum(
        data.counts["test"] * ev + latency_forwards * fw for k, (ev, fw) in depths.items() if k
    )
    if pr.onnx:  # the full UNet++ and every pruned depth
        prune += ONNX_IMPORT_S + sum(ONNX_MODEL_S + ONNX_FORWARDS * fw for _, fw in depths.values())
    stages["prune"] = prune
    panels = min(params.report.panels, data.counts["test"])
    stages["report"] = fixed("report") + panels * sum(
        a.eval_image_s["test"] for a in archs.values()
    )
    return {
        "data": asdict(data),
        "archs": {k: asdict(v) for k, v in archs.items()},
        "stages": {k: round(v, 1) for k, v in stages.items()},
        "total": round(sum(stages.values()), 1),
        "epochs": params.epochs,
        "threads": torch.get_num_threads(),
        "numerics": _numerics(params).describe(),
    }


def compile_seconds(arch: str, params: Params, patches: int) -> float:
    """train.compile's cost, decided as the training stage does (on the epochs' full batches);
    the compiled steps are timed eager and counted at COMPILED_STEP of that rate."""
    from pipeline.engine.numerics import CPU_COMPILE_S, compile_decision

    steps = patches // params.batch_size * params.epochs
    step_pixels = params.batch_size * params.preprocess.crop_size**2
    compiled = compile_decision(params.train.compile, arch, steps, step_pixels, _numerics(params))
    return CPU_COMPILE_S if compiled else 0.0


def format_plan(plan: dict[str, Any]) -> str:
    data = plan["data"]
    lines = [
        f"dataset {data['dataset']} ({data['source']}): {data['patches']} training patches "
        "per epoch, "
        + ", ".join(f"{data['counts'][s]} {s} images" for s in ("train", "val", "test")),
        f"{'stage':<14}{'estimate':>10}  from",
    ]
    how = {
        "download": "start-up",
        "preprocess": "start-up + reading and writing the images",
        "prune": "start-up + each depth on the test split + latency"
        + (" + ONNX" if plan.get("onnx") else ""),
        "report": "start-up + qualitative panels",
    }
    for arch, a in plan["archs"].items():
        how[f"train_{arch}"] = (
            f"{plan['epochs']} epochs x {clock(a['epoch_s'])} "
            f"({a['steps_per_epoch']} steps x {a['step_s']:.2f} s + validation) + test"
            + (f" + {a['compile_s']:.0f} s torch.compile" if a.get("compile_s") else "")
        )
    for stage, seconds in plan["stages"].items():
        lines.append(f"{stage:<14}{clock(seconds):>10}  {how[stage]}")
    lines.append(f"{'total':<14}{clock(plan['total']):>10}  on {plan['threads']} torch threads")
    if plan.get("numerics"):
        lines.append(f"numerics (train.amp, train.channels_last): {plan['numerics']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the estimates to this JSON file")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="time spent timing steps, per architecture"
    )
    args = parser.parse_args(argv)
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        raise PipelineError(f"--seconds {args.seconds}: must be a positive number of seconds")
    if args.json:
        check_output_file(args.json, "--json")  # before minutes of timing
    params = load_params()
    if params.train.device == "cuda" or (
        params.train.device == "auto" and torch.cuda.is_available()
    ):
        log.warning("the plan times the CPU; training will run on CUDA")
    plan = estimate(params, args.seconds)
    plan["onnx"] = params.pruning.onnx
    sys.stdout.write(format_plan(plan) + "\n")  # the table is this command's output
    if args.json:
        write_json(args.json, plan)


if __name__ == "__main__":
    run_cli(main)
