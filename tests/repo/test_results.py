"""bench/results.py: a finished run's figures collected from its own outputs (checked against
dvc.lock) and the timed `dvc repro` log, never typed; reports/results/README.md regenerated."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import yaml

from bench import results
from pipeline.core.common import PipelineError
from tests.project import PROJECT

METRICS = {
    "miou": 0.83, "f1": 0.81, "auc_roc": 0.978, "global_accuracy": 0.96, "dice": 0.81,
    "iou_background": 0.95, "iou_vessel": 0.7, "best_epoch": 9, "params": 1000,
    "gflops": 1.5, "latency_ms": 120.0, "input": "3x592x576", "positive_class": "vessel",
}  # fmt: skip
LOG = """\
100.000 $ python -m dvc repro
100.500 Running stage 'download':
104.000 Running stage 'preprocess':
110.000 Running stage 'train_unet':
250.000 Running stage 'train_unetpp':
600.000 Running stage 'prune':
660.000 Running stage 'report':
680.500 exit 0
"""


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def finished_run(project):
    """The outputs of a DRIVE run and the dvc.lock that records them."""
    (project / "params.yaml").write_text("epochs: 7\n")
    reports = project / "reports"
    outs = {}
    for arch, shift in (("unet", 0.0), ("unetpp", 0.01)):
        path = reports / arch / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({**METRICS, "miou": METRICS["miou"] + shift}))
        outs[f"reports/{arch}/metrics.json"] = path
    rows = [{"depth": k, "miou": 0.7 + k / 100, "f1": 0.7, "params": 10 * k, "gflops": 0.1 * k,
             "latency_ms": 5.0 * k, "input": "3x592x576"} for k in (1, 2, 3, 4)]  # fmt: skip
    pd.DataFrame(rows).to_csv(reports / "pruning.csv", index=False)
    (reports / "pruning.json").write_text(json.dumps({"best_depth": 3}))
    outs |= {"reports/pruning.csv": reports / "pruning.csv"}
    outs |= {"reports/pruning.json": reports / "pruning.json"}
    processed = project / "data" / "processed"
    processed.mkdir(parents=True)
    (processed / "manifest.json").write_text(json.dumps({
        "dataset": "drive", "class_names": ["background", "vessel"], "positive_class": "vessel",
        "splits": {"train": ["a"] * 18, "val": ["b"] * 2, "test": ["c"] * 20},
        "crops": ["x"] * 4427, "second_observer": {"miou": 0.81, "f1": 0.788, "auc_roc": 0.5},
    }))  # fmt: skip
    lock = {"schema": "2.0", "stages": {"s": {"outs": [
        {"path": rel, "md5": md5(path)} for rel, path in outs.items()]}}}  # fmt: skip
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    (reports / "results" / "runs").mkdir(parents=True)
    log = reports / "results" / "runs" / "drive-cpu.log"
    log.write_text(LOG)
    plan = {"stages": {"train_unet": 154.0, "train_unetpp": 300.0}, "total": 500.0}
    (log.parent / "drive-cpu.plan.json").write_text(json.dumps(plan))
    return project


def test_stage_wall_times_come_from_the_timed_log(finished_run):
    seconds = results.stage_seconds(finished_run / "reports/results/runs/drive-cpu.log")
    assert seconds == {"download": 3.5, "preprocess": 6.0, "train_unet": 140.0,
                       "train_unetpp": 350.0, "prune": 60.0, "report": 20.5}  # fmt: skip


def test_collect_writes_json_and_a_readme_from_the_run(finished_run):
    runs = finished_run / "reports/results/runs"
    results.main(["collect", "--name", "drive-cpu", "--log", str(runs / "drive-cpu.log"),
                  "--plan", str(runs / "drive-cpu.plan.json")])  # fmt: skip
    out = json.loads((finished_run / "reports/results/drive-cpu.json").read_text())
    assert out["dataset"] == "drive" and out["positive_class"] == "vessel"
    assert out["archs"]["unetpp"]["test"]["miou"] == pytest.approx(0.84)
    assert out["archs"]["unet"]["test"]["auc_roc"] == 0.978
    assert [d["depth"] for d in out["pruned"]] == [1, 2, 3, 4] and out["best_depth"] == 3
    assert out["second_observer"]["f1"] == 0.788
    assert out["wall_seconds"] == 580.0 and out["stage_seconds"]["train_unet"] == 140.0
    assert out["plan_ratio"]["train_unet"] == 1.1 and out["plan_ratio"]["total"] == 0.86
    assert out["machine"]["cores"] and out["commit"] and out["command"] == "python -m dvc repro"
    readme = (finished_run / "reports/results/README.md").read_text()
    for text in ("drive-cpu: drive", "| UNet++ (L4) | 0.8400 | 0.8100 | 0.9780",
                 "| UNet++ pruned L3 |", "| second human observer | 0.8100 | 0.7880",
                 "**vessel** as the positive class", "| train_unet | 2m20s | 2m34s | 1.1 |",
                 "| **total** | 9m40s |"):  # fmt: skip
        assert text in readme, text


def test_outputs_that_differ_from_dvc_lock_are_refused(finished_run):
    (finished_run / "reports/unet/metrics.json").write_text(json.dumps(METRICS | {"miou": 0.99}))
    with pytest.raises(PipelineError, match=r"reports/unet/metrics.json: differs from dvc.lock"):
        results.collect("x", None, None)


def test_a_log_without_stages_is_refused(finished_run, tmp_path):
    bad = tmp_path / "log"
    bad.write_text("1.0 hello\n")
    with pytest.raises(PipelineError, match='no "Running stage" line'):
        results.stage_seconds(bad)


def test_the_readme_keeps_every_run(finished_run):
    results.main(["collect", "--name", "a"])
    results.main(["collect", "--name", "b"])
    readme = (finished_run / "reports/results/README.md").read_text()
    assert "## a: drive" in readme and "## b: drive" in readme


def test_an_autoconf_run_records_its_budget_plan_and_actual_time(finished_run):
    """`bench/results.py run --autoconf 20m`: params.yaml's autoconf section (the recipe
    pipeline.autoconf wrote) and a stage that stopped at its limit reach the result."""
    (finished_run / "params.yaml").write_text(
        yaml.safe_dump({"epochs": 7, "autoconf": {"budget_s": 600.0, "planned_s": 570.0,
                        "fingerprint": '{"blobs": false}', "reasons": ["epochs 7: fill"]}})
    )  # fmt: skip
    metrics = finished_run / "reports/unetpp/metrics.json"
    metrics.write_text(json.dumps({**METRICS, "stopped_early": "stopped after epoch 6 of 7"}))
    lock = yaml.safe_load((finished_run / "dvc.lock").read_text())
    for out in lock["stages"]["s"]["outs"]:
        if out["path"] == "reports/unetpp/metrics.json":
            out["md5"] = md5(metrics)
    (finished_run / "dvc.lock").write_text(yaml.safe_dump(lock))
    log = finished_run / "reports/results/runs/drive-cpu.log"
    results.main(["collect", "--name", "auto-10m", "--log", str(log)])
    out = json.loads((finished_run / "reports/results/auto-10m.json").read_text())
    assert out["autoconf"]["budget_s"] == 600.0 and out["autoconf"]["reasons"] == ["epochs 7: fill"]
    assert out["stopped_early"] == {"unetpp": "stopped after epoch 6 of 7"}
    readme = (finished_run / "reports/results/README.md").read_text()
    assert "for a 10m00s budget, planned at 9m30s, ran in 9m40s (97% of the budget)" in readme


def test_a_hand_recipe_is_applied_and_kept_beside_the_run(finished_run, tmp_path, monkeypatch):
    """`run --overlay my.yaml --name N`: params.yaml gets the recipe (as a preset is applied),
    runs/N.overlay.yaml keeps it, and the data is prepared so that the plan can time it."""
    calls = []
    monkeypatch.setattr(results.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    (finished_run / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("epochs: 3\n")
    results.run_overlay("hand", recipe)
    assert yaml.safe_load((finished_run / "params.yaml").read_text())["epochs"] == 3
    kept = finished_run / "reports/results/runs/hand.overlay.yaml"
    assert kept.read_text() == recipe.read_text()
    assert calls[-1][-3:] == ["dvc", "repro", "preprocess"]


def test_a_run_takes_one_recipe_and_a_readable_overlay(finished_run, tmp_path):
    with pytest.raises(PipelineError, match="one of --preset, --autoconf, --overlay"):
        results.main(["run", "--preset", "drive-cpu", "--overlay", "x.yaml", "--name", "n"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n")
    with pytest.raises(PipelineError, match="bad.yaml: expected a YAML mapping"):
        results.main(["run", "--overlay", str(bad), "--name", "n"])
    with pytest.raises(PipelineError, match="missing.yaml: No such file"):
        results.main(["run", "--overlay", str(tmp_path / "missing.yaml"), "--name", "n"])
    before = (finished_run / "params.yaml").read_text()
    assert before == "epochs: 7\n"  # nothing applied
