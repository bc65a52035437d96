"""Keep a finished run as the baseline that pull requests are compared with:
`python -m pipeline.baseline [NAME] [--push REMOTE]`.

After `dvc repro` on main (with the preset NAME applied, or none: `default`), this commits
dvc.lock, params.yaml and every output that dvc.yaml marks `cache: false` (the metrics, the
learning-curve tables, the report and its images) onto the branch `baseline/<NAME>`, as a child
of HEAD. The working tree, the index and the current branch are left as they are; `--push`
force-pushes the branch to REMOTE first and moves the local branch only once the push has
succeeded. The GPU report workflow does this on every push to main, and a pull request's
comment compares its own run with `origin/baseline/<NAME>`:

    dvc metrics diff --md --all origin/baseline/<NAME>
    dvc params diff --md origin/baseline/<NAME>
    dvc plots diff origin/baseline/<NAME>

The run must be of HEAD's code, and of preset NAME: params.yaml must be HEAD's params.yaml with
pipeline/presets/<NAME>.yaml applied (`default`: HEAD's params.yaml as it is; dataset.source and
dataset.sha256 are a preset's `--source` and `--sha256`, any value), and dvc.lock must hold those
values. Any other change to a tracked file, a param that differs, or stages that `dvc status`
reports as changed, stop it with one line before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline import preset
from pipeline.core import paths
from pipeline.core.common import PipelineError, run_cli
from pipeline.core.config import flatten, parse_yaml

log = logging.getLogger(__name__)

# a commit needs an author: in CI nobody configured one
BOT = ("github-actions[bot]", "41898282+github-actions[bot]@users.noreply.github.com")
DEFAULT = "default"  # no preset: params.yaml as HEAD has it
# `python -m pipeline.preset NAME --source URL --sha256 HEX` sets these on top of the preset
FROM_SOURCE = ("dataset.source", "dataset.sha256")


def branch(name: str) -> str:
    return f"baseline/{name}"


def _reason(output: str) -> str:
    """The line of git's output that says what went wrong (git push ends with advice lines,
    e.g. "and the repository exists.")."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:", "!", "remote: error", "ERROR")):
            return line
    return lines[0] if lines else "failed"


def _git(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=paths.ROOT, capture_output=True, text=True, env=env, check=False
    )
    if check and proc.returncode != 0:
        raise PipelineError(f"git {args[0]}: {_reason(proc.stderr or proc.stdout)}")
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


# --- the params: preset NAME's ----------------------------------------------------------------


_UNSET = object()  # a key one side lacks


def _text(value: Any) -> str:
    """A param value as params.yaml spells it (null, true, "", [0.5, 0.5])."""
    if value is _UNSET:
        return "(not set)"
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value, default=str)


def _same(a: Any, b: Any) -> bool:
    """Equal as params (2 and 2.0 are; true and 1 are not)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _read_params(text: str, source: str) -> dict[str, Any]:
    data = parse_yaml(text, source) or {}
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping of params")
    return data


def expected_params(name: str, committed: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """(the flat params of preset `name` applied to HEAD's params.yaml, the keys it sets)."""
    if name == DEFAULT and name not in preset.available():
        return flatten(committed), set()
    if name not in preset.available():
        raise PipelineError(
            f"baseline name {name!r}: not a preset (pipeline/presets/: "
            f"{', '.join(preset.available())}), nor {DEFAULT!r} for params.yaml as committed"
        )
    overlay = preset.load_overlay(name)
    preset.check_keys(overlay, committed, f"preset {name}")
    return flatten(preset.merge(committed, overlay)), set(flatten(overlay))


def _difference(want: dict[str, Any], have: dict[str, Any], free: bool) -> str | None:
    """The first key whose value differs (or that only one side has), or None."""
    for key in dict.fromkeys([*want, *have]):
        if free and key in FROM_SOURCE:
            continue
        if not _same(want.get(key, _UNSET), have.get(key, _UNSET)):
            return key
    return None


def _matching(committed: dict[str, Any], have: dict[str, Any]) -> list[str]:
    """The names whose params these are (default and every preset that loads)."""
    found = []
    for name in [DEFAULT, *preset.available()]:
        try:
            want, sets = expected_params(name, committed)
        except PipelineError:
            continue
        if _difference(want, have, free=bool(sets)) is None:
            found.append(name)
    return found


def check_params(name: str, root: Path) -> dict[str, Any]:
    """params.yaml must be HEAD's with preset `name` applied (`default`: as HEAD has it), so
    baseline/<name> holds that preset's run; returns params.yaml's flat values."""
    committed = _read_params(_git("show", "HEAD:params.yaml"), "HEAD:params.yaml")
    have = flatten(_read_params((root / "params.yaml").read_text(), "params.yaml"))
    want, sets = expected_params(name, committed)
    key = _difference(want, have, free=bool(sets))
    if key is None:
        return have
    value, wanted = _text(have.get(key, _UNSET)), _text(want.get(key, _UNSET))
    if key in sets:
        why = f"preset {name} sets {wanted}"
    elif sets:
        why = f"HEAD's params.yaml has {wanted} and preset {name} leaves it"
    else:
        why = f"HEAD's params.yaml has {wanted} ({DEFAULT} means no preset)"
    if name == DEFAULT:
        redo = "restore params.yaml (git checkout params.yaml) and run dvc repro"
    else:
        redo = (
            f"restore params.yaml (git checkout params.yaml), apply {name} (python -m "
            f"pipeline.preset {name} --apply) and run dvc repro"
        )
    others = [n for n in _matching(committed, have) if n != name]
    if others:
        redo = f"store it as what it is (python -m pipeline.baseline {others[0]}), or {redo}"
    raise PipelineError(
        f"params.yaml: {key} is {value} but {why}: this is not the run of {name}; {redo}"
    )


def check_lock(root: Path, have: dict[str, Any]) -> None:
    """Every param dvc.lock recorded for a stage has params.yaml's value: the outputs are of
    these params (`dvc status` says the same, without naming the key)."""
    lock = _read_params((root / "dvc.lock").read_text(), "dvc.lock")
    for stage, entry in (lock.get("stages") or {}).items():
        recorded = ((entry or {}).get("params") or {}).get("params.yaml") or {}
        for key, value in flatten(recorded).items():
            if not _same(have.get(key, _UNSET), value):
                raise PipelineError(
                    f"dvc.lock: stage {stage} ran with {key} {_text(value)} but params.yaml "
                    f"has {_text(have.get(key, _UNSET))}: run `dvc repro` first"
                )


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


# --- git ---------------------------------------------------------------------------------------


def _check_remote(remote: str) -> None:
    """`--push REMOTE` names a configured remote: checked before anything is written."""
    remotes = _git("remote").split()
    if remote not in remotes:
        have = ", ".join(remotes) if remotes else "none"
        raise PipelineError(
            f"--push {remote}: no such git remote (this repository has: {have}); add it "
            f"(git remote add {remote} URL) or name one of those"
        )


def _check_not_checked_out(ref: str) -> None:
    """Moving the branch HEAD is on would change what the user has checked out."""
    if _git("symbolic-ref", "-q", "HEAD", check=False) == ref:
        short = ref.removeprefix("refs/heads/")
        raise PipelineError(
            f"{short} is checked out: switch to the branch of the run's code (e.g. git switch "
            "main) and store it from there"
        )


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


def _push(name: str, remote: str, commit: str, ref: str, old: str) -> None:
    """Force-push `commit` as the remote's `ref`; on failure nothing local has moved."""
    proc = subprocess.run(
        ["git", "push", "--force", remote, f"{commit}:{ref}"],
        cwd=paths.ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        kept = f"still at {old[:8]}" if old else "not created"
        raise PipelineError(
            f"git push to {remote} failed ({_reason(proc.stderr or proc.stdout)}); the local "
            f"{branch(name)} is {kept}: fix the remote (git remote -v) and retry with "
            f"python -m pipeline.baseline {name} --push {remote}"
        )


def store(name: str, push: str | None = None) -> str:
    """Commit the run onto baseline/<name> (a child of HEAD), pushed to `push` first if given;
    returns the commit. Every check comes before anything is written."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise PipelineError(f"baseline name {name!r}: letters, digits, '.', '_' and '-' only")
    ref = f"refs/heads/{branch(name)}"
    head = _git("rev-parse", "--verify", "HEAD")
    if push:
        _check_remote(push)
    _check_not_checked_out(ref)
    files = baseline_files(paths.ROOT)
    _check_clean(files)
    check_lock(paths.ROOT, check_params(name, paths.ROOT))
    _check_dvc_status()
    env = _author_env()
    with tempfile.TemporaryDirectory() as tmp:
        # a private index: the user's staged changes and working tree stay untouched
        env["GIT_INDEX_FILE"] = str(Path(tmp) / "index")
        _git("read-tree", head, env=env)
        _git("add", "--force", "--", *files, env=env)
        tree = _git("write-tree", env=env)
    message = f"baseline {name}: the run of {head[:8]} ({_git('log', '-1', '--format=%s')})"
    commit = _git("commit-tree", tree, "-p", head, "-m", message, env=env)  # no ref moves yet
    old = _git("rev-parse", "--verify", "-q", ref, check=False)
    if push:
        _push(name, push, commit, ref, old)
        log.info("pushed %s to %s", branch(name), push)
    _git("update-ref", ref, commit, old)  # only if nobody moved it meanwhile
    log.info("%s is now %s: the run of %s", branch(name), commit[:8], head[:8])
    return commit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default=DEFAULT, help="the preset (or 'default')")
    parser.add_argument("--push", metavar="REMOTE", help="force-push the branch to REMOTE")
    args = parser.parse_args(argv)
    store(args.name, args.push)


if __name__ == "__main__":
    run_cli(main)
