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
    # every path constant (params.yaml, data/, models/, each report file, ...) re-rooted
    real = paths.ROOT
    for name, value in vars(paths).copy().items():
        if isinstance(value, Path) and value.is_relative_to(real):
            monkeypatch.setattr(paths, name, root / value.relative_to(real))
    monkeypatch.delenv("DVC_ROOT", raising=False)  # store_root() and relative sources -> root
    return root
