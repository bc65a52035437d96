"""Which model the report stage registers (`mlflow.registered_model`), and the identity of the
test split it was scored on."""

from __future__ import annotations

import hashlib

import pandas as pd

from pipeline.core import paths
from pipeline.core.common import sha256_file
from pipeline.data.manifest import Manifest
from pipeline.data.store import array_path
from pipeline.report.tables import ARCH_NAMES, Tables, winner
from pipeline.tracking.registry import Candidate


def candidate(t: Tables, tolerance: float) -> Candidate | None:
    """The model to register: the better architecture on the test split (report.metric), or
    UNet++ pruned to the best depth when its mIoU is within pruning.tolerance of that one's (the
    prune stage picks the best depth by mIoU too); None when no model has the metric."""
    name = winner(t.test, t.metric)
    if name is None:
        return None
    best = t.test.loc[t.test["model"] == name].iloc[0]
    arch = next(a for a, n in ARCH_NAMES.items() if n == best["model"])
    pruned = t.pruning.loc[t.pruning["depth"] == t.best_depth].iloc[0]
    deepest = int(t.pruning["depth"].max())
    numbers = [c for c in t.test.columns if c != "model"]
    if t.best_depth < deepest and pruned["miou"] >= best["miou"] - tolerance:
        return Candidate(
            label=f"UNet++ L{t.best_depth}",
            stage="prune",
            model=f"segmenter_L{t.best_depth}",
            checkpoint_sha256=sha256_file(paths.checkpoint("unetpp")),
            metrics={k: float(pruned[k]) for k in numbers if k in pruned and pd.notna(pruned[k])},
        )
    return Candidate(
        label=best["model"],
        stage=f"train_{arch}",
        model="segmenter",
        checkpoint_sha256=sha256_file(paths.checkpoint(arch)),
        metrics={k: float(best[k]) for k in numbers if pd.notna(best[k])},
    )


def split_hash(manifest: Manifest) -> str:
    """The test split's identity: its image names and the bytes of its full-size labels."""
    digest = hashlib.sha256(manifest.dataset.encode())
    for stem in manifest.splits["test"]:
        label = array_path("test", "labels", stem)
        digest.update(f"{stem}:{sha256_file(label)};".encode())
    return digest.hexdigest()[:16]
