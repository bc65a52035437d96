"""The written rules: a fingerprint (pipeline.autoconf.fingerprint) -> the recipe's params.

Every rule gives its reason in the recipe (params.yaml's `autoconf.reasons`, the report):

- **scale** (`preprocess.scale`): the images are shrunk, by 0.75 or 0.5, while the typical
  structure stays at least MIN_WIDTH px wide: a 4-level UNet pools 16x, and a structure
  thinner than that is lost by the third level; a smaller image costs less per pass, so the
  budget buys more passes and the models see more context. Never with touching objects: the
  one- or two-pixel gaps between them would close. Vessels (2 px) stay at full size; street
  scenes (22 px) and polyps (50 px) go to half size.
- **crop** (`preprocess.crop_size`): twice the size of the object the typical pixel lies in
  (context around the whole object), a multiple of 16 in [MIN_CROP, MAX_CROP], and no larger
  than the scaled image; lines (vessels) take MIN_CROP: their context is local. A crop costs
  the same per pixel at any size on a CPU, so larger crops are only fewer patches.
- **patches per epoch**: COVERAGE times the training pixels over the crop's (every pixel in
  ~3 random windows an epoch); epochs then fill the budget (pipeline.autoconf.budget).
- **batch** 8: on a CPU the step costs the same per pixel as 16 of a smaller crop, and more
  steps per epoch suit the short schedules a budget allows.
- **widths**: base 16 for both models (the presets' widths) while the budget buys at least
  MIN_PASSES passes over the training pixels; else UNet++ base 8, then both, whichever buys
  the most passes as timed on this machine (narrow convolutions can leave a CPU's cores idle:
  base 8 is not always faster). Same data and epochs for both: they stay comparable.
- **CLAHE** 2.0 for thin (<= THIN px), faint (contrast < FAINT background stds) structures: it
  brings out the thin vessels of fundus images (UNet F1 +0.4 points on DRIVE); off otherwise.
- **augmentation**: `scene` (horizontal flips, zoom, light) when the images have an up (class
  layout differs top to bottom: sky, road); `dihedral` (all flips and 90-degree rotations)
  for fields without one (vessels, cells, tissue, endoscopy).
- **imbalance**: CE + Dice always (Dice counts the rare class as much as the common one);
  a binary foreground under RARE of the pixels also gets a third of the patches centred on it
  (nnU-Net's oversampling); multi-class data whose rarest class has under 1/RARE_RATIO of the
  commonest's pixels get CE weights sqrt(median freq / freq) (full median-frequency weights
  over-paint rare classes in short schedules: CamVid, 7dca65b).
- **border weights** (the U-Net paper's) for touching blob objects (TOUCHING of them within
  two pixels of a neighbour), sigma a sixth of their diameter (2..10 px).
- **validation**: under FEW training + validation images, one image validates and the
  monitor is the last epoch (a few images cannot rank epochs; every image is worth training
  on); otherwise the best epoch by val_dice (binary) or val_miou.
- **inference**: whole images up to WHOLE_PIXELS (no seams), else tiles of 512 px with 64 of
  overlap; test-time horizontal flips (hflip) while evaluation, pruning and the report take
  at most EVAL_SHARE of the budget (the budget arithmetic turns it off otherwise).
- **optimiser**: Adam, lr 0.002 at batch 8, cosine to 0 after half an epoch of warm-up (the
  schedule both presets measured as the steadiest over seeds); bf16 and compile `auto`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.autoconf.fingerprint import Fingerprint

MIN_WIDTH = 8.0  # px a structure keeps after downscaling
SCALES = (1.0, 0.75, 0.5)
MIN_CROP, MAX_CROP = 96, 192
COVERAGE = 3.0  # random windows covering each training pixel per epoch
MIN_PASSES = 20  # passes over the training pixels worth keeping full widths for
THIN, FAINT = 4.0, 0.5
RARE, RARE_RATIO = 0.05, 20.0
TOUCHING = 0.1
FEW = 40
WHOLE_PIXELS = 1_100_000
EVAL_SHARE = 0.25
UP = 0.2  # top/bottom layout difference beyond left/right that marks an up
WIDTHS = ((16, 16), (16, 8), (8, 8))  # (UNet, UNet++) base channels, widest first


@dataclass
class Recipe:
    """The chosen params (a params.yaml overlay) and one reason per choice."""

    overlay: dict[str, Any] = field(default_factory=dict)
    why: dict[str, str] = field(default_factory=dict)  # dotted key -> reason, in order set

    def set(self, key: str, value: Any, why: str) -> None:
        node = self.overlay
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        self.why.pop(key, None)
        self.why[key] = why

    @property
    def reasons(self) -> list[str]:
        """ "key: why" lines, as params.yaml keeps them (the value is the param's own)."""
        return [f"{key}: {why}" for key, why in self.why.items()]

    def shown(self) -> list[str]:
        """ "key value: why" lines, for people."""
        out = []
        for key, why in self.why.items():
            value = self.get(key)
            value = round(value, 4) if isinstance(value, float) else value
            out.append(f"{key} {'null' if value is None else value}: {why}")
        return out

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.overlay
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def scales(fp: Fingerprint) -> list[float]:
    """The scales the structures allow, largest first (the rule for `preprocess.scale`)."""
    width = fp.thickness()
    if fp.blobs() and fp.touching >= TOUCHING:
        return [1.0]
    if not math.isfinite(width):
        return [1.0]
    return [s for s in SCALES if s == 1.0 or width * s >= MIN_WIDTH]


def scale_reason(fp: Fingerprint, scale: float) -> str:
    width = fp.thickness()
    if fp.blobs() and fp.touching >= TOUCHING:
        return "touching objects: downscaling would close the gaps between them"
    if scale == 1.0:
        return f"structures {width:.0f} px wide: shrinking would take them under {MIN_WIDTH:.0f} px"
    return (
        f"structures {width:.0f} px wide stay {width * scale:.0f} px at this scale (>= "
        f"{MIN_WIDTH:.0f}), and each pass costs {scale**2:.2f}x the full size's"
    )


def crop_size(fp: Fingerprint, scale: float) -> tuple[int, str]:
    h, w = (round(n * scale) for n in fp.min_size)
    fits = max(16, min(h, w) // 16 * 16)
    diameter = fp.diameter() * scale
    lines = fp.binary and not fp.blobs()
    if lines or not math.isfinite(diameter):
        crop = MIN_CROP
        why = "thin lines: their context is local"
    else:
        crop = min(MAX_CROP, max(MIN_CROP, math.ceil(2 * diameter / 16) * 16))
        why = f"twice the {diameter:.0f} px objects, a multiple of 16 in [{MIN_CROP}, {MAX_CROP}]"
    if crop > fits:
        crop, why = fits, f"the smallest image ({w}x{h} px at scale {scale}) bounds it"
    return crop, why


def patches_per_epoch(fp: Fingerprint, scale: float, crop: int, train: int) -> int:
    h, w = fp.size
    pixels = train * h * w * scale**2
    return max(1, math.ceil(COVERAGE * pixels / crop**2))


def passes(fp: Fingerprint, r: Recipe, train: int, epochs: int) -> float:
    """Passes over the (scaled) training pixels that `epochs` of the recipe's patches make."""
    h, w = fp.size
    scale, crop = r.get("preprocess.scale"), r.get("preprocess.crop_size")
    patches = r.get("preprocess.patches_per_epoch")
    return epochs * patches * crop**2 / (train * h * w * scale**2)


def structure(fp: Fingerprint, dataset: str) -> tuple[Recipe, dict[str, int]]:
    """Every choice but the widths and epochs (the budget arithmetic's), and the split sizes
    it leads to. `dataset`: dataset.name, "folder" only for a seeded fractions split."""
    r = Recipe()
    scale = min(scales(fp))
    r.set("preprocess.scale", scale, scale_reason(fp, scale))
    crop, why = crop_size(fp, scale)
    r.set("preprocess.crop_size", crop, why)
    r.set("preprocess.sampling", "random", "new windows every epoch generalise better")
    r.set("preprocess.crop_stride", crop // 2, "half the crop (the grid of random windows)")
    counts = _validation(r, fp, dataset)
    patches = patches_per_epoch(fp, scale, crop, counts["train"])
    r.set(
        "preprocess.patches_per_epoch",
        patches,
        f"each training pixel in ~{COVERAGE:.0f} windows an epoch",
    )
    r.set("batch_size", 8, "on a CPU 8 crops cost the same per pixel as 16 smaller ones")
    _contrast(r, fp, scale)
    _layout(r, fp)
    _imbalance(r, fp)
    _touching(r, fp, scale)
    _inference(r, fp, scale)
    _schedule(r)
    return r, counts


def _contrast(r: Recipe, fp: Fingerprint, scale: float) -> None:
    width = fp.thickness() * scale
    faint = fp.binary and math.isfinite(fp.contrast) and fp.contrast < FAINT
    if faint and width <= THIN:
        r.set(
            "preprocess.clahe",
            2.0,
            f"thin ({width:.0f} px), faint ({fp.contrast:.2f} std) structures",
        )
    else:
        r.set("preprocess.clahe", 0.0, "the structures are neither thin nor faint")


def _layout(r: Recipe, fp: Fingerprint) -> None:
    if fp.up >= UP:
        r.set("train.augment", "scene", f"the class layout has an up (top/bottom {fp.up:.2f})")
    else:
        r.set(
            "train.augment",
            "dihedral",
            f"no up (top/bottom {fp.up:.2f}): any flip or rotation is a real view",
        )


def _imbalance(r: Recipe, fp: Fingerprint) -> None:
    r.set("loss.ce_weight", 1.0, "cross-entropy keeps the probabilities calibrated")
    r.set("loss.dice_weight", 1.0, "Dice weighs every class alike, as the scores do")
    r.set("loss.focal_weight", 0.0, "CE + Dice suffice")
    rarest = min(c.frequency for c in fp.classes)
    commonest = max(c.frequency for c in fp.classes)
    if fp.binary:
        r.set("loss.class_weights", None, "binary: Dice balances the classes")
        if fp.foreground < RARE:
            why = f"the foreground is {fp.foreground:.1%} of the pixels: a third of the crops on it"
            r.set("preprocess.foreground", 0.33, why)
        else:
            r.set(
                "preprocess.foreground",
                0.0,
                f"a {fp.foreground:.1%} foreground lies in most windows",
            )
        return
    r.set("preprocess.foreground", 0.0, "windows anywhere")
    if rarest * RARE_RATIO < commonest:
        why = f"the rarest class has {rarest / commonest:.1%} of the commonest's pixels"
        r.set("loss.class_weights", "sqrt_median_frequency", why)
    else:
        r.set("loss.class_weights", None, "the classes are balanced enough")


def _touching(r: Recipe, fp: Fingerprint, scale: float) -> None:
    on = fp.blobs() and fp.touching >= TOUCHING
    sigma = float(round(min(10.0, max(2.0, fp.diameter() * scale / 6)))) if on else 5.0
    why = (
        f"{fp.touching:.0%} of the objects touch a neighbour: weight the gaps between them"
        if on
        else "the objects do not touch"
    )
    r.set("preprocess.border_weights.enabled", on, why)
    if on:
        r.set("preprocess.border_weights.sigma", sigma, "a sixth of the objects' diameter")


def _validation(r: Recipe, fp: Fingerprint, dataset: str) -> dict[str, int]:
    """The validation split and the monitor; returns the split sizes that follow."""
    counts = dict(fp.counts)
    pool = counts["train"] + counts["val"]  # the images validation is drawn from
    few = pool < FEW
    if few and dataset in ("drive", "folder"):
        why = f"{pool} training + validation images: every one is worth training on"
        if dataset == "drive":
            r.set("dataset.val_count", 1, why)
        else:  # round(n * fraction) = 1 validation image, the test split unchanged
            total = sum(counts.values())
            r.set("dataset.folder.val_fraction", round(1 / total + 1e-4, 4), why)
        counts.update(train=pool - 1, val=1)
        r.set("train.monitor", "last", "one validation image cannot rank epochs: the last one")
    else:
        monitor = "val_dice" if fp.binary else "val_miou"
        r.set("train.monitor", monitor, "the best epoch on the validation split")
    return counts


def _inference(r: Recipe, fp: Fingerprint, scale: float) -> None:
    h, w = fp.max_size
    if h * w * scale**2 <= WHOLE_PIXELS:
        r.set("inference.tile_size", 0, "whole images: no seams")
    else:
        r.set("inference.tile_size", 512, "large images: tiles")
        r.set("inference.tile_overlap", 64, "tiles overlap by 64 px")
    r.set("inference.tta", "hflip", "mirrored predictions averaged (x2 the evaluation)")


def _schedule(r: Recipe) -> None:
    r.set("train.optimizer", "adam", "Adam")
    r.set("lr", 0.002, "Adam at batch 8")
    r.set("train.scheduler", "cosine", "cosine to 0: the steadiest over seeds")
    r.set("train.warmup_epochs", 0.5, "half an epoch of warm-up")
    r.set("train.min_lr", 0.0, "cosine to 0")
    r.set("train.amp", "auto", "bf16 where the CPU has it")
    r.set("train.compile", "auto", "compiled where it repays")
    r.set("unet.encoder", "none", "from scratch (offline)")
    r.set("unetpp.encoder", "none", "from scratch (offline)")
    r.set("unetpp.deep_supervision", True, "a head per depth: pruning needs them")
    r.set("pruning.latency_runs", 5, "5 full-size forwards give a stable median")
    r.set("pruning.latency_warmup", 1, "one warm-up")
    r.set("pruning.onnx", False, "exports cost minutes; pipeline.export does one")
