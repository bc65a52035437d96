"""The README's two commands as a new user types them, read from the README (never copied here):
both start with one set-up part, `.ci/run` runs command 2 as written, and the set-up part of
command 1 works in a fresh clone with Debian's own python3 first on PATH (externally managed:
PEP 668 makes its pip refuse to install) and on a machine that already has `uv` on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.benchlib import README_RUN, readme_commands, readme_setup
from tests.project import PROJECT, env, make_repo


def test_both_commands_start_with_one_set_up_and_ci_runs_command_2_as_written():
    one, two = readme_commands()
    setup = readme_setup()
    assert one == setup + README_RUN
    assert two.startswith(setup + " && ")
    assert "pip install" not in setup.split("||", 1)[0]  # never into the system Python
    assert "--break-system-packages" not in one + two
    assert two in (PROJECT / ".ci" / "run").read_text().splitlines()


def externally_managed() -> bool:
    return any(Path("/usr/lib").glob("python3*/EXTERNALLY-MANAGED"))


def working_uv() -> str | None:
    """A uv that runs: the one `.ci/run` bootstrapped, else the one on PATH."""
    for candidate in (PROJECT / ".uv" / "bin" / "uv", shutil.which("uv")):
        if not (candidate and Path(candidate).exists()):
            continue
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return str(candidate)
    return None


def set_up(clone: Path, path: str) -> subprocess.CompletedProcess:
    """The README's set-up part, run by bash in `clone` with PATH `path` and no venv active."""
    clean = {k: v for k, v in env().items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", readme_setup()],
        cwd=clone,
        env={**clean, "PATH": path},
        capture_output=True,
        text=True,
        timeout=1200,
    )


def imports_pipeline(clone: Path, uv: str, path: str) -> str:
    """`uv run python -c "import pipeline"` in `clone`: the file it imported."""
    code = "import pipeline, sys; print(pipeline.__file__)"
    clean = {k: v for k, v in env().items() if not k.startswith(("UV_", "VIRTUAL_ENV"))}
    proc = subprocess.run(
        [uv, "run", "python", "-c", code],
        cwd=clone,
        env={**clean, "PATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path("/usr/bin/python3").exists() and externally_managed()),
    reason="needs a Debian/Ubuntu system python3 at /usr/bin/python3 marked EXTERNALLY-MANAGED",
)
def test_the_set_up_works_with_debians_externally_managed_python3(tmp_path):
    # Debian's python3 first, and no uv anywhere on PATH: the set-up must bootstrap one
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to("/usr/bin/python3")
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    if shutil.which("uv", path=path):
        pytest.skip("a uv in /usr/bin: the bootstrap would not run")
    refused = subprocess.run(
        ["python3", "-m", "pip", "install", "-q", "uv"],
        env={**env(), "PATH": path},
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0  # what the old command 1 started with
    clone = make_repo(tmp_path / "clone", {})
    proc = set_up(clone, path)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    uv = clone / ".uv" / "bin" / "uv"
    assert uv.exists(), "uv was not bootstrapped into .uv/"
    imported = imports_pipeline(clone, str(uv), path)
    assert Path(imported).resolve().is_relative_to(clone.resolve())


@pytest.mark.slow
def test_the_set_up_uses_a_uv_already_on_path(tmp_path):
    uv = working_uv()
    if uv is None:
        pytest.skip("no working uv on this machine")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").symlink_to(uv)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    clone = make_repo(tmp_path / "clone", {})
    proc = set_up(clone, path)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert not (clone / ".uv").exists()  # nothing bootstrapped
    imported = imports_pipeline(clone, str(bin_dir / "uv"), path)
    assert Path(imported).resolve().is_relative_to(clone.resolve())
