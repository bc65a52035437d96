"""Keep a finished run as the baseline that pull requests are compared with:
`python -m pipeline.baseline [NAME] [--push REMOTE]`.

After `dvc repro` on main (with the preset NAME applied, or none: `default`), this commits
dvc.lock, params.yaml and every output that dvc.yaml marks `cache: false` (the metrics, the
learning-curve tables, the report and its images) onto the branch `baseline/<NAME>`, as a child
of HEAD. The working tree, the index and the current branch are left as they are; `--push`
force-pushes the branch. The GPU report workflow does this on every push to main, and a pull
request's comment compares its own run with `origin/baseline/<NAME>`:

    dvc metrics diff --md --all origin/baseline/<NAME>
    dvc params diff --md origin/baseline/<NAME>
    dvc plots diff origin/baseline/<NAME>

The run must be of HEAD's code: any other change to a tracked file, or stages that `dvc status`
reports as changed, stop it with one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline import paths
from pipeline.common import PipelineError, run_cli

log = logging.getLogger(__name__)

# a commit needs an author: in CI nobody configured one
BOT = ("github-actions[bot]", "41898282+github-actions[bot]@users.noreply.github.com")


def branch(name: str) -> str:
    return f"baseline/{name}"


def _git(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=paths.ROOT, capture_output=True, text=True, env=env, check=False
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise PipelineError(f"git {args[0]}: {detail[-1] if detail else 'failed'}")
    return proc.stdout.strip()


def uncached_outputs(dvc_yaml: dict[str, Any]) -> list[str]:
    """Every stage output (outs, metrics, plots) declared `cache: false`: what git carries."""
    found = []
    for stage in (dvc_yaml.get("stages") or {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                if isinstance(entry, dict):
                    ((path, opts),) = entry.items()
                    if isinstance(opts, dict) and opts.get("cache") is False:
                        found.append(path)
    return found


def baseline_files(root: Path) -> list[str]:
    """dvc.lock, params.yaml and the uncached outputs, each checked to exist."""
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise PipelineError(f"{dvc_yaml} not found: run this in the project's root")
    files = ["dvc.lock", "params.yaml", *uncached_outputs(yaml.safe_load(dvc_yaml.read_text()))]
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise PipelineError(f"{missing[0]} not found: run `dvc repro` first")
    return files


def _check_clean(files: list[str]) -> None:
    """Only the run's own files may differ from HEAD: the baseline is HEAD's code."""
    allowed = set(files)
    changed = _git("diff", "--name-only", "-z", "HEAD")  # tracked files, staged or not
    for path in filter(None, changed.split("\0")):
        if path not in allowed and Path(path).name != ".gitignore":  # DVC edits .gitignores
            raise PipelineError(
                f"{path} differs from HEAD: commit or stash it, the baseline must be HEAD's code"
            )
    _check_dvc_status()


def _check_dvc_status() -> None:
    """`dvc status --quiet` exits 1, silently, when a stage changed since dvc.lock."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--quiet"],
        cwd=paths.ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        error = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        if error:
            raise PipelineError(f"dvc status: {error[-1]}")
        raise PipelineError("`dvc status` shows changed stages: run `dvc repro` first")


def _author_env() -> dict[str, str]:
    """The environment, with the bot as author and committer where git has no identity."""
    env = dict(os.environ)
    configured = {key: _git("config", f"user.{key}", check=False) for key in ("name", "email")}
    for role in ("AUTHOR", "COMMITTER"):
        for key, value in zip(("name", "email"), BOT, strict=True):
            name = f"GIT_{role}_{key.upper()}"
            if not configured[key] and not env.get(name):
                env[name] = value
    return env


def store(name: str, push: str | None = None) -> str:
    """Commit the run onto baseline/<name> (a child of HEAD); returns the commit."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise PipelineError(f"baseline name {name!r}: letters, digits, '.', '_' and '-' only")
    head = _git("rev-parse", "--verify", "HEAD")
    files = baseline_files(paths.ROOT)
    _check_clean(files)
    env = _author_env()
    with tempfile.TemporaryDirectory() as tmp:
        # a private index: the user's staged changes and working tree stay untouched
        env["GIT_INDEX_FILE"] = str(Path(tmp) / "index")
        _git("read-tree", head, env=env)
        _git("add", "--force", "--", *files, env=env)
        tree = _git("write-tree", env=env)
    message = f"baseline {name}: the run of {head[:8]} ({_git('log', '-1', '--format=%s')})"
    commit = _git("commit-tree", tree, "-p", head, "-m", message, env=env)
    ref = f"refs/heads/{branch(name)}"
    _git("update-ref", ref, commit)
    log.info("%s is now %s: the run of %s", branch(name), commit[:8], head[:8])
    if push:
        _git("push", "--force", push, f"{ref}:{ref}")
        log.info("pushed %s to %s", branch(name), push)
    return commit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="default", help="the preset (or 'default')")
    parser.add_argument("--push", metavar="REMOTE", help="force-push the branch to REMOTE")
    args = parser.parse_args(argv)
    store(args.name, args.push)


if __name__ == "__main__":
    run_cli(main)
