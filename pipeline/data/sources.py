"""Raw dataset layouts, read into labelled samples per split.

Each reader knows one layout under data/raw/<name>/ and yields, for every image, a uint8 image
and a uint8 label of class indices with 255 = ignore:

- synthetic / drive: the vessel tracing and the field-of-view mask merge into 1 vessel,
  0 background, 255 outside the FOV. DRIVE keeps its 20 test images as the test split (with the
  second observer's tracing as a reference) and draws `dataset.val_count` validation images from
  its 20 training images (seeded by `dataset.seed`, as every split here).
- camvid: the SegNet 11-class layout; class 11 (void) becomes 255.
- folder: your own images and labels, mapped through `dataset.folder.mapping`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core import paths
from pipeline.core.common import PipelineError
from pipeline.core.config import IGNORE_INDEX, Params

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")
SPLITS = ("train", "val", "test")
VESSEL_CLASSES = ["background", "vessel"]
CAMVID_CLASSES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
CAMVID_MAPPING = {**{c: c for c in range(len(CAMVID_CLASSES))}, 11: IGNORE_INDEX}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}

# the folder each reader's layout is recognised by, inside an archive or folder (download)
ROOT_MARKERS: dict[str, Callable[[Params], str]] = {
    "drive": lambda p: "training/images",
    "camvid": lambda p: "trainannot",
    "folder": lambda p: p.dataset.folder.images,
}
# what to change when the marker is missing
ROOT_HINTS = {
    "drive": "is it DRIVE (dataset.name, dataset.source)?",
    "camvid": "is it CamVid in the SegNet layout (dataset.name, dataset.source)?",
    "folder": "set dataset.folder.images and dataset.folder.labels to the folders that hold "
    "your images and labels",
}


# --- reading files -------------------------------------------------------------------------


# 8-bit modes PIL converts faithfully; 16-bit and float ones are scaled here by their range
EIGHT_BIT = {"1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


# PIL's own guard against decompression bombs (a warning above Image.MAX_IMAGE_PIXELS, an
# exception above twice that: a traceback) is replaced, process-wide, by one check against
# dataset.max_image_pixels on the header, before any pixel is decoded (`open_image`). The
# default is PIL's exception threshold: what PIL read before is read as it was.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
Image.MAX_IMAGE_PIXELS = None


@contextlib.contextmanager
def open_image(
    path: Path | IO[bytes],
    who: object,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit: str = "dataset.max_image_pixels",
) -> Iterator[Image.Image]:
    """Image.open(path), refused in one line naming `who` if it has more than `max_pixels`
    pixels (0 = no limit); `limit` names the setting that raises it."""
    with Image.open(path) as img:
        pixels = img.width * img.height
        if max_pixels and pixels > max_pixels:
            raise PipelineError(
                f"{who}: {img.width}x{img.height} image ({pixels:,} pixels) is over {limit} "
                f"({max_pixels:,}), refused before decoding (a decompression bomb?); raise "
                f"{limit} (0 = no limit) if the image is genuine"
            )
        yield img


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: a camera's EXIF orientation tag applied (a phone photo is
    stored sideways with a tag saying so), the orientation its label was drawn on."""
    from PIL import ImageOps

    if img.getexif().get(0x0112, 1) == 1:  # Orientation: 1 = as stored
        return img
    return ImageOps.exif_transpose(img)


def read_image(
    path: Path | IO[bytes],
    mode: str,
    bit_depth: int = 0,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    limit: str = "dataset.max_image_pixels",
) -> np.ndarray:
    """Read an image file as a uint8 array in PIL `mode` ("RGB" or "L"); one-line error if bad.

    8-bit images as they are. 16-bit greyscale (microscopy TIFFs, PNGs) is scaled by its
    range, 2**bit_depth - 1 (bit_depth 0: the file's 16 bits; 12 for 12-bit data stored in
    16-bit files), and float images must hold values in [0, 1]: never clipped to 255, which
    PIL's convert("L") would do. Other modes (32-bit integers) are an error. `path` may be an
    open binary file (bytes sent to a served model); errors name it `name` then. An image of
    more than `max_pixels` pixels (dataset.max_image_pixels; 0 = no limit) is refused unread."""
    who = path if name is None else name
    try:
        with open_image(path, who, max_pixels, limit) as img:
            img.load()
            if getattr(img, "n_frames", 1) > 1:  # a stack would silently lose all but one
                raise PipelineError(
                    f"{who}: {img.n_frames} frames (a stack or an animation); give one "
                    "image per file"
                )
            img = upright(img)
            if img.mode in EIGHT_BIT:
                return np.array(img.convert(mode))  # writable copy
            arr = np.array(img)
    except FileNotFoundError:
        raise PipelineError(f"{who}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{who}: unreadable or corrupt image ({exc})") from None
    if img.mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        sixteen = True  # how some PIL versions open 16-bit PNGs
    else:
        sixteen = img.mode in SIXTEEN_BIT
    if sixteen:
        top = 2 ** (bit_depth or 16) - 1
        peak = int(arr.max())
        if peak > top:
            raise PipelineError(
                f"{who}: 16-bit values up to {peak} exceed dataset.folder.bit_depth "
                f"{bit_depth} (max {top}); set it to {int(peak).bit_length()} or 0 (16 bits)"
            )
        if not bit_depth and 0 < peak < 2**12:
            log.warning(
                "%s: 16-bit image with values up to %d only: if the data are %d-bit, set "
                "dataset.folder.bit_depth: %d (read as 16-bit, it is nearly black)",
                who,
                peak,
                peak.bit_length(),
                peak.bit_length(),
            )
        scaled = arr.astype(np.float64) * (255.0 / top)
    elif img.mode == "F":
        finite = np.isfinite(arr)
        low, high = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0, 0)
        if not finite.all() or low < 0 or high > 1:
            raise PipelineError(
                f"{who}: float image with values in [{low:g}, {high:g}]"
                + ("" if finite.all() else " and NaN/inf")
                + ": float images must hold intensities in [0, 1]"
            )
        scaled = arr.astype(np.float64) * 255.0
    else:
        raise PipelineError(
            f"{who}: image mode {img.mode} is not supported (8-bit, 16-bit greyscale and "
            "float greyscale in [0, 1] are); convert the file"
        )
    grey = np.rint(scaled).astype(np.uint8)  # (H, W)
    return np.repeat(grey[..., None], 3, axis=2) if mode == "RGB" else grey


def equalize(image: np.ndarray, clip: float) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (CLAHE, 8x8 tiles, `clip` limit) of a
    uint8 image: on the lightness (CIELAB L) of an RGB image, on the grey values of a grey one.
    `clip` 0 returns the image unchanged. Applied in preprocess and, from the checkpoint, in
    pipeline.predict."""
    if not clip:
        return image
    import cv2  # opencv comes with albumentations

    clahe = cv2.createCLAHE(clipLimit=float(clip), tileGridSize=(8, 8))
    if image.ndim == 2:
        return clahe.apply(image)
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def read_label(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Raw label values as stored: palette indices for palette PNGs, grey values otherwise.
    (H, W) of uint8 or uint16; an RGB label is accepted only if its channels are equal."""
    try:
        with open_image(path, path, max_pixels) as img:
            img.load()
            arr = np.array(upright(img))  # a palette survives the transpose
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable or corrupt label image ({exc})") from None
    if arr.dtype == bool:  # mode "1"
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not (rgb == rgb[..., :1]).all():
            raise PipelineError(
                f"{path}: colour label image; labels must hold one class value per pixel "
                "(grayscale or palette PNG)"
            )
        arr = np.ascontiguousarray(rgb[..., 0])
    return arr


def map_labels(raw: np.ndarray, mapping: dict[int, int], path: Path, key: str) -> np.ndarray:
    """Raw label values -> class indices (uint8, 255 = ignore); a value not in the mapping is
    an error naming the file, the value and the mapping's params key."""
    values = np.unique(raw)
    missing = [int(v) for v in values if int(v) not in mapping]
    if missing:
        raise PipelineError(
            f"{path}: label value {missing[0]} is not in {key} {dict(sorted(mapping.items()))}"
        )
    if raw.dtype == np.uint8:
        lut = np.full(256, IGNORE_INDEX, np.uint8)
        for value, cls in mapping.items():
            if value < 256:
                lut[value] = cls
        return lut[raw]
    out = np.full(raw.shape, IGNORE_INDEX, np.uint8)
    for value in values:
        out[raw == value] = mapping[int(value)]
    return out


def merge_vessel_label(manual: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """(H, W) manual tracing + FOV mask -> label: 1 vessel, 0 background, 255 outside the FOV."""
    label = (manual > 127).astype(np.uint8)
    label[fov <= 127] = IGNORE_INDEX
    return label


def check_same_size(item: Item, image: np.ndarray, other: np.ndarray, other_path: Path) -> None:
    if image.shape[:2] != other.shape[:2]:
        raise PipelineError(
            f"{item.image}: image is {image.shape[1]}x{image.shape[0]} but {other_path.name} "
            f"is {other.shape[1]}x{other.shape[0]}"
        )


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PipelineError(f"{folder}: folder not found")
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def by_stem(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in image_files(folder):
        if p.stem in files:
            raise PipelineError(f"{p}: two files with the stem {p.stem!r} in {folder}")
        files[p.stem] = p
    return files


def split_stems(stems: list[str], val: int, test: int, seed: int) -> dict[str, list[str]]:
    """Seeded random split; each list sorted so the manifest is stable and readable."""
    order = np.random.default_rng(seed).permutation(len(stems))
    shuffled = [stems[i] for i in order]
    return {
        "train": sorted(shuffled[test + val :]),
        "val": sorted(shuffled[test : test + val]),
        "test": sorted(shuffled[:test]),
    }


# --- datasets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    stem: str
    image: Path
    label: Path
    mask: Path | None = None  # FOV / ignore mask: 0 = ignore
    second: Path | None = None  # a second observer's label (DRIVE test)


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) or (H, W) uint8
    label: np.ndarray  # (H, W) uint8 class indices, 255 = ignore
    second: np.ndarray | None = None


@dataclass
class RawDataset:
    name: str
    root: Path
    class_names: list[str]
    in_channels: int
    splits: dict[str, list[Item]] = field(default_factory=dict)
    read: Callable[[Item], Sample] = field(repr=False, default=None)  # type: ignore[assignment]

    def check(self) -> None:
        for split in SPLITS:
            if not self.splits.get(split):
                raise PipelineError(f"{self.root}: the {split} split is empty")


def _read_vessel(item: Item, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Sample:
    image = read_image(item.image, "RGB", max_pixels=max_pixels)
    fov = read_image(item.mask, "L", max_pixels=max_pixels)
    check_same_size(item, image, fov, item.mask)
    label = read_image(item.label, "L", max_pixels=max_pixels)
    check_same_size(item, image, label, item.label)
    second = None
    if item.second is not None:
        second = read_image(item.second, "L", max_pixels=max_pixels)
        check_same_size(item, image, second, item.second)
        second = merge_vessel_label(second, fov)
    return Sample(image, merge_vessel_label(label, fov), second)


def _missing(image: Path, what: Path) -> PipelineError:
    return PipelineError(f"{image}: no label for this image (expected {what})")


def open_synthetic(params: Params, root: Path) -> RawDataset:
    ds = params.dataset
    images = by_stem(root / "images")
    if not images:
        raise PipelineError(f"{root / 'images'}: no images found (run the download stage)")
    need = ds.val_count + ds.test_count + 1
    if len(images) < need:
        raise PipelineError(
            f"{root}: {len(images)} images, but dataset.val_count + dataset.test_count + 1 "
            f"training image need {need}"
        )
    items = {}
    for stem, image in images.items():
        label, mask = root / "manual" / f"{stem}.png", root / "mask" / f"{stem}.png"
        if not label.is_file():
            raise _missing(image, label)
        items[stem] = Item(stem, image, label, mask)
    splits = split_stems(sorted(items), ds.val_count, ds.test_count, ds.seed)
    return RawDataset(
        "synthetic",
        root,
        VESSEL_CLASSES,
        3,
        {s: [items[k] for k in stems] for s, stems in splits.items()},
        functools.partial(_read_vessel, max_pixels=ds.max_image_pixels),
    )


def _drive_items(folder: Path, second: bool) -> list[Item]:
    """DRIVE pairs files by the image number: 21_training.tif, 21_manual1.gif,
    21_training_mask.gif (and 01_manual2.gif for the second observer)."""

    def find(sub: str, number: str, image: Path) -> Path:
        hits = sorted((folder / sub).glob(f"{number}_*")) if (folder / sub).is_dir() else []
        if not hits:
            raise _missing(image, folder / sub / f"{number}_*")
        return hits[0]

    items = []
    for image in image_files(folder / "images"):
        number = re.split(r"[_.]", image.name)[0]
        items.append(
            Item(
                image.stem,
                image,
                find("1st_manual", number, image),
                find("mask", number, image),
                find("2nd_manual", number, image) if second else None,
            )
        )
    return items


def open_drive(params: Params, root: Path) -> RawDataset:
    train = _drive_items(root / "training", second=False)
    test = _drive_items(root / "test", second=(root / "test" / "2nd_manual").is_dir())
    val_count = params.dataset.val_count
    if len(train) <= val_count:
        raise PipelineError(
            f"{root / 'training' / 'images'}: {len(train)} images leave no training images "
            f"after dataset.val_count={val_count}"
        )
    split = split_stems([i.stem for i in train], val_count, 0, params.dataset.seed)
    by = {i.stem: i for i in train}
    return RawDataset(
        "drive",
        root,
        VESSEL_CLASSES,
        3,
        {
            "train": [by[s] for s in split["train"]],
            "val": [by[s] for s in split["val"]],
            "test": test,
        },
        functools.partial(_read_vessel, max_pixels=params.dataset.max_image_pixels),
    )


def _mapped_reader(
    mapping: dict[int, int],
    key: str,
    mode: str,
    bit_depth: int = 0,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Callable[[Item], Sample]:
    def read(item: Item) -> Sample:
        image = read_image(item.image, mode, bit_depth, max_pixels=max_pixels)
        raw = read_label(item.label, max_pixels)
        check_same_size(item, image, raw, item.label)
        label = map_labels(raw, mapping, item.label, key)
        if item.mask is not None:
            mask = read_label(item.mask, max_pixels)
            check_same_size(item, image, mask, item.mask)
            label[mask == 0] = IGNORE_INDEX
        return Sample(image, label)

    return read


def _pairs(images: Path, labels: Path, masks: Path | None = None) -> list[Item]:
    """Pair images with labels (and masks) by file stem, whatever the extensions."""
    found = by_stem(images)
    if not found:
        raise PipelineError(f"{images}: no images (empty split)")
    label_files = by_stem(labels)
    mask_files = by_stem(masks) if masks is not None else {}
    items = []
    for stem, image in found.items():
        if stem not in label_files:
            raise _missing(image, labels / f"{stem}.*")
        if masks is not None and stem not in mask_files:
            raise PipelineError(f"{image}: no mask for this image (expected {masks / stem}.*)")
        items.append(Item(stem, image, label_files[stem], mask_files.get(stem)))
    return items


def open_camvid(params: Params, root: Path) -> RawDataset:
    splits = {s: _pairs(root / s, root / f"{s}annot") for s in SPLITS}
    return RawDataset(
        "camvid",
        root,
        CAMVID_CLASSES,
        3,
        splits,
        _mapped_reader(
            CAMVID_MAPPING,
            "the CamVid classes",
            "RGB",
            max_pixels=params.dataset.max_image_pixels,
        ),
    )


def _is_gray(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> bool:
    try:
        with open_image(path, path, max_pixels) as img:  # reads the header only
            return img.mode in GRAY_MODES
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable or corrupt image ({exc})") from None


def open_folder(params: Params, root: Path) -> RawDataset:
    fp = params.dataset.folder
    masks = root / fp.masks if fp.masks else None
    for key, folder in (("images", fp.images), ("labels", fp.labels), ("masks", fp.masks)):
        if folder and not (root / folder).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise PipelineError(
                f"{root / folder}: folder not found; set dataset.folder.{key} to one of the "
                f"folders there: {', '.join(found) or '(none)'}"
            )
    if fp.split == "folders":
        splits = {
            s: _pairs(root / fp.images / s, root / fp.labels / s, masks / s if masks else None)
            for s in SPLITS
        }
    else:
        items = _pairs(root / fp.images, root / fp.labels, masks)
        n = len(items)
        val, test = round(n * fp.val_fraction), round(n * fp.test_fraction)
        for split, count in (("val", val), ("test", test)):
            if count == 0:
                raise PipelineError(
                    f"dataset.folder.{split}_fraction: the {split} split of {n} images in "
                    f"{root / fp.images} would be empty"
                )
        if n - val - test <= 0:
            raise PipelineError(
                f"dataset.folder.val_fraction + test_fraction: no training images left of {n} "
                f"in {root / fp.images}"
            )
        by = {i.stem: i for i in items}
        stems = split_stems(sorted(by), val, test, params.dataset.seed)
        splits = {s: [by[k] for k in stems[s]] for s in SPLITS}
    limit = params.dataset.max_image_pixels
    gray = all(_is_gray(i.image, limit) for items in splits.values() for i in items)
    mode = "L" if gray else "RGB"
    names, mapping = list(fp.class_names), dict(fp.mapping)
    if len(names) == 2 and fp.positive == names[0]:
        # a binary model's sigmoid channel is class index 1: the positive class goes there
        names.reverse()
        mapping = {raw: {0: 1, 1: 0}.get(c, c) for raw, c in mapping.items()}
    return RawDataset(
        "folder",
        root,
        names,
        1 if gray else 3,
        splits,
        _mapped_reader(mapping, "dataset.folder.mapping", mode, fp.bit_depth, limit),
    )


OPENERS: dict[str, Callable[[Params, Path], RawDataset]] = {
    "synthetic": open_synthetic,
    "drive": open_drive,
    "camvid": open_camvid,
    "folder": open_folder,
}


def open_dataset(params: Params) -> RawDataset:
    """The downloaded dataset named in params, split into train/val/test (none empty)."""
    name = params.dataset.name
    root = paths.raw_dir(name)
    if not root.is_dir():
        raise PipelineError(f"{root}: raw data not found (run the download stage)")
    ds = OPENERS[name](params, root)
    ds.check()
    return ds
