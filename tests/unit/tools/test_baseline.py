"""`python -m pipeline.baseline`: a finished run kept as baseline/<name>, a child of HEAD,
with the working tree, the index and the current branch untouched. (The real thing, after a
real `dvc repro` and pushed to an origin, is in tests/e2e/test_workflow_run.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline import baseline, preset
from pipeline.core import paths
from pipeline.core.common import PipelineError
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
COMMITTED = "lr: 0.1\nepochs: 3\ndataset:\n  source: ''\n  sha256: ''\n"
APPLIED = COMMITTED.replace("lr: 0.1", "lr: 0.2")  # preset ci-cpu applied
PRESETS = {"ci-cpu": "lr: 0.2\n", "other": "lr: 0.3\n"}


def git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A committed project (dvc.yaml, params.yaml, code) with a finished run's files, of the
    preset ci-cpu (pipeline/presets/ is a folder of two presets here)."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / "params.yaml").write_text(COMMITTED)
    (tmp_path / "train.py").write_text("print('train')\n")
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "code")
    for name, text in {**RUN, "report.md": "# run\n", "model.pt": "weights"}.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "params.yaml").write_text(APPLIED)
    presets = tmp_path.parent / f"{tmp_path.name}-presets"
    presets.mkdir()
    for name, text in PRESETS.items():
        (presets / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(preset, "PRESETS", presets)
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
    assert git(project, "show", f"{commit}:params.yaml") == APPLIED.strip()
    assert git(project, "show", f"{commit}:metrics.json") == '{"miou": 0.5}'
    assert "the run of " + head[:8] in git(project, "log", "-1", "--format=%s", commit)
    # where the user was: same branch, same HEAD, nothing new staged, the run still there
    assert git(project, "branch", "--show-current") == "main"
    assert git(project, "rev-parse", "HEAD") == head
    assert git(project, "diff", "--cached", "--name-only") == "params.yaml"
    assert (project / "metrics.json").is_file()


def test_storing_again_moves_the_branch(project):
    first = baseline.store("ci-cpu")
    (project / "metrics.json").write_text('{"miou": 0.6}\n')
    second = baseline.store("ci-cpu")
    assert second != first and git(project, "rev-parse", "baseline/ci-cpu") == second


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


# --- the params must be those of the preset named ---------------------------------------------


def no_branches(root: Path) -> bool:
    return git(root, "branch", "--list", "baseline/*") == ""


def test_another_presets_run_is_refused_naming_the_key_both_values_and_the_fix(project):
    """Issue 30: ci-cpu's run stored as baseline/drive-gpu."""
    with pytest.raises(PipelineError) as exc:
        baseline.store("other")
    assert str(exc.value) == (
        "params.yaml: lr is 0.2 but preset other sets 0.3: this is not the run of other; store "
        "it as what it is (python -m pipeline.baseline ci-cpu), or restore params.yaml (git "
        "checkout params.yaml), apply other (python -m pipeline.preset other --apply) and run "
        "dvc repro"
    )
    assert no_branches(project)


def test_default_means_params_yaml_as_committed(project):
    with pytest.raises(
        PipelineError,
        match=r"^params.yaml: lr is 0.2 but HEAD's params.yaml has "
        r"0.1 \(default means no preset\): .*pipeline.baseline ci-cpu\)",
    ):
        baseline.store("default")
    assert no_branches(project)
    (project / "params.yaml").write_text(COMMITTED.replace("''", "/data/x.zip", 1))
    with pytest.raises(PipelineError, match=r"dataset.source is /data/x.zip but HEAD's"):
        baseline.store("default")  # no preset, no --source
    (project / "params.yaml").write_text(COMMITTED)
    commit = baseline.store("default")
    assert git(project, "rev-parse", "baseline/default") == commit


def test_a_hand_edit_beside_the_preset_is_refused_and_source_is_free(project):
    (project / "params.yaml").write_text(APPLIED.replace("''", "/data/x.zip", 1))
    baseline.store("ci-cpu")  # dataset.source is what `pipeline.preset --source` set
    (project / "params.yaml").write_text(APPLIED.replace("epochs: 3", "epochs: 5"))
    with pytest.raises(
        PipelineError,
        match=r"^params.yaml: epochs is 5 but HEAD's params.yaml "
        r"has 3 and preset ci-cpu leaves it: this is not the run of ci-cpu; "
        r"restore params.yaml",
    ):
        baseline.store("ci-cpu")


def test_a_name_that_is_no_preset_is_refused(project):
    with pytest.raises(
        PipelineError,
        match=r"^baseline name 'drive-gpu': not a preset "
        r"\(pipeline/presets/: ci-cpu, other\), nor 'default'",
    ):
        baseline.store("drive-gpu")
    assert no_branches(project)


def test_dvc_lock_of_other_params_is_refused_naming_the_stage_and_key(project):
    lock = {"schema": "2.0", "stages": {"train": {"params": {"params.yaml": {"lr": 0.1}}}}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    with pytest.raises(
        PipelineError,
        match=r"^dvc.lock: stage train ran with lr 0.1 but "
        r"params.yaml has 0.2: run `dvc repro` first$",
    ):
        baseline.store("ci-cpu")
    lock["stages"]["train"]["params"]["params.yaml"] = {"lr": 0.2, "dataset": {"source": ""}}
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    baseline.store("ci-cpu")


# --- git: the remote, the branch -------------------------------------------------------------


def test_an_unknown_remote_is_refused_before_anything_is_written(project):
    first = baseline.store("ci-cpu")
    (project / "metrics.json").write_text('{"miou": 0.6}\n')
    objects = git(project, "count-objects")
    with pytest.raises(PipelineError) as exc:
        baseline.store("ci-cpu", push="nosuchremote")
    assert str(exc.value) == (
        "--push nosuchremote: no such git remote (this repository has: none); add it (git "
        "remote add nosuchremote URL) or name one of those"
    )
    assert git(project, "rev-parse", "baseline/ci-cpu") == first
    assert git(project, "count-objects") == objects  # not even a commit object


def test_a_failed_push_names_the_remote_and_the_retry_and_moves_nothing(project, tmp_path):
    first = baseline.store("ci-cpu")
    (project / "metrics.json").write_text('{"miou": 0.6}\n')
    git(project, "remote", "add", "broken", str(tmp_path / "no-such-repo"))
    with pytest.raises(PipelineError) as exc:
        baseline.store("ci-cpu", push="broken")
    message = str(exc.value)
    assert message.startswith("git push to broken failed (fatal: ")
    assert message.endswith(
        f"the local baseline/ci-cpu is still at {first[:8]}: fix the remote (git remote -v) "
        "and retry with python -m pipeline.baseline ci-cpu --push broken"
    )
    assert "\n" not in message and "and the repository exists" not in message
    assert git(project, "rev-parse", "baseline/ci-cpu") == first


def test_a_push_sends_the_commit_then_moves_the_local_branch(project, tmp_path):
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    git(project, "remote", "add", "origin", str(origin))
    commit = baseline.store("ci-cpu", push="origin")
    assert git(origin, "rev-parse", "baseline/ci-cpu") == commit
    assert git(project, "rev-parse", "baseline/ci-cpu") == commit


def test_the_checked_out_baseline_branch_is_not_moved(project):
    first = baseline.store("ci-cpu")
    git(project, "symbolic-ref", "HEAD", "refs/heads/baseline/ci-cpu")  # its files are the run's
    with pytest.raises(PipelineError, match=r"^baseline/ci-cpu is checked out: switch to"):
        baseline.store("ci-cpu")
    assert git(project, "rev-parse", "HEAD") == first


def test_a_detached_head_is_stored_and_stays_detached(project):
    head = git(project, "rev-parse", "HEAD")
    git(project, "switch", "-q", "--detach")
    commit = baseline.store("ci-cpu")
    assert git(project, "rev-parse", f"{commit}^") == head
    assert git(project, "rev-parse", "HEAD") == head
    assert git(project, "branch", "--show-current") == ""
