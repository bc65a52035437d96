"""The qualitative panels (reports/panels.png): the first `report.panels` test images predicted
by both checkpoints as evaluation predicts them (overlap-tile or whole-image, TTA, at
`preprocess.scale`), beside the labels and each model's error map."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.core import paths
from pipeline.core.config import IGNORE_INDEX, InferenceParams
from pipeline.data.loading import SplitDataset, split_dataset
from pipeline.data.manifest import Manifest
from pipeline.engine.checkpoint import load_checkpoint
from pipeline.engine.distributed import pick_device
from pipeline.inference.forward import predict
from pipeline.inference.tiling import predict_tiled
from pipeline.report import plots
from pipeline.report.palette import PALETTE
from pipeline.report.tables import ARCH_NAMES

# panel colours (RGB)
IGNORED = (70, 70, 150)  # label 255, in every panel
FALSE_POSITIVE = (235, 50, 40)
FALSE_NEGATIVE = (30, 140, 255)
WRONG = (235, 50, 40)  # multi-class: any wrong class
CORRECT = (150, 150, 150)  # legend swatch; correct pixels show the image in grey


def predict_arch(
    arch: str, dataset: SplitDataset, inference: InferenceParams, device: torch.device
) -> list[np.ndarray]:
    """(H, W) uint8 class indices per image, by the pipeline's overlap-tile prediction."""
    model, _ = load_checkpoint(paths.checkpoint(arch), device)
    out = []
    for i in range(len(dataset)):
        image = dataset[i][0][None].to(device)  # (1, C, H, W) normalised
        logits = predict_tiled(
            model,
            image,
            inference.tile_size,
            inference.tile_overlap,
            model.size_multiple,
            inference.blend,
            tta=inference.tta,
        )
        size = dataset.read(i)[1].shape  # (H, W): larger than the image under preprocess.scale
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        out.append(predict(logits)[0].cpu().numpy().astype(np.uint8))
    return out


def label_colours(num_classes: int) -> np.ndarray:
    """(256, 3) uint8: binary tasks white on black, else pipeline.predict's palette; ignored
    pixels in IGNORED."""
    colours = PALETTE.copy()
    if num_classes == 2:
        colours[:2] = [(0, 0, 0), (255, 255, 255)]
    colours[IGNORE_INDEX] = IGNORED
    return colours


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image in grey, squeezed into 70..197 so colours stand out on it."""
    return np.repeat((70 + image.mean(axis=2) / 2).astype(np.uint8)[..., None], 3, axis=2)


def error_map(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, binary: bool) -> np.ndarray:
    """(H, W, 3) uint8: correct pixels show the image in grey; binary tasks colour false
    positives and false negatives, multi-class tasks any wrong class; ignored pixels IGNORED."""
    out = grey(image)
    valid = truth != IGNORE_INDEX
    if binary:
        out[valid & (pred == 1) & (truth == 0)] = FALSE_POSITIVE
        out[valid & (pred == 0) & (truth == 1)] = FALSE_NEGATIVE
    else:
        out[valid & (pred != truth)] = WRONG
    out[~valid] = IGNORED
    return out


def panel_rows(
    dataset: SplitDataset, predictions: dict[str, list[np.ndarray]], num_classes: int
) -> list[list[np.ndarray]]:
    """Per image: image | truth | each model's prediction | each model's errors (RGB)."""
    colours = label_colours(num_classes)
    rows = []
    for i in range(len(dataset)):
        image, truth = dataset.read(i)  # (H, W, C), (H', W')
        rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
        if rgb.shape[:2] != truth.shape:  # preprocess.scale: shown at the labels' size
            size = (truth.shape[1], truth.shape[0])
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        preds = [p[i] for p in predictions.values()]
        errors = [error_map(rgb, truth, p, num_classes == 2) for p in preds]
        rows.append([rgb, colours[truth], *(colours[p] for p in preds), *errors])
    return rows


def panel_legends(class_names: list[str]) -> list[plots.Legend]:
    """(title, swatches) for the label maps and for the error maps."""
    colours = label_colours(len(class_names))
    ignored = (f"ignored ({IGNORE_INDEX})", IGNORED)
    classes = [(name, tuple(int(v) for v in colours[i])) for i, name in enumerate(class_names)]
    if len(class_names) == 2:
        errors = [
            (f"false positive (extra {class_names[1]})", FALSE_POSITIVE),
            (f"false negative (missed {class_names[1]})", FALSE_NEGATIVE),
        ]
    else:
        errors = [("wrong class", WRONG)]
    return [
        ("ground truth and predictions", [*classes, ignored]),
        ("errors", [("correct (image in grey)", CORRECT), *errors, ignored]),
    ]


def panels_figure(
    manifest: Manifest, n: int, inference: InferenceParams
) -> tuple[list[list[np.ndarray]], list[str]]:
    """(panel rows, their image names) for the first n test images; runs both checkpoints,
    so a missing or corrupt one stops the stage before anything is written."""
    stems = manifest.splits["test"][:n]
    dataset = split_dataset(manifest, "test", limit=n)  # normalised as for evaluation
    device = pick_device("auto")
    predictions = {
        name: predict_arch(arch, dataset, inference, device) for arch, name in ARCH_NAMES.items()
    }
    return panel_rows(dataset, predictions, manifest.num_classes), stems


def write_panels(rows: list, stems: list[str], class_names: list[str], dpi: int) -> None:
    if not rows:  # report.panels: 0; the file is still a stage output
        plots.note("report.panels is 0: no qualitative panels", paths.PANELS_PNG, dpi)
        return
    names = list(ARCH_NAMES.values())
    titles = ["image", "ground truth", *(f"{n} prediction" for n in names)]
    titles += [f"{n} errors" for n in names]
    plots.image_grid(rows, paths.PANELS_PNG, titles, stems, panel_legends(class_names), dpi)
