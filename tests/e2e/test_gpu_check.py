"""bench/gpu_check.sh, the one-run GPU check: its dry run on the CPU with tiny sizes goes through
every step the GPU run takes (tests, benchmarks, the preset's stages with MLflow and DVC absent,
the summary), so the scarce GPU run cannot fail on a typo. The dry runs need the real archives
(../shared/datasets/) and skip without them; the argument checks run everywhere."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATASETS = ROOT.parent / "shared" / "datasets"
SCRIPT = ["bash", "bench/gpu_check.sh"]


def _run(args: list[str], out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SCRIPT, *args],
        cwd=ROOT,
        env={**os.environ, "OUT": str(out), **env},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["cityscapes"], "dataset must be drive or camvid, not 'cityscapes'"),
        (["drive", "--fast"], "the second argument may only be --dry-run, not '--fast'"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, args, message):
    proc = _run(args, tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu_check: {message}"
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_archive_is_named(tmp_path):
    proc = _run(["drive", "--dry-run"], tmp_path / "out", GPU_CHECK_SOURCE=str(tmp_path / "x.zip"))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"gpu_check: {tmp_path / 'x.zip'} not found")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dataset, archive", [("drive", "DRIVE.zip"), ("camvid", "CamVid.zip")])
def test_dry_run_takes_every_step(tmp_path, dataset, archive):
    source = DATASETS / archive
    if not source.is_file():
        pytest.skip(f"{source} not found: the dry run needs ../shared/datasets/{archive}")
    out = tmp_path / "out"
    proc = _run([dataset, "--dry-run"], out, GPU_CHECK_SOURCE=str(source))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    lines = summary.split("| step | how it ended |\n|---|---|\n", 1)[1].split("\n\n")[0]
    ended = dict(line.strip("| ").split(" | ") for line in lines.splitlines())
    expected = ["CUDA tests", "params", "download", "preprocess", "train_unet", "train_unetpp"]
    expected += ["prune", "report"]
    if dataset == "drive":
        expected += ["train_throughput", "inference_latency"]
    assert sorted(ended) == sorted(expected)
    assert all(how.startswith("ok,") for how in ended.values()), ended
    for model in ("UNet", "UNet++ L4", "pruned L1", "pruned L4"):
        assert f"| {model} |" in summary
    # CamVid: the test IoU of each of the 11 classes; DRIVE: F1 and AUC in the main table
    assert ("| model | Sky | Building | Pole |" in summary) == (dataset == "camvid")
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"reports/report.md", "reports/pruning.csv", "bench/params.yaml"} <= names
    assert ("bench/train_throughput.md" in names) == (dataset == "drive")
    assert (out / "log.txt").read_text().count("=== ") >= 2 * len(expected)


def test_steps_past_the_budget_are_skipped_and_the_summary_still_written(tmp_path):
    fake = tmp_path / "DRIVE.zip"
    fake.write_bytes(b"")  # never read: no step gets to run
    out = tmp_path / "out"
    proc = _run(["drive", "--dry-run"], out, GPU_CHECK_SOURCE=str(fake), GPU_CHECK_BUDGET="20")
    assert proc.returncode == 0, proc.stdout[-2000:]
    summary = (out / "summary.md").read_text()
    for name in ("CUDA tests", "train_throughput", "inference_latency", "params"):
        assert f"| {name} | SKIPPED (out of the 20s budget), 0s |" in summary
    assert "| download |" not in summary  # the stages need the params step
