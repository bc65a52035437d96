"""Stage `prune`: UNet++ cut to each deep-supervision depth L1..Lk and scored on the test split.

Each depth runs as a standalone sub-network (`UNetPlusPlus.prune(k)`) holding only the nodes
head k needs, so its parameters, FLOPs and latency are those of the pruned model itself.
Writes reports/pruning.csv and reports/pruning.json.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import torch

from pipeline.core import paths
from pipeline.core.common import PipelineError, atomic_path, sha256_file, timed, write_json
from pipeline.core.config import Params
from pipeline.data.loading import split_dataset
from pipeline.data.manifest import load_manifest
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.numerics import numerics
from pipeline.inference.evaluate import evaluate
from pipeline.inference.stats import image_shape, model_stats
from pipeline.stages import lifecycle
from pipeline.tracking.dvc import declared
from pipeline.tracking.registry import CHECKPOINT_TAG
from pipeline.tracking.runs import log_to_parent, mlflow_run

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("miou", "dice", "params", "gflops", "latency_ms")


def best_depth(rows: list[dict[str, Any]], metric: str, tolerance: float) -> int:
    """The shallowest depth whose quality is within `tolerance` of the deepest one evaluated."""
    deepest = max(rows, key=lambda r: r["depth"])[metric]
    ok = [r["depth"] for r in rows if r[metric] >= deepest - tolerance]
    return min(ok)


def export_all(model, depths: list[int], in_channels: int, size, enabled: bool = True) -> None:
    """models/onnx/: the full UNet++ and each pruned depth, replaced as a whole (a DVC output:
    with pruning.onnx off it holds only a note, so no stale export outlives its params)."""
    with atomic_path(paths.ONNX) as tmp:
        tmp.mkdir()
        if not enabled:
            (tmp / "README.txt").write_text("pruning.onnx is false: nothing exported\n")
            return
        from pipeline.export import export_onnx  # onnx/onnxruntime imports take seconds

        export_onnx(model, tmp / "unetpp.onnx", in_channels, size)
        for k in sorted(depths):
            export_onnx(model.prune(k), tmp / f"unetpp_L{k}.onnx", in_channels, size)
    log.info("exported UNet++ and L%s to %s", sorted(depths), paths.ONNX.relative_to(paths.ROOT))


def prune(params: Params) -> pd.DataFrame:
    pp = params.pruning
    device = torch.device("cpu")  # latency on the CPU, the reference deployment target here
    model, ckpt = load_checkpoint(paths.checkpoint("unetpp"), device)
    missing = [k for k in pp.depths if k not in model.head_depths]
    if missing:
        raise PipelineError(
            f"pruning.depths: no head at depth {missing} in {paths.checkpoint('unetpp')} "
            f"(heads {model.head_depths}; train with unetpp.deep_supervision: true)"
        )
    manifest = load_manifest()
    test_ds = split_dataset(manifest, "test")
    multiple = model.size_multiple
    shape = image_shape(test_ds, multiple)  # (1, C, H, W): one full-size test image

    # scored with the training stage's numerics (train.amp, channels_last), as its test split
    # was: the deepest depth then reproduces UNet++'s own test metrics; latency stays fp32
    num = numerics(params.train.amp, params.train.channels_last, device)
    rows = []
    for k in sorted(pp.depths):
        sub = model.prune(k).eval()
        stats = model_stats(sub, shape, pp.latency_runs, pp.latency_warmup)
        quality = evaluate(
            num.place(sub),  # latency above on the contiguous model, the scores as trained
            test_ds,
            manifest.class_names,
            params.inference,
            batch_size=params.batch_size,
            amp_dtype=num.amp_dtype,
            multiple=multiple,  # the full UNet++'s padding, for every depth
        )
        row = {"depth": k, **stats, **quality}
        log.info(
            "L%d: %s params, %.3f GFLOPs, %.2f ms, miou %.4f, dice %.4f",
            k,
            f"{row['params']:,}",
            row["gflops"],
            row["latency_ms"],
            row["miou"],
            row["dice"],
        )
        rows.append(row)

    export_all(model, pp.depths, manifest.in_channels, shape[-2:], pp.onnx)

    df = pd.DataFrame(rows)
    with atomic_path(paths.PRUNING_CSV) as tmp:
        df.to_csv(tmp, index=False)
    best = best_depth(rows, "miou", pp.tolerance)
    # the headline figures per depth for `dvc metrics/exp show`; pruning.csv has them all
    summary = {f"L{r['depth']}": {k: r[k] for k in SUMMARY_KEYS} for r in rows}
    summary["best_depth"] = best
    write_json(paths.PRUNING_JSON, summary)
    log.info("best depth within %.3f mIoU of L%d: L%d", pp.tolerance, max(pp.depths), best)

    used = declared("prune", params)
    with (
        timed("tracking"),
        mlflow_run(params, "prune", "prune", used=used, consumes="data/processed") as run,
    ):
        run.set_tags({"unetpp_checkpoint_epoch": ckpt.get("best_epoch")})
        keys = (
            "miou",
            "dice",
            "global_accuracy",
            "mean_accuracy",
            "gflops",
            "latency_ms",
            "params",
        )
        for r in rows:
            run.log_metrics({k: r[k] for k in keys}, step=r["depth"])
        run.log_metric("best_depth", best)
        miou = {f"unetpp_L{r['depth']}_miou": r["miou"] for r in rows}
        log_to_parent(run, {"best_depth": best, **miou})
        run.log_artifact(paths.PRUNING_CSV)
        run.log_artifact(paths.PRUNING_JSON)
        if run:
            _log_segmenters(run, sorted(pp.depths) if pp.onnx else [best])
    return df


def _log_segmenters(run, depths: list[int]) -> None:
    """The pruned UNet++ as segmentation pyfunc models `segmenter_L<k>`: the best depth, and
    every depth when they are exported (pruning.onnx); tagged with the checkpoint they cut."""
    from pipeline.serving.pyfunc import log_segmenter  # mlflow.pyfunc: only when tracking

    checkpoint = paths.checkpoint("unetpp")
    run.set_tags({CHECKPOINT_TAG: sha256_file(checkpoint)})
    for k in depths:
        uri = log_segmenter(checkpoint, paths.EXAMPLE_IMAGE, depth=k, name=f"segmenter_L{k}")
        log.info("UNet++ L%d segmenter logged as %s", k, uri)


main = lifecycle.stage_main("prune", prune, __doc__)

if __name__ == "__main__":
    lifecycle.run(main)
