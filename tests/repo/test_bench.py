"""The benchmark scripts (bench/): each main runs with tiny settings on the CPU and writes its
JSON and markdown; the FLOP counter agrees with the analytic count of a convolution; the
classic UNet has the paper's 31.0M parameters. Seconds, not minutes: no timing is asserted."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import yaml
from torch import nn

from bench import cpu_step, inference_latency, loader_throughput, train_throughput
from bench.benchlib import markdown_table, out_stem, train_step_flops
from pipeline.core import paths
from pipeline.core.common import PipelineError
from pipeline.core.config import load_params
from pipeline.engine.numerics import cpu_bf16, numerics
from tests.unit.engine.test_training import TINY
from tests.unit.engine.test_training import data as data  # the tiny preprocessed project fixture

ENV_KEYS = {"devices", "date", "commit", "command", "torch", "rows"}


def _outputs(stem, title: str) -> tuple[dict, str]:
    report = json.loads(stem.with_suffix(".json").read_text())
    md = stem.with_suffix(".md").read_text()
    assert set(report) >= ENV_KEYS
    assert report["benchmark"] == title
    assert md.startswith(f"### {title}")
    for item in ("- device: ", report["commit"], report["date"], report["command"]):
        assert item in md
    assert "\n\n| " in md  # the table, after a blank line
    return report, md


def test_conv_flops_match_the_analytic_count():
    b, cin, cout, k, h, w = 2, 3, 8, 3, 16, 16
    forward = 2 * b * cout * h * w * cin * k * k  # 2 FLOPs per multiply-add
    conv = nn.Conv2d(cin, cout, k, padding=1)
    # backward: the weight gradient only (the input needs no gradient)
    assert train_step_flops(conv, (b, cin, h, w)) == 2 * forward
    # a second conv also computes its input's gradient: 3x its forward
    forward2 = 2 * b * cout * h * w * cout * k * k
    two = nn.Sequential(nn.Conv2d(cin, cout, k, padding=1), nn.Conv2d(cout, cout, k, padding=1))
    assert train_step_flops(two, (b, cin, h, w)) == 2 * forward + 3 * forward2


def test_classic_unet_has_the_papers_parameter_count():
    model = train_throughput.build_unet(64, 4)
    assert sum(p.numel() for p in model.parameters()) == 31_037_698
    ups = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 4 and all(u.kernel_size == (2, 2) for u in ups)


def test_peak_table_is_unknown_off_gpu():
    assert train_throughput.peak_bf16_tflops(torch.device("cpu")) is None


def test_train_throughput_main(tmp_path):
    stem = tmp_path / "tt"
    args = "--device cpu --size 32 --batch 2 --steps 1 --windows 2 --warmup 1 --base 4 --depth 2"
    result = train_throughput.main([*args.split(), "--out", str(stem) + ".json"])
    report, md = _outputs(stem, "Training throughput")
    assert report["rows"] == json.loads(json.dumps(result["rows"]))
    assert [r["mode"] for r in report["rows"]] == ["pipeline", "plain"]
    flops = train_step_flops(train_throughput.build_unet(4, 2), (2, 3, 32, 32))
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and row["achieved_tflops"] > 0
        assert row["tflops_per_step"] == pytest.approx(flops / 1e12)
        assert row["pct_of_bf16_peak"] is None  # no known peak on a CPU
        assert row["precision"] == "fp32" and not row["compiled"]
    assert "| pipeline | fp32 |" in md and "| plain | fp32 |" in md


def test_inference_latency_main(tmp_path):
    stem = tmp_path / "il"
    args = "--devices cpu --size 32 --runs 1 --warmup 0 --base 4 --depth 2"
    inference_latency.main([*args.split(), "--out", str(stem)])
    report, md = _outputs(stem, "Inference latency")
    rows = report["rows"]
    assert [r["model"] for r in rows] == ["UNet++ L1", "UNet++ L2", "UNet"]
    assert rows[0]["params"] < rows[1]["params"]
    assert all(r["latency_ms"] > 0 and r["gflops_per_image"] > 0 for r in rows)
    assert "| UNet++ L1 |" in md


@pytest.mark.slow
def test_tracking_requests_main_times_a_plain_and_a_basic_auth_server(tmp_path):
    from bench import tracking_requests

    stem = tmp_path / "tr"
    result = tracking_requests.main(["--no-pipeline", "--runs", "2", "--out", str(stem)])
    report, md = _outputs(stem, "Tracking server requests")
    assert report["rows"] == json.loads(json.dumps(result["rows"]))
    rows = report["rows"]
    assert [r["what"] for r in rows] == ["one request, plain server", "one request, basic auth"]
    assert all(r["count"] == 1 and r["ms"] > 0 for r in rows)
    assert "| one request, basic auth | 1 |" in md


def test_loader_throughput_main(data, tmp_path):
    paths.PARAMS.write_text(yaml.safe_dump(TINY))
    stem = tmp_path / "lt"
    args = "--device cpu --workers 0 --epochs 2 --steps 1 --windows 1 --arch unetpp"
    loader_throughput.main([*args.split(), "--out", str(stem)])
    report, md = _outputs(stem, "Data loader vs training step")
    (row,) = report["rows"]
    assert row["workers"] == 0 and row["patches"] == report["patches"] > 0
    assert row["loader_steady"] > 0 and row["step"] > 0
    assert row["ratio"] == pytest.approx(row["loader_steady"] / row["step"])
    assert row["verdict"] in md


def test_loader_throughput_without_data_says_what_to_run(project, capsys):
    with pytest.raises(SystemExit) as info:
        loader_throughput.main(["--device", "cpu"])
    assert "dvc repro preprocess" in str(info.value)


def test_helpers():
    assert out_stem("x/y.json", "n").as_posix() == "x/y"
    assert out_stem(None, "n").name == "n"
    table = markdown_table([{"a": 1234, "b": 0.5, "c": None}], {"a": "A", "b": "B", "c": "C"})
    assert table.splitlines() == ["| A | B | C |", "|---|---|---|", "| 1,234 | 0.5 | - |"]


def test_stability_late_drop_by_hand():
    import pandas as pd

    from bench.stability import late_drop

    # best so far 0.8 then 0.82; over the second half (epochs 3..5) the worst fall is 0.22
    assert late_drop(pd.Series([0.5, 0.8, 0.7, 0.82, 0.6])) == pytest.approx(0.22)
    assert late_drop(pd.Series([0.5, 0.6, 0.7, 0.8])) == 0.0  # still improving
    assert late_drop(pd.Series([0.7])) == 0.0


@pytest.mark.parametrize("vary_data", [False, True])
def test_stability_varies_the_run_seed_and_the_data_only_when_asked(
    tmp_path, monkeypatch, vary_data
):
    """Each seed runs the stages in its own copy with MLflow off; the data's seed stays as in
    params.yaml unless --vary-data."""
    from bench import stability

    seen = []

    def fake_run(cmd, cwd, **kwargs):
        params = yaml.safe_load((cwd / "params.yaml").read_text())
        seen.append((cmd[2:], params["seed"], params["dataset"]["seed"], params["mlflow"]))
        for arch in ("unet", "unetpp"):
            out = cwd / "reports" / arch
            out.mkdir(parents=True, exist_ok=True)
            metrics = {"miou": 0.8, "best_epoch": 3, "train_seconds": 1.0}
            (out / "metrics.json").write_text(json.dumps(metrics))
            (out / "epochs.csv").write_text("epoch,val_miou\n1,0.7\n2,0.8\n3,0.75\n")

    monkeypatch.setattr(stability.subprocess, "run", fake_run)
    row = stability.run_seed(7, {"lr": 0.01}, tmp_path, vary_data)
    assert [s[0] for s in seen] == [list(stage) for stage in stability.STAGES]
    data_seed = 7 if vary_data else yaml.safe_load(paths.PARAMS.read_text())["dataset"]["seed"]
    assert {s[1:3] for s in seen} == {(7, data_seed)}
    assert all(s[3]["enabled"] is False for s in seen)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["lr"] == 0.01
    assert row == {
        "seed": 7,
        **{f"{a}_miou": 0.8 for a in ("unet", "unetpp")},
        **{f"{a}_best_epoch": 3 for a in ("unet", "unetpp")},
        **{f"{a}_late_drop": 0.05 for a in ("unet", "unetpp")},
        **{f"{a}_seconds": 1.0 for a in ("unet", "unetpp")},
    }


def test_cpu_step_main(project, tmp_path):
    paths.PARAMS.write_text(yaml.safe_dump(TINY))
    stem = tmp_path / "cs"
    args = ["--steps", "1", "--windows", "1", "--warmup", "1", "--check", "2", "--out", str(stem)]
    cpu_step.main([*args, "--variants", *[v for v in cpu_step.VARIANTS if "compile" not in v]])
    report, md = _outputs(stem, cpu_step.TITLE)
    rows = report["rows"]
    assert list(cpu_step.VARIANTS)[0] == "fp32"
    assert [(r["arch"], r["variant"]) for r in rows] == [
        (arch, v) for arch in ("unet", "unetpp") for v in cpu_step.VARIANTS if "compile" not in v
    ]
    for row in rows:
        assert row["step_ms"] > 0 and row["speedup"] > 0
        assert row["identical"] == (row["first_diff"] is None)
        assert row["compile_s"] is None and row["graph_breaks"] is None
    fp32 = [r for r in rows if r["variant"] == "fp32"]
    # the pipeline's CPU step repeats itself bit for bit: the reference the others are held to
    assert all(r["identical"] and r["speedup"] == 1 and r["loss_rel_diff"] == 0 for r in fp32)
    assert "| unetpp | bf16 |" in md
    # `auto` is what train.amp auto runs on this CPU, whichever that is
    auto = next(r for r in rows if r["variant"] == "auto")
    assert auto["numerics"] == numerics("auto", True, torch.device("cpu")).describe()


@pytest.mark.slow
def test_cpu_step_times_the_compiled_step_and_lists_its_graph_breaks(project, tmp_path):
    paths.PARAMS.write_text(yaml.safe_dump(TINY))
    stem = tmp_path / "cs"
    args = ["--steps", "1", "--windows", "1", "--warmup", "1", "--check", "2", "--out", str(stem)]
    cpu_step.main([*args, "--archs", "unet", "--variants", "fp32", "auto_compile"])
    report, _ = _outputs(stem, cpu_step.TITLE)
    compiled = report["rows"][1]
    assert compiled["variant"] == "auto_compile" and compiled["compile_s"] > 0
    assert compiled["graph_breaks"] == "0"  # the models compile to one graph
    assert compiled["numerics"].endswith(
        ", torch.compile (CPU: " + (cpu_bf16() or "no native bf16") + ")"
    )


def test_cpu_step_wants_fp32_first(project):
    with pytest.raises(SystemExit):
        cpu_step.main(["--variants", "bf16", "fp32"])


def test_startup_set_overrides_params_as_dvc_exp_run_does(tmp_path):
    from bench import startup

    repo = tmp_path / "clone"
    repo.mkdir()
    params = repo / "params.yaml"
    params.write_text((startup.ROOT / "params.yaml").read_text())  # the repo's own
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "p", "--allow-empty"], cwd=repo, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "params"], cwd=repo, check=True)

    startup.override(params, ["train.amp=bf16", "epochs=2"])
    got = load_params(params)
    assert got.train.amp == "bf16" and got.epochs == 2
    assert "# Every key here is validated" in params.read_text()  # DVC's -S keeps comments
    # each call starts from the committed file: overrides do not pile up
    startup.override(params, ["epochs=3"])
    assert load_params(params).train.amp == "auto" and load_params(params).epochs == 3

    with pytest.raises(SystemExit) as info:
        startup.override(params, ["train.amp=fp64"])
    assert str(info.value).startswith("--set train.amp=fp64: ") and "amp" in str(info.value)
    assert "\n" not in str(info.value)


def test_startup_baseline_sets_the_two_runs_side_by_side(tmp_path):
    from bench import startup

    def run(median, unet, unetpp, miou, **extra):
        return {"median_s": median, "epochs_median_s": {"unet": unet, "unetpp": unetpp},
                "unet_test_miou": miou, "unetpp_test_miou": miou + 0.01, **extra}  # fmt: skip

    before = tmp_path / "before.json"
    before.write_text(json.dumps(run(150.0, 30.0, 60.0, 0.88, commit="abc", date="d")))
    assert startup.versus(None, run(1, 1, 1, 0)) == []
    (line,) = startup.versus(before, run(100.0, 15.0, 30.0, 0.87, numerics="bf16"))
    assert "`dvc repro` 150.0s -> 100.0s (**x1.50**)" in line
    assert "the epochs 90.0s -> 45.0s (x2.00)" in line
    assert "numerics: not recorded" in line and "UNet 0.8800 -> 0.8700" in line


def test_scale_runs_the_data_stages_on_n_synthetic_images(tmp_path):
    from bench import scale

    stem = tmp_path / "scale"
    argv = ["--images", "8", "--size", "96", "--crop-size", "64", "--patches", "6"]
    argv += ["--preprocess-workers", "1", "2"]
    scale.main([*argv, "--keep", str(tmp_path / "work"), "--out", str(stem)])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    stages = ["download", "preprocess (1 worker)", "preprocess (2 workers)", "train_unet"]
    assert [r["stage"] for r in rows] == stages
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 10 for r in rows)
    assert rows[2]["peak_rss_mb"] > rows[1]["peak_rss_mb"]  # the workers were counted
    train = rows[-1]
    assert 0 < train["first_step_s"] < train["seconds"]  # its "data ready" line was seen
    project = tmp_path / "work/project"
    manifest = json.loads((project / "data/processed/manifest.json").read_text())
    assert sum(len(s) for s in manifest["splits"].values()) == 8
    assert len(list((project / "data/processed/train/images").glob("*.npy"))) == len(
        manifest["splits"]["train"]
    )


def test_the_readme_picture_keeps_the_title_and_starts_at_a_heading():
    """bench/report_picture.py: the README's picture leaves the long setup tables out."""
    from bench.report_picture import from_heading

    html = "<h1>UNet vs UNet++</h1><h2>Setup</h2><table/><h2>Test metrics</h2><p>x</p>"
    assert (
        from_heading(html, "Test metrics") == "<h1>UNet vs UNet++</h1><h2>Test metrics</h2><p>x</p>"
    )
    with pytest.raises(PipelineError, match="no such heading in the report .it has: Setup, Test"):
        from_heading(html, "Results")


def test_the_readme_picture_is_cut_below_its_content(tmp_path):
    from PIL import Image

    from bench.report_picture import BROWSERS, screenshot, trimmed

    page = Image.new("RGB", (40, 400), "white")
    page.putpixel((5, 100), (0, 0, 0))
    assert trimmed(page, margin=10).size == (40, 111)
    if not any(shutil.which(b) for b in BROWSERS):
        pytest.skip("no chromium: the screenshot itself is not taken")
    out = tmp_path / "report.png"
    screenshot("<h1>UNet vs UNet++</h1><p>text</p>", out, 320, 1000)
    assert Image.open(out).width == 320 and Image.open(out).height < 1000
