"""Stages `train_unet` and `train_unetpp`: `python -m pipeline.train {unet,unetpp}`.

Trains on the preprocessed crops, validates on the full-size val images every epoch, keeps the
best epoch by `train.monitor`, then scores it on the test split. Writes models/<arch>.pt,
reports/<arch>/{epochs.csv, epochs.xlsx, curves.png, metrics.json} and one MLflow run.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import paths, plots
from pipeline.checkpoint import save_checkpoint
from pipeline.common import PipelineError, atomic_path, run_cli, seed_everything, write_json
from pipeline.config import Params, flatten, load_params
from pipeline.data import crops_dataset, eval_loader, load_manifest, split_dataset
from pipeline.inference import evaluate, pad_to_multiple
from pipeline.losses import CEDiceLoss, DeepSupervisionLoss
from pipeline.models import REGISTRY, build_model
from pipeline.stats import count_params, model_stats
from pipeline.tracking import mlflow_run

log = logging.getLogger(__name__)

ARCHS = tuple(sorted(REGISTRY))  # one training stage per registered architecture


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device: 'cuda' requested but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def make_optimizer(params: Params, model: torch.nn.Module) -> torch.optim.Optimizer:
    opt, wd = params.train.optimizer, params.train.weight_decay
    if opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=params.lr, momentum=0.9, weight_decay=wd)
    cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=params.lr, weight_decay=wd)


def write_epoch_log(rows: list[dict[str, Any]], arch: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    out = paths.arch_reports(arch)
    with atomic_path(out / "epochs.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / "epochs.xlsx") as tmp:
        df.to_excel(tmp, index=False, sheet_name=f"{arch} epochs", engine="openpyxl")
    return df


def is_better(monitor: str, value: float, best: float | None) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best if monitor == "val_loss" else value > best


def train_epoch(model, loader, loss_fn, optimizer, device: torch.device, desc: str) -> float:
    """One pass over the training crops; returns the mean loss per image."""
    model.train()
    loss_sum, n_seen = 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=None)  # quiet if no TTY
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        loss = loss_fn(model(images), labels)
        if not torch.isfinite(loss):
            raise PipelineError(
                f"{desc}: loss became {loss.item()}; try a lower lr. "
                "Earlier outputs are left untouched."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(images)
        n_seen += len(images)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss_sum / n_seen


def stats_shape(loader: DataLoader, multiple: int) -> tuple[int, ...]:
    """(1, C, H, W) of the first image of `loader`'s dataset, mirror-padded as for inference."""
    padded, _ = pad_to_multiple(loader.dataset[0][0][None], multiple)
    return (1, *padded.shape[1:])


def train(arch: str, params: Params) -> dict[str, Any]:
    if arch not in ARCHS:
        raise PipelineError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    manifest = load_manifest()
    device = pick_device(params.train.device)
    seed_everything(params.seed)

    mp = params.model(arch)
    options = mp.model_dump()
    model = build_model(arch, manifest["in_channels"], manifest["num_classes"], **options).to(
        device
    )
    multiple = model.size_multiple  # full images are mirror-padded to this for the forward
    n_params = count_params(model)
    log.info(
        "%s: %s parameters, channels %s, device %s", arch, f"{n_params:,}", mp.channels, device
    )

    train_ds = crops_dataset(manifest, params.train.augment, params.seed)
    loader = DataLoader(
        train_ds,
        batch_size=params.batch_size,
        shuffle=True,
        num_workers=params.train.num_workers,
        generator=torch.Generator().manual_seed(params.seed),
        pin_memory=device.type == "cuda",
    )
    val_loader = eval_loader(split_dataset(manifest, "val"), params.batch_size)
    test_loader = eval_loader(split_dataset(manifest, "test"), params.batch_size)

    base_loss = CEDiceLoss(params.loss.ce_weight, params.loss.dice_weight, manifest["ignore_index"])
    deep = arch == "unetpp" and params.unetpp.deep_supervision
    loss_fn = DeepSupervisionLoss(base_loss, params.loss.ds_weights) if deep else base_loss
    optimizer = make_optimizer(params, model)
    classes = manifest["class_names"]
    monitor = params.train.monitor

    stage_params = {
        "seed": params.seed,
        "lr": params.lr,
        "epochs": params.epochs,
        "batch_size": params.batch_size,
        arch: options,
        "loss": params.loss.model_dump(include=None if deep else {"ce_weight", "dice_weight"}),
        "train": params.train,
    }
    rows: list[dict[str, Any]] = []
    best, best_state, best_row = None, None, None
    t_start = time.perf_counter()
    with mlflow_run(params, f"train_{arch}", arch) as run:
        if run:
            import mlflow

            mlflow.log_params(flatten(stage_params))
            mlflow.set_tags({"arch": arch, "dataset": manifest["dataset"]})
        for epoch in range(1, params.epochs + 1):
            t0 = time.perf_counter()
            desc = f"{arch} epoch {epoch}/{params.epochs}"
            train_loss = train_epoch(model, loader, loss_fn, optimizer, device, desc)
            val = evaluate(
                model, val_loader, manifest["num_classes"], classes, device, multiple, base_loss
            )
            row = {
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                **{f"val_{k}": v for k, v in val.items()},
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            if is_better(monitor, row[monitor], best):
                best, best_row = row[monitor], row
                best_state = copy.deepcopy(model.state_dict())
            log.info(
                "%s epoch %d/%d: train_loss %.4f val_loss %.4f val_miou %.4f val_dice %.4f (%.1fs)",
                arch,
                epoch,
                params.epochs,
                row["train_loss"],
                row["val_loss"],
                row["val_miou"],
                row["val_dice"],
                row["seconds"],
            )
            if run:
                mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        train_seconds = time.perf_counter() - t_start

        if best_state is None:
            raise PipelineError(f"{arch}: {monitor} was NaN at every epoch; nothing to keep")
        model.load_state_dict(best_state)
        lat = params.pruning  # latency_runs / latency_warmup: one setting for every model
        test = evaluate(model, test_loader, manifest["num_classes"], classes, device, multiple)
        metrics = {
            **test,
            "best_epoch": best_row["epoch"],
            f"best_{monitor}": best,
            "train_seconds": round(train_seconds, 2),
            # params, GFLOPs and latency on one full-size test image, on the training device
            **model_stats(
                model, stats_shape(test_loader, multiple), lat.latency_runs, lat.latency_warmup
            ),
        }
        log.info(
            "%s test: miou %.4f dice %.4f global_accuracy %.4f (best epoch %d)",
            arch,
            test["miou"],
            test["dice"],
            test["global_accuracy"],
            best_row["epoch"],
        )

        # every output is written only now, so a failed run leaves the previous ones intact
        df = write_epoch_log(rows, arch)
        out = paths.arch_reports(arch)
        curve_metric = "val_miou" if monitor == "val_loss" else monitor
        plots.learning_curves({arch: df}, out / "curves.png", curve_metric)
        save_checkpoint(
            paths.checkpoint(arch),
            model,
            arch=arch,
            model_config={
                "in_channels": manifest["in_channels"],
                "num_classes": manifest["num_classes"],
                "options": options,
            },
            params=params.model_dump(),
            metrics=metrics,
            best_epoch=best_row["epoch"],
            data={
                k: manifest[k] for k in ("dataset", "class_names", "mean", "std", "ignore_index")
            },
        )
        write_json(out / "metrics.json", metrics)
        if run:
            numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            mlflow.log_metrics({f"test_{k}": v for k, v in numbers.items()})
            for f in ("epochs.csv", "epochs.xlsx", "curves.png", "metrics.json"):
                mlflow.log_artifact(str(out / f), artifact_path="reports")
            mlflow.log_artifact(str(paths.checkpoint(arch)), artifact_path="model")
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", help=f"one of: {', '.join(ARCHS)}")
    args = parser.parse_args(argv)
    train(args.arch, load_params())


if __name__ == "__main__":
    run_cli(main)
