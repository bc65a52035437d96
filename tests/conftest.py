"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import paths


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """Point every path constant at an empty temporary project root."""
    root = tmp_path / "project"
    root.mkdir()
    patched = {
        "ROOT": root,
        "PARAMS": root / "params.yaml",
        "DATA": root / "data",
        "RAW": root / "data" / "raw",
        "PROCESSED": root / "data" / "processed",
        "MANIFEST": root / "data" / "processed" / "manifest.json",
        "CLASS_PIXELS": root / "data" / "processed" / "class_pixels.csv",
        "MODELS": root / "models",
        "REPORTS": root / "reports",
    }
    for name, value in patched.items():
        monkeypatch.setattr(paths, name, value)
    monkeypatch.delenv("DVC_ROOT", raising=False)  # store_root() and relative sources -> root
    return root
