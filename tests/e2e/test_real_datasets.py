"""The real download + preprocess code on the real DRIVE and CamVid archives.

They live in ../shared/datasets/ (next to the project, never inside it); without that folder
these tests skip, saying so. About 30 s on 2 cores, hence `slow`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import parse_params
from pipeline.data.archives import sha256_file
from pipeline.data.sources import CAMVID_CLASSES
from pipeline.stages.download import download
from pipeline.stages.preprocess import preprocess

pytestmark = pytest.mark.slow

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def archive(name: str) -> Path:
    path = DATASETS / name
    if not path.is_file():
        pytest.skip(f"{path} not found: real-data tests need ../shared/datasets/{name}")
    return path


def expected_sha256(name: str) -> str:
    sums = DATASETS / "SHA256SUMS"
    if sums.is_file():
        for line in sums.read_text().splitlines():
            digest, _, file = line.partition("  ")
            if file.strip().lstrip("*") == name:
                return digest
    return sha256_file(DATASETS / name)


def run(name: str, zip_name: str, project: Path, **preprocess_params) -> dict:
    params = parse_params(
        {
            "dataset": {
                "name": name,
                "source": str(archive(zip_name)),
                "sha256": expected_sha256(zip_name),
            },
            "preprocess": {"crop_size": 256, "crop_stride": 224, **preprocess_params},
        }
    )
    download(params)
    preprocess(params)
    return json.loads((project / "data" / "processed" / "manifest.json").read_text())


def histogram(project: Path) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    with open(project / "data" / "processed" / "class_pixels.csv") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["split"], {})[int(row["class_index"])] = int(row["pixels"])
    return out


def test_drive(project):
    manifest = run("drive", "DRIVE.zip", project)
    splits = manifest["splits"]
    assert len(splits["train"]) + len(splits["val"]) == 20 and len(splits["val"]) == 4
    assert len(splits["test"]) == 20
    raw, processed = project / "data" / "raw" / "drive", project / "data" / "processed"
    for split, stems in splits.items():
        folder = "test" if split == "test" else "training"
        for stem in stems:
            number, kind = stem.split("_")
            label = np.load(processed / split / "labels" / f"{stem}.npy")
            fov = np.array(Image.open(raw / folder / "mask" / f"{number}_{kind}_mask.gif"))
            assert label.shape == (584, 565)
            assert set(np.unique(label)) <= {0, 1, 255}
            assert np.array_equal(label == 255, fov == 0), stem  # ignored exactly outside the FOV
            assert 0.05 < (label == 1).sum() / (label != 255).sum() < 0.25  # vessels: ~12 %
    assert len(list((processed / "test" / "second").glob("*.npy"))) == 20
    observer = manifest["second_observer"]  # the human inter-observer level on DRIVE
    assert observer["global_accuracy"] == pytest.approx(0.947, abs=0.003)
    assert 0.75 < observer["dice"] < 0.83
    hist = histogram(project)
    assert set(hist) == {"train", "val", "test"} and set(hist["train"]) == {0, 1, 255}
    assert hist["train"][0] + hist["train"][1] == sum(manifest["train_class_pixels"])


def test_camvid(project):
    manifest = run("camvid", "CamVid.zip", project)
    assert {k: len(v) for k, v in manifest["splits"].items()} == {
        "train": 367,
        "val": 101,
        "test": 233,
    }
    assert manifest["class_names"] == CAMVID_CLASSES
    raw, processed = project / "data" / "raw" / "camvid", project / "data" / "processed"
    for split, stems in manifest["splits"].items():
        for stem in stems[:: max(1, len(stems) // 15)]:  # a spread of images per split
            label = np.load(processed / split / "labels" / f"{stem}.npy")
            annot = np.array(Image.open(raw / f"{split}annot" / f"{stem}.png"))
            assert label.shape == (360, 480)
            assert set(np.unique(label)) <= {*range(11), 255}
            assert np.array_equal(label == 255, annot == 11)  # void -> ignore
            assert np.array_equal(label[annot != 11], annot[annot != 11])
    hist = histogram(project)
    for split, count in (("train", 367), ("val", 101), ("test", 233)):
        assert sum(hist[split].values()) == count * 360 * 480
        assert all(hist[split][c] > 0 for c in range(11))
    assert hist["train"][3] == max(hist["train"][c] for c in range(11))  # Road dominates
