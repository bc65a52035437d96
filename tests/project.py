"""End-to-end test support: this project copied into a temporary git repo, and DVC run in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return out


def _project_files() -> list[str]:
    """What a clone holds: tracked files plus new, not-ignored ones (a work in progress)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [f for f in out if (PROJECT / f).is_file() and not f.startswith("reports/")]


def make_repo(root: Path, overrides: dict) -> Path:
    """Copy the project into `root` with params.yaml overridden, as a fresh git repo."""
    for rel in _project_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, dest)
    (root / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, overrides), sort_keys=False))
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "baseline"],
    ):
        subprocess.run(cmd, cwd=root, check=True, env=env())
    return root


def env(**extra: str) -> dict[str, str]:
    """The caller's environment without MLFLOW_* and DVC_* (plus `extra`), the venv first on
    PATH, and a git identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
        **extra,
    )
    return env


def dvc(repo: Path, *args: str, extra_env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["dvc", *args],
        cwd=repo,
        env=env(**(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def run_queue(repo: Path, names: dict[str, str], extra_env: dict[str, str] | None = None) -> str:
    """Queue one `dvc exp run -S lr=<lr> -n <name>` per item of `names`, run them all at once
    (`dvc queue start -j <n>`), wait until none is queued or running (15 min at most) and
    check that each succeeded; returns the last `dvc queue status`."""
    start_queue(repo, names, extra_env)
    return wait_queue(repo, names)


def start_queue(repo: Path, names: dict[str, str], extra_env: dict[str, str] | None = None) -> None:
    """Queue one `dvc exp run -S lr=<lr> -n <name>` per item of `names` and start as many
    workers; returns at once (see wait_queue)."""
    for name, lr in names.items():
        dvc(repo, "exp", "run", "--queue", "-S", f"lr={lr}", "-n", name, extra_env=extra_env)
    # the workers it starts inherit its output: captured, `dvc queue start` would only return
    # when the last worker exits, and dvc-task's monitor sometimes leaves one idle for good
    start = subprocess.run(
        ["dvc", "queue", "start", "-j", str(len(names))],
        cwd=repo,
        env=env(**(extra_env or {})),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
    )
    assert start.returncode == 0, "dvc queue start failed"


def wait_queue(repo: Path, names: Iterable[str]) -> str:
    """Wait until `repo`'s queue has nothing queued or running (15 min at most), stop its
    workers and check that each of `names` succeeded; returns the last `dvc queue status`."""
    import re
    import time

    deadline = time.monotonic() + 900
    while True:
        status = dvc(repo, "queue", "status")
        if not any(s in status for s in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, f"queue still busy:\n{status}"
        time.sleep(5)
    # a worker left idle would outlive the test
    subprocess.run(
        ["dvc", "queue", "stop"],
        cwd=repo,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    for name in names:
        if not re.search(rf"{name}\s.*Success", status):
            logs = subprocess.run(
                ["dvc", "queue", "logs", name], cwd=repo, env=env(), capture_output=True, text=True
            )
            raise AssertionError(f"{name} did not succeed:\n{status}\n{logs.stdout[-3000:]}")
    return status
