"""`python -m pipeline.baseline`: a finished run kept as baseline/<name>, a child of HEAD,
with the working tree, the index and the current branch untouched. (The real thing, after a
real `dvc repro` and pushed to an origin, is in tests/e2e/test_workflow_run.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import baseline, paths
from pipeline.common import PipelineError
from tests.project import env

DVC_YAML = {
    "stages": {
        "train": {
            "cmd": "python train.py",
            "outs": [{"model.pt": {"persist": True}}, {"report.md": {"cache": False}}],
            "metrics": [{"metrics.json": {"cache": False}}],
            "plots": [{"epochs.csv": {"cache": False}}, "curves.png"],
        }
    }
}
RUN = {"dvc.lock": "schema: '2.0'\n", "metrics.json": '{"miou": 0.5}\n', "epochs.csv": "epoch\n1\n"}


def git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A committed project (dvc.yaml, params.yaml, code) with a finished run's files."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "params.yaml").write_text("lr: 0.1\n")
    (tmp_path / "train.py").write_text("print('train')\n")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "code")
    for name, text in {**RUN, "report.md": "# run\n", "model.pt": "weights"}.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "params.yaml").write_text("lr: 0.2\n")  # a preset applied
    monkeypatch.setattr(baseline, "_check_dvc_status", lambda: None)  # no DVC repo here
    for key, value in env().items():
        if key.startswith("GIT_"):
            monkeypatch.setenv(key, value)
    with paths.rooted(tmp_path):
        yield tmp_path


def test_the_uncached_outputs_are_what_git_carries():
    assert baseline.uncached_outputs(DVC_YAML) == ["report.md", "metrics.json", "epochs.csv"]


def test_the_run_goes_onto_its_branch_as_a_child_of_head(project):
    head = git(project, "rev-parse", "HEAD")
    git(project, "add", "params.yaml")  # the user's index must survive as it is
    commit = baseline.store("ci-cpu")
    assert git(project, "rev-parse", "baseline/ci-cpu") == commit
    assert git(project, "rev-parse", f"{commit}^") == head
    files = git(project, "ls-tree", "-r", "--name-only", commit).splitlines()
    assert sorted(files) == sorted(["dvc.yaml", "params.yaml", "train.py", "report.md", *RUN])
    assert git(project, "show", f"{commit}:params.yaml") == "lr: 0.2"
    assert git(project, "show", f"{commit}:metrics.json") == '{"miou": 0.5}'
    assert "the run of " + head[:8] in git(project, "log", "-1", "--format=%s", commit)
    # where the user was: same branch, same HEAD, nothing new staged, the run still there
    assert git(project, "branch", "--show-current") == "main"
    assert git(project, "rev-parse", "HEAD") == head
    assert git(project, "diff", "--cached", "--name-only") == "params.yaml"
    assert (project / "metrics.json").is_file()


def test_storing_again_moves_the_branch(project):
    first = baseline.store("default")
    (project / "metrics.json").write_text('{"miou": 0.6}\n')
    second = baseline.store("default")
    assert second != first and git(project, "rev-parse", "baseline/default") == second


def test_a_change_to_the_code_stops_it(project):
    (project / "train.py").write_text("print('changed')\n")
    with pytest.raises(PipelineError, match=r"^train.py differs from HEAD: commit or stash it"):
        baseline.store("ci-cpu")
    assert git(project, "branch", "--list", "baseline/*") == ""


def test_a_missing_output_says_run_dvc_repro(project):
    (project / "epochs.csv").unlink()
    with pytest.raises(PipelineError, match=r"^epochs.csv not found: run `dvc repro` first"):
        baseline.store("ci-cpu")


def test_a_name_git_cannot_hold_is_refused(project):
    with pytest.raises(PipelineError, match="baseline name '../x'"):
        baseline.store("../x")


def test_stages_changed_since_dvc_lock_stop_it(tmp_path):
    """The real `dvc status`: a stage never run (no dvc.lock entry) counts as changed."""
    import sys

    git(tmp_path, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "input.txt").write_text("x\n")
    stage = {"cmd": "cp input.txt out.txt", "deps": ["input.txt"], "outs": ["out.txt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": stage}}))
    with paths.rooted(tmp_path), pytest.raises(PipelineError, match="run `dvc repro` first"):
        baseline._check_dvc_status()
