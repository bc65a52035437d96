"""Faults around the work, not in it: an output path that is someone's folder, a full disk, a
`dvc repro` killed while its stage runs, temporaries that killed stages left, params that are
not numbers. Each ends in one line and a non-zero exit, with nothing lost and nothing left.
(The cases and their messages are listed in tests/unit/stages/test_attacks.py.)"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import paths
from pipeline.core.common import atomic_path, disk_full, sweep_stale_temporaries
from pipeline.core.config import parse_params
from tests.unit.data.test_archives import error_of

PROJECT = Path(__file__).resolve().parents[2]


def a_folder_of_user_files(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"unet.pt": "weights", "README.md": "notes"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


def still_there(folder: Path, files: dict[str, str]) -> bool:
    return all((folder / name).read_text() == text for name, text in files.items())


# --- an output path that is an existing folder is refused, never replaced --------------------


def test_a_file_output_whose_path_is_a_folder_leaves_the_folder_as_it_was(tmp_path):
    files = a_folder_of_user_files(tmp_path / "models")

    def write():
        with atomic_path(tmp_path / "models") as tmp:
            tmp.write_bytes(b"onnx")

    message = error_of(write)
    assert message == (
        f"{tmp_path / 'models'}: a folder is in the way of the file to write there; move it "
        "away (or choose another path) and run again"
    )
    assert still_there(tmp_path / "models", files)
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no temporary left


def test_a_folder_output_whose_path_is_a_file_leaves_the_file(tmp_path):
    (tmp_path / "raw").write_text("user's")

    def write():
        with atomic_path(tmp_path / "raw") as tmp:
            tmp.mkdir()

    assert "a file is in the way of the folder" in error_of(write)
    assert (tmp_path / "raw").read_text() == "user's"


def test_export_to_a_folder_is_refused_before_loading_anything(tmp_path):
    from pipeline.export import main

    files = a_folder_of_user_files(tmp_path / "models")
    argv = ["--model", str(tmp_path / "models" / "unet.pt"), "--out", str(tmp_path / "models")]
    message = error_of(lambda: main(argv))
    assert message == f"--out {tmp_path / 'models'}: is a folder; give the path of a file to write"
    assert still_there(tmp_path / "models", files)


def test_plan_json_to_a_folder_or_under_a_file_is_refused_before_the_timing(tmp_path):
    from pipeline.plan import main

    files = a_folder_of_user_files(tmp_path / "mine")
    message = error_of(lambda: main(["--json", str(tmp_path / "mine")]))
    assert message == f"--json {tmp_path / 'mine'}: is a folder; give the path of a file to write"
    assert still_there(tmp_path / "mine", files)
    under_a_file = tmp_path / "mine" / "README.md" / "plan.json"
    assert "not writable" in error_of(lambda: main(["--json", str(under_a_file)]))
    assert error_of(lambda: main(["--seconds", "nan"])).startswith("--seconds nan: must be")


# --- a full disk is one line, wherever it happens --------------------------------------------


def test_a_full_disk_anywhere_in_an_errors_chain_is_named():
    try:
        try:
            raise OSError(28, "No space left on device", "data/processed/x.png")
        except OSError as exc:
            raise RuntimeError("writing the crops failed") from exc
    except RuntimeError as chained:
        message = disk_full(chained)
    assert message == (
        "data/processed/x.png: no space left on the device; the outputs of earlier runs are "
        "intact: free some space (df -h) and run again"
    )
    store = Exception("(sqlite3.OperationalError) database or disk is full")
    assert disk_full(store).startswith("the disk: no space left on the device (or the MLflow")
    assert disk_full(ValueError("lr")) is None


def cli(body: str) -> subprocess.CompletedProcess:
    """A command line whose `main(argv)` is `body`, run through run_cli as every stage is."""
    code = (
        "import os, signal\n"
        "from pathlib import Path\n"
        "from pipeline.core.common import atomic_path, run_cli\n"
        f"def main(argv):\n{body}\n"
        "run_cli(main)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_stage_that_fills_the_disk_exits_1_with_one_line():
    # /dev/full answers every write with ENOSPC, as a full disk does
    proc = cli("    with open('/dev/full', 'w') as f:\n        f.write('x' * 10000)")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "no space left on the device" in proc.stderr.strip().splitlines()[-1]


# --- params that are not finite numbers -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "data"),
    [
        ("train.weight_decay", {"train": {"weight_decay": math.inf}}),
        ("loss.ce_weight", {"loss": {"ce_weight": math.inf}}),
        ("train.min_lr", {"train": {"min_lr": math.inf}}),
        ("train.warmup_epochs", {"train": {"warmup_epochs": math.inf}}),
        ("lr", {"lr": math.nan}),
    ],
)
def test_inf_and_nan_are_refused_by_validation_naming_the_key(key, data):
    message = error_of(lambda: parse_params(data))
    assert message.startswith(f"params.yaml: {key}: Input should be a finite number")


def test_a_huge_warmup_stays_a_warmup_over_the_whole_run():
    from pipeline.engine.optim import lr_factor

    params = parse_params({"epochs": 2, "train": {"warmup_epochs": 1e308}})
    assert lr_factor(params, 0, steps_per_epoch=10) == pytest.approx(1 / 20)


def test_a_class_name_no_mapped_value_produces_is_refused():
    folder = {"class_names": ["background", "foreground", "extra"], "mapping": {0: 0, 255: 1}}
    data = {"dataset": {"name": "folder", "source": "x", "folder": folder}}
    assert error_of(lambda: parse_params(data)) == (
        "params.yaml: dataset.folder.class_names: no raw value in dataset.folder.mapping "
        "{0: 0, 255: 1} gives class 'extra': map a label value to each class, or drop the name"
    )


# --- a stage dies with its dvc process; the re-run finds no temporaries ----------------------

STAGE = """
import sys, time
from pathlib import Path
from pipeline.core import paths
from pipeline.stages import lifecycle

def main(argv):
    Path(sys.argv[1]).write_text("running")
    time.sleep(60)

with paths.rooted(Path(sys.argv[2])):
    lifecycle.run(main)
"""


def started_stage(tmp_path: Path, keep_shell: bool) -> tuple[subprocess.Popen, Path]:
    """`dvc` (a Python process) running a stage through `bash -c`, as DVC does; bash execs a
    lone command, so `keep_shell` adds a second one to keep bash as the stage's parent."""
    root = tmp_path / "project"
    (root / ".dvc").mkdir(parents=True)
    (tmp_path / "stage.py").write_text(STAGE)
    marker = tmp_path / "running"
    command = f"{sys.executable} {tmp_path / 'stage.py'} {marker} {root}"
    command += "; true" if keep_shell else ""
    dvc = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess; subprocess.run(['bash', '-c', {command!r}])"],
        cwd=PROJECT,
        env={**os.environ, "DVC_STAGE": "prune"},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline and dvc.poll() is None, "the stage did not start"
        time.sleep(0.05)
    return dvc, root


def stage_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "stage.py"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
@pytest.mark.parametrize("keep_shell", [False, True], ids=["exec", "shell"])
def test_a_stage_stops_when_its_dvc_process_is_killed(tmp_path, keep_shell):
    dvc, root = started_stage(tmp_path, keep_shell)
    stage = [p for p in stage_pids() if str(tmp_path) in Path(f"/proc/{p}/cmdline").read_text()]
    assert stage, "no stage process"
    assert "prune (pid" in (root / ".dvc" / "tmp" / "pipeline-stage.owner").read_text()
    dvc.kill()
    dvc.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in stage):
        assert time.monotonic() < deadline, "the orphaned stage is still running"
        time.sleep(0.1)


def test_a_second_stage_waits_for_the_lock_then_refuses_in_one_line(tmp_path, monkeypatch):
    from filelock import FileLock

    from pipeline.stages import lifecycle

    (tmp_path / ".dvc").mkdir()
    monkeypatch.setenv("DVC_STAGE", "report")
    monkeypatch.setattr(lifecycle, "LOCK_WAIT_S", 0.2)
    with paths.rooted(tmp_path):
        paths.STAGE_LOCK.parent.mkdir(parents=True)
        paths.STAGE_LOCK.with_suffix(".owner").write_text("prune (pid 4242)\n")
        with FileLock(paths.STAGE_LOCK):  # an orphan of a killed run, still writing
            message = error_of(lambda: lifecycle.guarded("report").__enter__())
    assert message == (
        f"{tmp_path / '.dvc/tmp/pipeline-stage.lock'}: held by prune (pid 4242) of this "
        "project, still running; wait for it to end (or stop it) and run again"
    )


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_every_stage_sweeps_what_killed_stages_left(tmp_path, caplog):
    dead, alive = dead_pid(), os.getpid()
    reports, models = tmp_path / "reports", tmp_path / "models"
    left = [
        reports / f".learning_curves.{dead}.k2j_x9.tmp.png",  # report killed writing a plot
        models / f".onnx.{dead}.a1b2c3.tmp",  # prune killed during its ONNX export
        reports / "unet" / f".metrics.{dead}.zz.tmp.json",
    ]
    kept = [
        reports / f".panels.{alive}.qq.tmp.png",  # a live writer's
        tmp_path / "data" / "raw" / f".photo.{dead}.ab.tmp.png",  # the user's dataset copy
        reports / ".notes.tmp",
    ]
    for p in [*left, *kept]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.mkdir() if p.suffix == ".tmp" and "onnx" in p.name else p.write_text("x")
    with caplog.at_level(logging.INFO):
        sweep_stale_temporaries(models, reports, shallow=(tmp_path / "data",))
    assert [p for p in left if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert caplog.text.count("left by an interrupted run") == len(left)


def test_guarded_is_a_no_op_outside_dvc(tmp_path, monkeypatch):
    from pipeline.stages import lifecycle

    monkeypatch.delenv("DVC_STAGE", raising=False)
    with paths.rooted(tmp_path), lifecycle.guarded("report"):
        pass
    assert not (tmp_path / ".dvc").exists()


# --- a tracking server nobody runs ------------------------------------------------------------


def test_a_tracking_server_that_does_not_answer_is_one_line_at_once():
    from pipeline.tracking.runs import init_store
    from tests.unit.data.test_archives import closed_port

    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    message = error_of(lambda: init_store(parse_params({"mlflow": {"tracking_uri": uri}})))
    assert time.monotonic() - started < 10  # MLflow's client retried for about 4 minutes
    assert message.startswith(f"MLflow tracking server {uri}: nothing answers at 127.0.0.1:")
    assert message.endswith("or set mlflow.enabled: false")


# --- SIGTERM (a cancelled CI job) --------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="signals are POSIX")
def test_sigterm_mid_write_exits_143_in_one_line_and_leaves_no_temporary(tmp_path):
    proc = cli(
        f"    with atomic_path(Path({str(tmp_path / 'out.bin')!r})) as tmp:\n"
        "        tmp.write_bytes(b'half')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        tmp.write_bytes(b'whole')"
    )
    assert proc.returncode == 143
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith("terminated (SIGTERM); the outputs of earlier runs are intact")
    )
    assert list(tmp_path.iterdir()) == []  # no output, no temporary


def test_a_resume_state_that_is_not_one_starts_afresh_with_a_warning(tmp_path, caplog):
    import torch

    from pipeline.engine.checkpoint import load_resume

    path = tmp_path / "unet.pt"
    torch.save(torch.zeros(3), path)  # saved there by hand: was AttributeError
    with caplog.at_level(logging.WARNING):
        assert load_resume(path, fingerprint="abc") is None
    assert f"{path}: not a resume state (Tensor); starting afresh" in caplog.text


@pytest.mark.parametrize(("value", "limit"), [("", 178_956_970), ("0", 0), ("5000", 5000)])
def test_pipeline_max_image_pixels_sets_predicts_limit(monkeypatch, value, limit):
    from pipeline.serving.segmenter import max_pixels

    monkeypatch.setenv("PIPELINE_MAX_IMAGE_PIXELS", value)
    assert max_pixels() == limit


def test_a_pipeline_max_image_pixels_that_is_no_number_is_one_line(monkeypatch):
    from pipeline.serving.segmenter import max_pixels

    monkeypatch.setenv("PIPELINE_MAX_IMAGE_PIXELS", "abc")
    assert (
        error_of(max_pixels) == "PIPELINE_MAX_IMAGE_PIXELS='abc': a number of pixels (0 = no limit)"
    )
