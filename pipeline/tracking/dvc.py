"""Where a stage stands in DVC and git: the commit, the DVC execution (process) it runs under,
and the hash DVC recorded for the data it consumes. MLflow runs are tagged with these."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.config import Params


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=paths.ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def dvc_args(cmdline: list[str]) -> list[str] | None:
    """The arguments of a DVC command line (`dvc ...`, `python .../bin/dvc ...`,
    `python -m dvc ...`), or None when it is not DVC."""
    for i, arg in enumerate(cmdline[:2]):
        if Path(arg).name in ("dvc", "dvc.exe"):
            return cmdline[i + 1 :]
    if cmdline[1:3] == ["-m", "dvc"]:
        return cmdline[3:]
    return None


def execution() -> tuple[str, str] | None:
    """(key, command) of the pipeline execution this stage belongs to, or None for a stage
    started by hand. One execution is one DVC process: a `dvc repro`, a `dvc exp run`, or one
    queued experiment (each runs in its own `dvc exp exec-run`); DVC runs every stage as
    dvc -> shell -> python, so the nearest DVC process above this one identifies it.
    PIPELINE_EXECUTION sets the key instead, e.g. to group stages a CI job starts by hand.
    """
    if key := os.environ.get("PIPELINE_EXECUTION"):
        return key, key
    import psutil

    try:
        for proc in psutil.Process().parents():
            args = dvc_args(proc.cmdline())
            if args is not None:
                key = f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"
                return key, " ".join(["dvc", *args])
    except psutil.Error:
        pass
    return None


def data_hash(output: str) -> str | None:
    """The DVC output a stage consumes ("data/raw" or "data/processed"): DVC's md5 of it from
    dvc.lock (DVC updates each stage's entry right after the stage runs), else for processed
    data the sha256 of its manifest, which lists every split image and crop."""
    import hashlib

    import yaml

    try:
        lock = yaml.safe_load((paths.ROOT / "dvc.lock").read_text()) or {}
        for stage in lock.get("stages", {}).values():
            for out in stage.get("outs", []):
                if out.get("path") == output and out.get("md5"):
                    return f"md5:{out['md5']}"
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    if output == "data/processed" and paths.MANIFEST.is_file():
        return f"sha256:{hashlib.sha256(paths.MANIFEST.read_bytes()).hexdigest()}"
    return None


def _dvc_yaml() -> Path | None:
    """The project's dvc.yaml; in a test project without one, the code's own."""
    for root in (paths.ROOT, Path(__file__).resolve().parents[2]):
        if (root / "dvc.yaml").is_file():
            return root / "dvc.yaml"
    return None


def declared(stage: str, params: Params) -> dict[str, Any]:
    """The params dvc.yaml lists for `stage`, with their values: the one declaration of what
    the stage reads (tests/repo/test_dvc_yaml.py checks it covers every read), and what its
    MLflow run logs. `mlflow.*` is left out: where runs are logged, not what they are."""
    import yaml

    everything = params.model_dump()
    source = _dvc_yaml()
    spec = yaml.safe_load(source.read_text())["stages"][stage] if source else {}
    out: dict[str, Any] = {}
    for entry in spec.get("params", [{"params.yaml": None}]):
        if isinstance(entry, dict):  # `- params.yaml:` lists every param
            return {k: v for k, v in everything.items() if k != "mlflow"}
        if entry.split(".")[0] == "mlflow":
            continue
        node: Any = everything
        for key in entry.split("."):
            node = node[key]
        out[entry] = node
    return out
