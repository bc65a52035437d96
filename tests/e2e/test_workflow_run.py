"""The GPU report workflow's own steps, run for real on a CPU.

The `run:` steps of .github/workflows/report.yml's `report` job are read from the YAML and run
in order with bash, as a runner would, in clones of a temporary origin: first as a push to main
(the run becomes the branch baseline/ci-cpu), then as a labelled pull request whose branch
changes a param (its comment compares the run with that baseline). `vars.GPU_PRESET` is
`ci-cpu`. `uses:` steps are a runner's business and are not run; the set-up step is the
README's command that built the environment this suite runs in, and the GPU check needs CUDA:
those two are skipped, `nvidia-smi` and `cml` are stubs on PATH (`cml` records its arguments and
the comment). Slow: two runs of the ci-cpu pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.browser import check_png, chromium, page_text, snapshot
from tests.project import env as project_env
from tests.project import make_repo

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "report.yml"
SKIPPED = {"Set up (the README's command)", "Put uv on PATH", "GPU"}
PRESET = "ci-cpu"
PR = 7
CHANGE = ("unet", "upsampling", "bilinear")  # the feature branch's param change


# --- GitHub expressions: ${{ ... }} and `if:` -------------------------------------------------

_TOKEN = re.compile(r"'(?:[^']|'')*'|&&|\|\||!=|==|!|[A-Za-z_][\w-]*(?:\.(?:\*|[\w-]+))*|\S")


def _lookup(context: dict, name: str) -> Any:
    value: Any = context
    for part in name.split("."):
        if part == "*":  # `labels.*.name`: the names of all the labels
            continue
        if isinstance(value, list):
            value = [item.get(part) for item in value]
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def evaluate(expression: str, context: dict) -> Any:
    """A GitHub Actions expression, translated token by token to Python: `&&`/`||`/`!` are
    and/or/not (which return an operand, as GitHub's do), names read `context`."""
    functions = {
        "always": lambda: True,
        "cancelled": lambda: False,
        "success": lambda: True,
        "failure": lambda: False,
        "contains": lambda seq, item: item in (seq or []),
    }
    out = []
    for token in _TOKEN.findall(expression):
        if token.startswith("'"):
            out.append(repr(token[1:-1].replace("''", "'")))
        elif token in ("&&", "||"):
            out.append(" and " if token == "&&" else " or ")
        elif token == "!":
            out.append(" not ")
        elif token in ("true", "false", "null"):
            out.append({"true": "True", "false": "False", "null": "None"}[token])
        elif token in functions:
            out.append(token)
        elif re.fullmatch(r"[A-Za-z_][\w.*-]*", token):
            out.append(f"_lookup(context, {token!r})")
        else:
            out.append(token)
    code = " ".join(out)
    return eval(code, {"_lookup": _lookup, "context": context, **functions})  # noqa: S307


def substitute(value: Any, context: dict) -> str:
    def one(match: re.Match) -> str:
        result = evaluate(match[1], context)
        if isinstance(result, bool):
            return str(result).lower()
        return "" if result is None else str(result)

    return re.sub(r"\$\{\{(.*?)\}\}", one, str(value))


# --- the runner ----------------------------------------------------------------------------


def _system_python3() -> str | None:
    """The python3 that runs `python3 -m uv` in the steps: the first on PATH outside the
    project's venv that has uv (CI's `.ci/run` installed it there)."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    for candidate in [shutil.which("python3", path=path), "/usr/bin/python3"]:
        probe = [candidate, "-m", "uv", "--version"] if candidate else None
        if probe and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def _stubs(folder: Path, python3: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    scripts = {
        "python3": f'#!/bin/sh\nexec "{python3}" "$@"\n',
        "uv": f'#!/bin/sh\nexec "{python3}" -m uv "$@"\n',  # as the set-up step leaves it
        "nvidia-smi": "#!/bin/sh\necho 'CPU (nvidia-smi stub)'\n",
        # cml: one JSON line per call (its arguments), and a copy of the comment it was given
        "cml": f"""#!{sys.executable}
import json, os, shutil, sys
log = os.environ["CML_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
n = sum(1 for _ in open(log))
shutil.copy(sys.argv[-1], log + f".{{n}}.md")
""",
    }
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run_job(workspace: Path, context: dict, env: dict[str, str]) -> list[str]:
    """The report job's steps in order, in `workspace`; returns the names of those run."""
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["report"]
    assert evaluate(job["if"], context), "the report job would not run for this event"
    job_env = {k: substitute(v, context) for k, v in job.get("env", {}).items()}
    ran = []
    for step in job["steps"]:
        name = step.get("name", step.get("uses", ""))
        if "run" not in step or name in SKIPPED:
            continue
        if "if" in step and not evaluate(str(step["if"]).strip("${} "), context):
            continue
        step_env = {k: substitute(v, context) for k, v in step.get("env", {}).items()}
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=workspace,
            env={**env, **job_env, **step_env},
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        (workspace.parent / f"{workspace.name}.steps.log").open("a").write(
            f"### {name}\n{proc.stdout}\n{proc.stderr}\n"
        )
        assert proc.returncode == 0, f"step {name!r} failed:\n{proc.stdout}\n{proc.stderr}"
        ran.append(name)
    return ran


def _git(cwd: Path, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def _context(event_name: str, sha: str, ref: str, **github: Any) -> dict:
    return {
        "github": {
            "event_name": event_name,
            "sha": sha,
            "ref": ref,
            "repository": "team/unet-pipeline",
            "run_id": "1",
            **github,
        },
        "inputs": {},  # not a dispatch
        "vars": {"GPU_PRESET": PRESET},
        "secrets": {"GITHUB_TOKEN": "stub-token"},
        "needs": {"launch-runner": {"result": "skipped"}},
        "env": {"PRESET": PRESET},
    }


def _runner_env(context: dict, stubs: Path, cml_log: Path, workspace: Path) -> dict[str, str]:
    github = context["github"]
    env = project_env()
    env.update(
        PATH=f"{stubs}{os.pathsep}{env['PATH']}",
        CI="true",
        GITHUB_ACTIONS="true",
        GITHUB_EVENT_NAME=github["event_name"],
        GITHUB_SHA=github["sha"],
        GITHUB_REF=github["ref"],
        GITHUB_REPOSITORY=github["repository"],
        GITHUB_WORKSPACE=str(workspace),
        # `uv run` in the steps uses this suite's environment as it is (no sync, no new venv)
        UV_PROJECT_ENVIRONMENT=str(Path(sys.executable).parent.parent),
        UV_NO_SYNC="1",
        CML_LOG=str(cml_log),
    )
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    python3 = _system_python3()
    if python3 is None:
        pytest.skip("no python3 with uv outside the venv (`python3 -m pip install uv`)")
    tmp = tmp_path_factory.mktemp("workflow")
    stubs = _stubs(tmp / "stubs", python3)
    git_env = project_env()
    make_repo(tmp / "project", {})
    origin = tmp / "origin.git"
    _git(tmp, "clone", "-q", "--bare", str(tmp / "project"), str(origin), env=git_env)

    # 1. a push to main: the run is compared with nothing yet, then stored as the baseline
    main = tmp / "main"
    _git(tmp, "clone", "-q", str(origin), str(main), env=git_env)
    main_sha = _git(main, "rev-parse", "HEAD", env=git_env)
    push = _context("push", main_sha, "refs/heads/main")
    push_log = tmp / "cml-push.jsonl"
    push_steps = run_job(main, push, _runner_env(push, stubs, push_log, main))

    # 2. a pull request whose branch changes a param, labelled run-gpu
    pr = tmp / "pr"
    _git(tmp, "clone", "-q", str(origin), str(pr), env=git_env)
    _git(pr, "switch", "-q", "-c", "feature", env=git_env)
    params = yaml.safe_load((pr / "params.yaml").read_text())
    section, key, value = CHANGE
    params[section][key] = value
    (pr / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(pr, "commit", "-q", "-am", f"{section}.{key}: {value}", env=git_env)
    _git(pr, "push", "-q", "origin", "feature", env=git_env)
    pr_sha = _git(pr, "rev-parse", "HEAD", env=git_env)
    event = {
        "action": "labeled",
        "label": {"name": "run-gpu"},
        "pull_request": {
            "number": PR,
            "labels": [{"name": "run-gpu"}],
            "head": {"repo": {"full_name": "team/unet-pipeline"}},
        },
    }
    pull = _context("pull_request", pr_sha, f"refs/pull/{PR}/merge", event=event)
    pr_log = tmp / "cml-pr.jsonl"
    pr_steps = run_job(pr, pull, _runner_env(pull, stubs, pr_log, pr))
    return {
        "tmp": tmp,
        "origin": origin,
        "main": main,
        "main_sha": main_sha,
        "pr": pr,
        "push_steps": push_steps,
        "pr_steps": pr_steps,
        "push_calls": [json.loads(line) for line in push_log.read_text().splitlines()],
        "pr_calls": [json.loads(line) for line in pr_log.read_text().splitlines()],
        "push_comment": Path(f"{push_log}.1.md").read_text(),
        "pr_comment": Path(f"{pr_log}.1.md").read_text(),
        "git_env": git_env,
    }


def _table(comment: str, title: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after the heading `title`."""
    after = comment.split(title, 1)[1]
    rows = []
    for line in after.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows


def test_expressions_read_like_githubs():
    ctx = _context("push", "abc", "refs/heads/main")
    assert evaluate("inputs.preset || vars.GPU_PRESET || 'drive-gpu'", ctx) == PRESET
    assert evaluate("github.event_name == 'push' && !cancelled()", ctx) is True
    assert evaluate("github.event.pull_request.number", ctx) is None
    labels = {"event": {"pull_request": {"labels": [{"name": "run-gpu"}, {"name": "x"}]}}}
    ctx["github"].update(labels)
    assert evaluate("contains(github.event.pull_request.labels.*.name, 'run-gpu')", ctx)
    assert substitute("a-${{ github.sha }}-${{ inputs.x }}", ctx) == "a-abc-"


def test_a_push_to_main_runs_and_stores_the_baseline(runs):
    assert "Store the baseline (runs on main)" in runs["push_steps"]
    assert "Benchmarks" not in runs["push_steps"]  # a dispatch's option
    # nothing to compare with yet, and the comment says how a baseline comes about
    assert "No baseline of `ci-cpu` on main yet" in runs["push_comment"]
    (call,) = runs["push_calls"]
    assert call[:2] == ["comment", "update"] and "--watermark-title=GPU report" in call
    assert not any(arg.startswith("--target") for arg in call)  # the commit, not a PR
    env, origin = runs["git_env"], runs["origin"]
    tip = _git(origin, "rev-parse", "baseline/ci-cpu", env=env)
    assert _git(origin, "rev-parse", f"{tip}^", env=env) == runs["main_sha"]
    files = _git(origin, "ls-tree", "-r", "--name-only", tip, env=env).splitlines()
    for path in ("dvc.lock", "reports/unet/metrics.json", "reports/unetpp/epochs.csv"):
        assert path in files
    # on top of main: the run's files only; no data, weights, spreadsheets or MLflow store
    added = _git(origin, "diff", "--name-only", runs["main_sha"], tip, env=env).splitlines()
    assert {"dvc.lock", "params.yaml", "reports/pruning.json", "reports/report.md"} <= set(added)
    for path in added:
        assert path in ("dvc.lock", "params.yaml") or path.startswith("reports/"), path
        assert not path.endswith((".pt", ".onnx", ".xlsx", ".db")), path
    params = yaml.safe_load(_git(origin, "show", f"{tip}:params.yaml", env=env))
    assert params["epochs"] == 2 and params["unet"]["base_channels"] == 4  # ci-cpu's
    # main itself and the workspace's branch are untouched
    assert _git(origin, "rev-parse", "main", env=env) == runs["main_sha"]
    assert _git(runs["main"], "branch", "--show-current", env=env) == "main"


def test_the_pull_requests_comment_compares_its_run_with_mains_baseline(runs):
    comment = runs["pr_comment"]
    assert "Compared with `baseline/ci-cpu`: baseline ci-cpu: the run of " in comment
    metrics = _table(comment, "### Metrics: this run vs main")
    header = [c.replace(" ", "") for c in metrics[0]]
    assert header[:4] == ["Path", "Metric", "origin/baseline/ci-cpu", "workspace"], header
    rows = {(r[0], r[1]): r for r in metrics[2:]}
    for arch in ("unet", "unetpp"):
        row = rows[(f"reports/{arch}/metrics.json", "miou")]
        old, new = float(row[2]), float(row[3])  # both a number: nothing missing on either side
        assert 0 <= old <= 1 and 0 <= new <= 1
    # the headline only; every metric (pruned depths, per class, cost) folded below it
    assert {r[1] for r in metrics[2:]} <= {"miou", "dice", "f1", "auc_roc", "global_accuracy"}
    every = comment.split("<details>", 1)[1].split("</details>", 1)[0]
    assert "| reports/pruning.json" in every and "L1.miou" in every and "latency_ms" in every
    section, key, value = CHANGE
    params = _table(comment, "### Params that differ from main")
    (changed,) = [r for r in params[2:] if r[1] == f"{section}.{key}"]
    assert changed[0] == "params.yaml" and changed[2:4] == ["transpose", value]
    assert len(params) == 3, "only the branch's change differs: the preset is in both"
    assert (runs["pr"] / "reports" / "plots_diff" / "index.html").is_file()


def test_one_comment_on_the_pull_request_with_the_watermark(runs):
    (call,) = runs["pr_calls"]
    assert call == [
        "comment",
        "update",
        f"--target=pr/{PR}",
        "--watermark-title=GPU report",
        "reports/cml_comment.md",
    ]
    assert "Store the baseline (runs on main)" not in runs["pr_steps"]


def test_the_comments_images_resolve_from_its_folder(runs):
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", runs["pr_comment"])
    assert len(images) >= 2  # curves, pruning trade-off, panels
    for src in images:
        assert (runs["pr"] / "reports" / src).is_file(), src


def render(markdown: str) -> str:
    """The comment as a reviewer's browser shows it: CommonMark with GitHub's tables."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:24px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "img{max-width:100%}"
    )
    # after load, record each image's decoded width: 0 means broken
    script = (
        "window.addEventListener('load',()=>{document.body.dataset.images="
        "[...document.images].map(i=>i.naturalWidth).join(',')})"
    )
    head = f"<head><style>{style}</style><script>{script}</script></head>"
    return f"<html>{head}<body>{body}</body></html>"


def test_the_comment_reads_well_in_a_browser(runs):
    if chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): no screenshot")
    page = runs["pr"] / "reports" / "cml_comment.html"  # beside the comment: same image paths
    page.write_text(render(runs["pr_comment"]))
    png = runs["tmp"] / "cml_comment.png"
    dom = snapshot(page, png, 1100, 1600, wait_ms=3000)
    check_png(png, 1100, 1600)
    widths = re.search(r'data-images="([\d,]*)"', dom)
    assert widths, "the page's load handler did not run"
    assert all(int(w) > 0 for w in widths[1].split(",")), f"a broken image: {widths[1]}"
    assert dom.count("<table") >= 3  # metrics, params, the report's own tables
    assert "<th>Metric</th>" in dom and "<th>Param</th>" in dom
    assert "|---" not in page_text(dom).replace(" ", ""), "a table was left as text"
