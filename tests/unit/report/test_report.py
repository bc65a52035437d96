"""The report stage on a tiny fake project: md, self-contained html, xlsx and the panels."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core import paths
from pipeline.core.common import PipelineError
from pipeline.core.config import parse_params
from pipeline.data.store import save_array
from pipeline.engine.checkpoint import save_checkpoint
from pipeline.models import build_model
from pipeline.report import candidate as registry_pick
from pipeline.report import panels, tables
from pipeline.stages import report
from pipeline.tracking.runs import Tracker
from tests.fakes import fake_manifest, random_image

SIZE = (40, 36)  # (H, W)
TEST_STEMS = ["t0", "t1", "t2"]


def params(**overrides):
    base = {
        "inference": {"tile_size": 32, "tile_overlap": 8},  # 40x36 images: several tiles
        "report": {"panels": 2, "dpi": 50},
    }
    return parse_params({**base, **overrides})


def write_class_pixels(class_names: list[str], test: list[int] | None = None) -> None:
    """class_pixels.csv as preprocess writes it; `test`: the test split's pixels per class."""
    rows = ["split,class_index,class_name,pixels,fraction"]
    for split, counts in (("train", [100] * len(class_names)), ("test", test)):
        pixels = zip(class_names, counts or [100] * len(class_names), strict=True)
        rows += [f"{split},{c},{n},{k},0" for c, (n, k) in enumerate(pixels)]
        rows.append(f"{split},255,ignore,0,")
    paths.CLASS_PIXELS.write_text("\n".join(rows) + "\n")


def write_manifest(class_names: list[str], observer: dict | None):
    manifest = fake_manifest(
        len(class_names),
        class_names=class_names,
        splits={"train": ["a", "b"], "val": ["c"], "test": TEST_STEMS},
        second_observer=observer,
    )
    paths.MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    paths.MANIFEST.write_text(json.dumps(manifest.model_dump()))
    write_class_pixels(class_names)
    rng = np.random.default_rng(1)
    for stem in TEST_STEMS:
        save_array(paths.split_dir("test", "images"), stem, random_image(*SIZE))
        label = rng.integers(0, len(class_names), SIZE).astype(np.uint8)
        label[:4] = 255  # an ignored band
        save_array(paths.split_dir("test", "labels"), stem, label)
    return manifest


def write_checkpoints(num_classes: int) -> None:
    options = {"base_channels": 4, "depth": 2}
    for arch in tables.ARCH_NAMES:
        model = build_model(arch, 3, num_classes, **options)
        config = {"in_channels": 3, "num_classes": num_classes, "options": options}
        save_checkpoint(paths.checkpoint(arch), model.eval(), arch=arch, model_config=config)


def write_metrics(class_names: list[str]) -> None:
    rng = np.random.default_rng(2)
    quality = tables.QUALITY + tables.BINARY
    for i, arch in enumerate(tables.ARCH_NAMES):
        metrics = {
            **{k: float(rng.uniform(0.5, 1)) for k in quality},
            **{f"iou_{c}": 0.1 * (j + 1) + 0.01 * i for j, c in enumerate(class_names)},
            "params": 1000 + i,
            "gflops": 0.5,
            "latency_ms": 3.0,
            "device": "cpu (test)",
            "input": "3x40x36",
            "train_seconds": 12.5,
            "best_epoch": 2,
            "numerics": "bf16 autocast, channels_last, fused optimizer (CPU: AMX)",
        }
        out = paths.arch_reports(arch)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        epochs = pd.DataFrame(
            {
                "epoch": [1, 2, 3],
                "train_loss": [1.0, 0.6, 0.5],
                "val_loss": [1.1, 0.7, 0.6],
                "val_miou": [0.5, 0.6 + 0.05 * i, 0.65],
            }
        )
        epochs.to_csv(out / "epochs.csv", index=False)


def write_pruning() -> None:
    rows = [
        {
            "depth": k,
            "params": 100 * 4**k,
            "gflops": 0.1 * k,
            "latency_ms": 1.0 * k,
            "device": "cpu (test)",
            "input": "3x40x36",
            "miou": 0.6 + 0.05 * k,
            "dice": 0.7 + 0.05 * k,
            "global_accuracy": 0.9,
            "mean_accuracy": 0.8,
        }
        for k in (1, 2)
    ]
    pd.DataFrame(rows).to_csv(paths.PRUNING_CSV, index=False)
    paths.PRUNING_JSON.write_text(json.dumps({"best_depth": 2}))


def no_store(mp: pytest.MonkeyPatch) -> None:
    """MLflow off: the report stage logs nowhere."""
    mp.setattr(report, "mlflow_run", lambda *a, **k: contextlib.nullcontext(Tracker(None)))


def build(class_names=("background", "vessel"), observer=None) -> dict:
    """Every input of the report stage in the current (patched) project; the manifest."""
    class_names = list(class_names)
    paths.REPORTS.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(class_names, observer)
    write_checkpoints(len(class_names))
    write_metrics(class_names)
    write_pruning()
    return manifest


@contextlib.contextmanager
def built_report(root: Path, stage_params, **inputs):
    """A project under `root` whose report stage has run; paths stay patched inside."""
    with pytest.MonkeyPatch.context() as mp, paths.rooted(root):
        no_store(mp)
        build(**inputs)
        report.report(stage_params)
        yield root


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    """DRIVE-like: two classes, a second observer, non-default epochs, several tiles."""
    observer = {"miou": 0.7, "dice": 0.8, "sensitivity": 0.77}
    root = tmp_path_factory.mktemp("binary")
    with built_report(root, params(epochs=3), observer=observer):
        yield root


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory):
    """Three classes, no observer, every param at its default (three panels)."""
    root = tmp_path_factory.mktemp("multiclass")
    with built_report(root, parse_params({}), class_names=["road", "car", "sky"]):
        yield root


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fresh project holding every input of the report stage, for tests that change one."""
    no_store(monkeypatch)
    with paths.rooted(tmp_path):
        yield build


def img_sources(html: str) -> list[str]:
    return re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', html)


def read(root: Path, name: str) -> str:
    return (root / "reports" / name).read_text()


def test_html_is_self_contained_and_embeds_every_figure(binary):
    html = read(binary, "report.html")
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    assert "<h1>UNet vs UNet++ on fake</h1>" in html
    sources = img_sources(html)
    figures = ["learning_curves.png", "pruning_tradeoff.png", "panels.png"]
    assert len(sources) == len(figures)
    assert len(re.findall(r"\bsrc=", html)) == len(figures)  # nothing else refers to a file
    prefix = "data:image/png;base64,"
    for src, name in zip(sources, figures, strict=True):
        assert src.startswith(prefix)
        embedded = Image.open(io.BytesIO(base64.b64decode(src.removeprefix(prefix))))
        assert embedded.format == "PNG"
        assert embedded.size == Image.open(binary / "reports" / name).size


def test_markdown_links_the_figures_beside_it(binary):
    md = read(binary, "report.md")
    assert md.startswith("# UNet vs UNet++ on `fake`")
    for png in ("learning_curves.png", "pruning_tradeoff.png", "panels.png"):
        assert f"]({png})" in md
    assert "| L2 (best)" in md and "sensitivity" in md  # binary: the ranking metrics
    assert re.search(r"\| git commit\s+\| unknown", md)  # the fake project is no git repo
    # how the models computed (train.amp auto picks per machine), once when both ran alike
    assert re.search(
        r"\| numerics\s+\| bf16 autocast, channels_last, fused optimizer \(CPU: AMX\)", md
    )
    assert "The first 2 test images" in md


def test_xlsx_has_a_sheet_per_table_and_per_class_iou_for_multiclass(multiclass):
    xl = pd.ExcelFile(multiclass / "reports" / "report.xlsx")
    expected = {"setup", "architectures", "test metrics", "per-class IoU", "pruning", "epoch logs"}
    assert expected <= set(xl.sheet_names)
    iou = pd.read_excel(xl, "per-class IoU")
    assert list(iou["class"]) == ["road", "car", "sky"]
    assert list(iou.columns) == ["class", "UNet", "UNet++"]
    assert iou["UNet++"].tolist() == pytest.approx([0.11, 0.21, 0.31])
    logs = pd.read_excel(xl, "epoch logs")
    assert logs["model"].tolist() == ["UNet"] * 3 + ["UNet++"] * 3
    md, html = read(multiclass, "report.md"), read(multiclass, "report.html")
    assert "## Per-class IoU" in md and re.search(r"\| sky\s+\|\s+0\.3000 \|\s+0\.3100 \|", md)
    assert "<h2>Per-class IoU</h2>" in html and "<td>sky</td>" in html
    assert "sensitivity" not in md  # multi-class: no binary extras


def test_binary_report_has_no_per_class_iou(binary):
    assert "per-class IoU" not in pd.ExcelFile(binary / "reports" / "report.xlsx").sheet_names
    assert "Per-class IoU" not in read(binary, "report.md")


def test_changed_params_list_value_and_default(binary):
    assert tables.changed_params(parse_params({})).empty
    table = tables.changed_params(parse_params({"epochs": 3, "loss": {"class_weights": None}}))
    assert table.to_dict("records") == [{"key": "epochs", "value": "3", "default": "12"}]
    folder = {"mapping": {0: 0, 1: 1}}  # every class still mapped (config refuses less)
    mapping = tables.changed_params(parse_params({"dataset": {"folder": folder}}))
    assert mapping.to_dict("records") == [
        {"key": "dataset.folder.mapping.1", "value": "1", "default": "(not set)"},
        # a key the default has and the params lack
        {"key": "dataset.folder.mapping.255", "value": "(not set)", "default": "1"},
    ]

    md, html = read(binary, "report.md"), read(binary, "report.html")
    assert re.search(r"\| epochs\s+\| 3\s+\| 12\s+\|", md)
    assert "<td>epochs</td><td>3</td><td>12</td>" in html
    changed = pd.read_excel(binary / "reports" / "report.xlsx", "changed params", dtype=str)
    assert ["epochs", "3", "12"] in changed.values.tolist()


def test_no_changed_params_says_none(multiclass):
    md = read(multiclass, "report.md")
    assert "built-in defaults: none" in md
    assert "The first 3 test images" in md  # report.panels' default


def test_second_observer_row_in_md_and_html(binary):
    md, html = read(binary, "report.md"), read(binary, "report.html")
    assert re.search(r"\| 2nd human observer \|\s+0\.7000 \|", md)
    assert "<td>2nd human observer</td>" in html and "0.7700" in html
    # the observer has no scores, so no AUC: shown as "–", never None or nan
    assert "None" not in html and "nan" not in md
    assert re.search(r"\| 2nd human observer \|.*\| –\s+\|$", md, re.M)
    test = pd.read_excel(binary / "reports" / "report.xlsx", "test metrics")
    assert test["model"].tolist() == ["UNet", "UNet++", "2nd human observer"]


def test_no_observer_no_reference_row(multiclass):
    assert "2nd human observer" not in read(multiclass, "report.html")


def test_panels_hold_one_row_per_image_and_colour_the_errors(fake):
    manifest = fake(["road", "car", "sky"])
    rows, stems = panels.panels_figure(manifest, 2, params().inference)
    assert stems == ["t0", "t1"] and len(rows) == 2
    for row in rows:
        assert len(row) == 6  # image, truth, 2 predictions, 2 error maps
        assert all(a.shape == (*SIZE, 3) and a.dtype == np.uint8 for a in row)
        assert (row[1][:4] == panels.IGNORED).all()  # the ignored band, in the truth
        assert (row[4][:4] == panels.IGNORED).all()  # ...and in the error maps

    panels.write_panels(rows, stems, manifest.class_names, dpi=50)
    two = Image.open(paths.PANELS_PNG).size
    panels.write_panels(rows[:1], stems[:1], manifest.class_names, dpi=50)
    one = Image.open(paths.PANELS_PNG).size
    assert two[0] == one[0] and two[1] > one[1] * 1.4  # a row more, same width


def test_binary_error_map_colours():
    image = np.full((1, 4, 3), 100, np.uint8)
    truth = np.array([[0, 1, 1, 255]], np.uint8)
    pred = np.array([[1, 0, 1, 0]], np.uint8)
    errors = panels.error_map(image, truth, pred, binary=True)[0]
    assert tuple(errors[0]) == panels.FALSE_POSITIVE
    assert tuple(errors[1]) == panels.FALSE_NEGATIVE
    assert tuple(errors[2]) == (120, 120, 120)  # correct: the image in grey
    assert tuple(errors[3]) == panels.IGNORED
    multi = panels.error_map(image, np.array([[2, 1, 0, 255]]), pred, binary=False)[0]
    assert [tuple(p) for p in multi] == [panels.WRONG, panels.WRONG, panels.WRONG, panels.IGNORED]


def test_zero_panels_leaves_a_note_and_no_section(fake):
    fake()
    report.report(params(report={"panels": 0, "dpi": 50}))
    assert "Qualitative" not in paths.REPORT_MD.read_text()
    assert "panels.png" not in paths.REPORT_MD.read_text()
    assert Image.open(paths.PANELS_PNG).format == "PNG"  # still the stage's output
    assert len(img_sources(paths.REPORT_HTML.read_text())) == 2


def test_missing_metrics_is_one_line_naming_the_file_and_keeps_the_report(fake):
    fake()
    paths.REPORT_MD.parent.mkdir(parents=True, exist_ok=True)
    paths.REPORT_MD.write_text("previous report\n")
    missing = paths.arch_reports("unetpp") / "metrics.json"
    missing.unlink()
    with pytest.raises(PipelineError) as exc:
        report.report(params())
    message = str(exc.value)
    assert str(missing) in message and "\n" not in message
    assert paths.REPORT_MD.read_text() == "previous report\n"
    assert not paths.REPORT_HTML.exists()


def test_metrics_without_a_required_key_name_the_file_and_key(fake):
    fake()
    path = paths.arch_reports("unet") / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["gflops"]
    path.write_text(json.dumps(metrics))
    with pytest.raises(PipelineError, match=r"unet/metrics\.json: missing gflops"):
        report.report(params())


def test_missing_checkpoint_names_the_file_before_writing(fake):
    fake()
    paths.checkpoint("unetpp").unlink()
    with pytest.raises(PipelineError, match=r"unetpp\.pt: checkpoint not found"):
        report.report(params())
    assert not paths.REPORT_MD.exists()


def test_the_inference_sentence_follows_the_inference_params():
    from pipeline.core.config import InferenceParams
    from pipeline.report.tables import inference_text

    whole = inference_text(InferenceParams(tile_size=0))
    assert whole.startswith("whole-image inference") and "tile" not in whole.replace("whole", "")
    tiled = inference_text(InferenceParams(tile_size=64, tile_overlap=16, blend="constant"))
    assert tiled.startswith("overlap-tile inference (64 px tiles overlapping by 16 px, constant")
    assert "flip" not in tiled
    assert "horizontally flipped" in inference_text(InferenceParams(tile_size=0, tta="hflip"))
    scaled = inference_text(InferenceParams(tile_size=0), scale=0.5)
    assert scaled.startswith(whole) and "resized to 0.5x" in scaled and "full-size label" in scaled
    flips = inference_text(InferenceParams(tile_size=64, tta="flips"))
    assert flips.startswith("overlap-tile") and "vertically and both" in flips


def test_an_undefined_metric_is_null_in_strict_json_and_a_dash_in_the_report(fake):
    """metrics.json holds null, never a bare NaN (strict parsers reject it); the report reads
    it back as a metric the model lacks."""
    from pipeline.core.common import write_json

    fake()
    path = paths.arch_reports("unet") / "metrics.json"
    metrics = json.loads(path.read_text())
    write_json(path, {**metrics, "precision": float("nan"), "extra": [1.0, float("inf")]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    strict = json.loads(text, parse_constant=refuse)
    assert strict["precision"] is None and strict["extra"] == [1.0, None]
    report.report(params())
    md = paths.REPORT_MD.read_text()
    assert re.search(r"^\| UNet\s+\|.*\|\s*–\s*\|", md, re.M) and "nan" not in md.lower()


# --- the model the registry gets -------------------------------------------------------------


@pytest.mark.parametrize(
    ("unet", "unetpp", "l1", "best_depth", "chosen"),
    [
        (0.80, 0.70, 0.795, 1, ("UNet++ L1", "prune", "segmenter_L1", "unetpp")),  # within 0.01
        (0.80, 0.70, 0.780, 1, ("UNet", "train_unet", "segmenter", "unet")),
        (0.70, 0.80, 0.795, 2, ("UNet++", "train_unetpp", "segmenter", "unetpp")),  # L2: full
    ],
)
def test_the_registry_gets_the_better_architecture_or_a_pruned_depth_within_tolerance(
    fake, unet, unetpp, l1, best_depth, chosen
):
    from pipeline.core.common import sha256_file

    manifest = fake()
    t = tables.gather(params(), manifest, 0)
    t.test.loc[t.test["model"] == "UNet", "miou"] = unet
    t.test.loc[t.test["model"] == "UNet++", "miou"] = unetpp
    t.pruning.loc[t.pruning["depth"] == 1, "miou"] = l1
    t.best_depth = best_depth
    got = registry_pick.candidate(t, tolerance=0.01)
    label, stage, model, arch = chosen
    assert (got.label, got.stage, got.model) == (label, stage, model)
    assert got.checkpoint_sha256 == sha256_file(paths.checkpoint(arch))
    assert got.metrics["miou"] == pytest.approx(l1 if stage == "prune" else max(unet, unetpp))


def test_the_test_split_hash_follows_the_labels_bytes(fake):
    manifest = fake()
    first = registry_pick.split_hash(manifest)
    assert registry_pick.split_hash(manifest) == first and len(first) == 16
    stem = manifest.splits["test"][0]
    label = paths.split_dir("test", "labels")
    pixels = np.load(label / f"{stem}.npy")
    pixels[5, 0] = (pixels[5, 0] + 1) % 2  # row 5: a labelled pixel, 0 or 1 both valid
    save_array(label, stem, pixels)
    assert registry_pick.split_hash(manifest) != first


# --- a smoke test, undefined metrics ---------------------------------------------------------


def smoke(p):
    """`p` with report.smoke true."""
    return p.model_copy(update={"report": p.report.model_copy(update={"smoke": True})})


class FakeRun:
    """A stage's MLflow run that logs nothing (truthy, as a real Tracker)."""

    def log_metrics(self, *args, **kwargs):
        pass

    def log_artifact(self, *args, **kwargs):
        pass


def logged_runs(mp: pytest.MonkeyPatch) -> list:
    """The report stage with a (fake) MLflow run: the models it would register."""
    registered = []
    mp.setattr(report, "mlflow_run", lambda *a, **k: contextlib.nullcontext(FakeRun()))
    mp.setattr(report, "log_to_parent", lambda *a, **k: None)
    mp.setattr(report, "_register", lambda p, m, t, run: registered.append(t.test))
    return registered


def test_a_smoke_test_says_at_the_top_that_its_metrics_mean_nothing(fake, monkeypatch):
    """Issue 30: ci-cpu's report showed a "best" UNet at Dice 0.0 and a black panel as results."""
    fake()
    registered = logged_runs(monkeypatch)
    report.report(smoke(params(report={"panels": 0, "dpi": 50})))
    md, html = paths.REPORT_MD.read_text(), paths.REPORT_HTML.read_text()
    heading, first = md.split("\n\n")[:2]
    assert heading == "# UNet vs UNet++ on `fake` (smoke test)"
    assert first.startswith("> [!WARNING]\n> **Smoke test: these metrics mean nothing.**")
    assert "no model was registered" in first
    assert "<title>UNet vs UNet++ on fake (smoke test)</title>" in html
    body = html.split("<body>", 1)[1]
    assert body.index('<p class="alert" role="alert"><strong>Smoke test') < body.index("<h2>")
    setup = pd.read_excel(paths.REPORT_XLSX, "setup")
    assert setup["value"].iloc[0] == "smoke test (report.smoke): its metrics mean nothing"
    assert registered == []  # a meaningless model never takes `champion`

    report.report(params(report={"panels": 0, "dpi": 50}))  # the same run, no smoke test
    assert "moke" not in paths.REPORT_MD.read_text() + paths.REPORT_HTML.read_text()
    assert len(registered) == 1


def test_a_metric_undefined_for_every_model_is_said_and_registers_nothing(fake, monkeypatch):
    """Both metrics.json hold null for report.metric (undefined, as Dice is on test labels
    without a positive pixel): was pandas' "Encountered all NA values" traceback."""
    manifest = fake()
    for arch in tables.ARCH_NAMES:
        path = paths.arch_reports(arch) / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "miou": None}))
    stage = params(report={"panels": 0, "dpi": 50})
    report.report(stage)
    md = paths.REPORT_MD.read_text()
    assert "Best test miou: none, it is undefined for every model (–)." in md
    t = tables.gather(stage, manifest, 0)
    assert registry_pick.candidate(t, tolerance=0.01) is None
    monkeypatch.setattr(report, "register", lambda *a: pytest.fail("nothing to register"))
    report._register(stage, manifest, t, FakeRun())


def test_test_labels_without_foreground_register_nothing(fake, monkeypatch, caplog):
    """All-empty test masks score a "perfect" mIoU: that model must not take `champion`."""
    import logging

    manifest = fake()
    write_class_pixels(["background", "vessel"], test=[1000, 0])
    stage = params(report={"panels": 0, "dpi": 50})
    t = tables.gather(stage, manifest, 0)
    monkeypatch.setattr(report, "register", lambda *a: pytest.fail("nothing to register"))
    with caplog.at_level(logging.WARNING):
        report._register(stage, manifest, t, FakeRun())
    assert "the test labels hold no pixel of class 'vessel': test metrics mean nothing" in (
        caplog.text
    )
