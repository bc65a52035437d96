"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import paths


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """Every path of the pipeline (params.yaml, data/, models/, reports/, ...) under an empty
    temporary project root."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.delenv("DVC_ROOT", raising=False)  # store_root() and relative sources -> root
    with paths.rooted(root):
        yield root
