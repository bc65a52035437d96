"""`python -m pipeline.autoconf`: the fingerprint measures what it says on drawn shapes, the
written rules turn fingerprints into recipes, label values are read one way or not at all, and
the budget arithmetic fills the budget without passing it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.autoconf import budget, rules
from pipeline.autoconf.__main__ import main, parse_budget
from pipeline.autoconf.fingerprint import measure
from pipeline.autoconf.labels import check_mapping
from pipeline.core.common import PipelineError
from pipeline.core.config import load_params
from tests.fakes import save_image
from tests.project import PROJECT

RNG = np.random.default_rng(0)


def image(h=96, w=96, value=128.0, noise=20.0):
    return np.clip(RNG.normal(value, noise, (h, w, 3)), 0, 255).astype(np.uint8)


def stripes(h=96, w=96, width=2, every=12):
    """Vertical lines `width` px wide: vessels."""
    label = np.zeros((h, w), np.uint8)
    for x in range(4, w - width, every):
        label[:, x : x + width] = 1
    return label


def discs(h=96, w=96, radius=6, gap=1):
    """A grid of discs `gap` px apart: touching nuclei."""
    label = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    step = 2 * radius + 1 + gap  # a disc spans 2r + 1 px
    for cy in range(radius, h - radius, step):
        for cx in range(radius, w - radius, step):
            label[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    return label


def fingerprint_of(labels, names=("background", "object"), images=None, counts=None):
    images = images or [image(*lab.shape) for lab in labels]
    n = len(labels)
    counts = counts or {"train": n, "val": max(1, n // 4), "test": max(1, n // 4)}
    return measure(zip(images, labels, strict=True), list(names), counts, "folder")


def recipe(fp, dataset="folder"):
    r, counts = rules.structure(fp, dataset)
    return r, counts


# --- the fingerprint -----------------------------------------------------------------------------


def test_the_width_of_stripes_and_the_blobs_of_discs_are_measured():
    wide = fingerprint_of([stripes(width=8, every=20)] * 3)
    assert wide.thickness() == pytest.approx(8, abs=2)
    assert not wide.blobs()  # long stripes are lines
    cells = fingerprint_of([discs(radius=8, gap=6)] * 3)
    assert cells.blobs() and cells.diameter() == pytest.approx(16, abs=2)
    assert cells.touching == 0  # 6 px apart: they do not touch


def test_objects_one_pixel_apart_touch():
    fp = fingerprint_of([discs(radius=6, gap=1)] * 3)
    assert fp.blobs() and fp.touching > 0.5


def test_a_layout_that_depends_on_the_row_has_an_up_and_a_symmetric_one_does_not():
    scene = np.zeros((90, 120), np.uint8)
    scene[:30] = 2  # sky above
    scene[60:] = 1  # road below
    names = ("background", "road", "sky")
    assert fingerprint_of([scene] * 4, names).up > 0.5
    assert fingerprint_of([discs()] * 4).up < rules.UP


def test_ignored_pixels_and_class_frequencies_are_counted():
    label = np.zeros((40, 40), np.uint8)
    label[:10] = 255  # ignore a quarter
    label[10:13] = 1  # 3 of the 30 labelled rows
    fp = fingerprint_of([label])
    assert fp.ignore == pytest.approx(0.25)
    assert fp.classes[1].frequency == pytest.approx(0.1)


# --- the rules -----------------------------------------------------------------------------------


def test_tiny_structures_get_no_downscaling_and_wide_ones_half():
    thin, _ = recipe(fingerprint_of([stripes(width=2)] * 4))
    assert thin.get("preprocess.scale") == 1.0
    assert "2 px" in next(r for r in thin.reasons if r.startswith("preprocess.scale"))
    wide, _ = recipe(fingerprint_of([stripes(h=200, w=200, width=30, every=60)] * 4))
    assert wide.get("preprocess.scale") == 0.5


def test_touching_objects_get_border_weights_and_keep_their_gaps():
    r, _ = recipe(fingerprint_of([discs(h=160, w=160, radius=12, gap=1)] * 4))
    assert r.get("preprocess.border_weights.enabled") is True
    assert r.get("preprocess.scale") == 1.0  # 24 px cells could shrink, but their gaps not
    assert 2 <= r.get("preprocess.border_weights.sigma") <= 10


def test_a_two_percent_foreground_gets_imbalance_handling():
    label = np.zeros((100, 100), np.uint8)
    label[40:54, 40:54] = 1  # ~2%
    r, _ = recipe(fingerprint_of([label] * 4))
    assert r.get("preprocess.foreground") == 0.33
    assert r.get("loss.dice_weight") > 0
    common, _ = recipe(fingerprint_of([discs()] * 4))  # ~35% foreground
    assert common.get("preprocess.foreground") == 0.0


def test_a_rare_class_among_many_gets_class_weights():
    label = np.zeros((100, 100), np.uint8)
    label[:50] = 1
    label[60:62, 10:20] = 2  # 0.2% of the pixels
    counts = {"train": 300, "val": 50, "test": 50}
    r, _ = recipe(fingerprint_of([label] * 4, ("a", "b", "rare"), counts=counts))
    assert r.get("loss.class_weights") == "sqrt_median_frequency"
    assert r.get("train.monitor") == "val_miou"  # enough validation images to rank epochs


def test_photographs_get_the_scene_policy_and_fields_the_dihedral_one():
    scene = np.zeros((96, 128), np.uint8)
    scene[:32] = 2
    scene[64:] = 1
    r, _ = recipe(fingerprint_of([scene] * 4, ("background", "road", "sky")))
    assert r.get("train.augment") == "scene"
    field, _ = recipe(fingerprint_of([discs()] * 4))
    assert field.get("train.augment") == "dihedral"


def test_thin_faint_structures_get_clahe():
    labels = [stripes(width=2)] * 4
    flat = [image(noise=30) for _ in labels]  # vessels no brighter than the noise: faint
    fp = fingerprint_of(labels, images=flat)
    assert fp.contrast < rules.FAINT
    assert recipe(fp)[0].get("preprocess.clahe") == 2.0
    bright = [image(noise=5) for _ in labels]
    for im, lab in zip(bright, labels, strict=True):
        im[lab == 1] = 250  # clearly visible vessels
    assert recipe(fingerprint_of(labels, images=bright))[0].get("preprocess.clahe") == 0.0


def test_few_images_train_on_all_but_one_and_monitor_the_last_epoch():
    fp = fingerprint_of([discs()] * 20, counts={"train": 20, "val": 3, "test": 7})
    r, counts = recipe(fp, "folder")
    assert counts == {"train": 22, "val": 1, "test": 7}
    assert round(30 * r.get("dataset.folder.val_fraction")) == 1
    assert r.get("train.monitor") == "last"
    many = fingerprint_of([discs()] * 4, counts={"train": 400, "val": 50, "test": 100})
    r, counts = recipe(many, "folder")
    assert counts["val"] == 50 and r.get("train.monitor") == "val_dice"


def test_the_crop_follows_the_objects_and_fits_the_smallest_image():
    r, _ = recipe(fingerprint_of([discs(h=400, w=400, radius=30, gap=20)] * 4))
    crop = r.get("preprocess.crop_size")
    assert crop % 16 == 0 and rules.MIN_CROP <= crop <= rules.MAX_CROP
    small, _ = recipe(fingerprint_of([discs(h=64, w=80)] * 4))
    assert small.get("preprocess.crop_size") == 64  # the 64 px images bound it


def test_large_images_are_tiled():
    r, _ = recipe(fingerprint_of([stripes(h=1200, w=1200)]))
    assert r.get("inference.tile_size") == 512
    assert recipe(fingerprint_of([stripes()]))[0].get("inference.tile_size") == 0


# --- label values --------------------------------------------------------------------------------


def test_label_values_are_read_one_way_or_the_readings_are_named():
    assert check_mapping({0: 90, 255: 10}, {0: 0, 255: 1}, ["bg", "fg"]).ok
    zero_one = check_mapping({0: 90, 1: 10}, {0: 0, 255: 1}, ["bg", "fg"])
    assert zero_one.proposal == {0: 0, 1: 1} and zero_one.class_names == ["bg", "fg"]
    three = check_mapping({0: 80, 128: 5, 255: 15}, {0: 0, 255: 1}, ["bg", "fg"])
    assert three.proposal is None and len(three.readings) == 2
    assert "128: 255" in three.message()  # the "border ignored" reading, spelt out
    indices = check_mapping({0: 5, 1: 5, 2: 5, 3: 5}, {0: 0, 255: 1}, ["bg", "fg"])
    assert indices.proposal == {0: 0, 1: 1, 2: 2, 3: 3} and len(indices.class_names) == 4
    lossy = {0: 8000, 3: 50, 252: 40, 255: 1900, 130: 10}
    assert check_mapping(lossy, {0: 0, 255: 1}, ["bg", "fg"]).proposal[252] == 1
    inverted = check_mapping({0: 10, 1: 90}, {0: 0, 255: 1}, ["bg", "fg"])
    assert inverted.proposal is None  # the "object" covers 90%: which is which?


# --- the budget arithmetic ---------------------------------------------------------------------


def fake_timer(epoch_s=None, rest=60.0):
    """plan.estimate's figures without timing: seconds per epoch by UNet++ width."""
    epoch_s = epoch_s or {16: 60.0, 8: 25.0}

    def estimate(params, seconds, data):
        unet, unetpp = 20.0, epoch_s[params.unetpp.base_channels]
        if params.unet.base_channels == 8:
            unet /= 2
        archs = {
            a: {
                "epoch_s": e,
                "compile_s": 0.0,
                "steps_per_epoch": 10,
                "step_s": e / 10,
                "eval_image_s": {"test": 0.5},
            }
            for a, e in (("unet", unet), ("unetpp", unetpp))
        }
        stages = {"train_unet": 10 + unet, "train_unetpp": 10 + unetpp, "prune": rest - 20}
        data = {"counts": {"train": 50, "val": 5, "test": 10}, "patches": 100}
        total = rest + unet + unetpp
        return {"archs": archs, "stages": stages, "total": total, "epochs": 1, "data": data}

    return estimate


@pytest.fixture
def cells():
    return fingerprint_of([discs()] * 8, counts={"train": 50, "val": 5, "test": 10})


def plan_for(fp, budget_s, **kw):
    params = default_params()
    base, counts = rules.structure(fp, "folder")
    return budget.choose(fp, params, base, counts, budget_s, timer=fake_timer(**kw))


def default_params():
    from pipeline.core.config import parse_params

    return parse_params({"mlflow": {"enabled": False}})


def test_the_epochs_fill_the_budget_without_passing_it(cells):
    planned = plan_for(cells, 1800)
    per_epoch = planned.costs.per_epoch()
    assert planned.total_s <= budget.TARGET * 1800
    assert planned.total_s + per_epoch > budget.TARGET * 1800  # one more would pass it
    assert planned.total_s == pytest.approx(60 + planned.epochs * per_epoch)


def test_a_tighter_budget_narrows_unetpp_before_the_epochs_drop_under_the_passes(cells):
    wide = plan_for(cells, 7200)
    assert wide.recipe.get("unetpp.base_channels") == 16
    tight = plan_for(cells, 400, epoch_s={16: 200.0, 8: 20.0})
    assert tight.recipe.get("unetpp.base_channels") < 16
    assert len(tight.tried) >= 2  # the wider candidate was timed and set aside


def test_the_last_epoch_is_not_left_mostly_unused(cells):
    """7 epochs of 80 s leave 50 s of a 610 s room: 8 epochs of fewer patches fill it."""
    planned = plan_for(cells, 670, epoch_s={16: 60.0, 8: 25.0})
    full = rules.patches_per_epoch(cells, 1.0, planned.recipe.get("preprocess.crop_size"), 50)
    assert planned.epochs == 8 and planned.recipe.get("unetpp.base_channels") == 16
    assert planned.recipe.get("preprocess.patches_per_epoch") < full
    assert planned.total_s == pytest.approx(budget.TARGET * 670, rel=0.01)
    assert any("trimmed to fill the budget" in r for r in planned.recipe.reasons)


def test_a_budget_too_small_is_one_line_with_the_minimum(cells):
    with pytest.raises(PipelineError, match=r"too small .* needs about .*--budget \d+m or more"):
        plan_for(cells, 60)


def test_a_compiled_unetpp_pays_its_compile_out_of_the_budget(cells, monkeypatch):
    import pipeline.plan as plan

    monkeypatch.setattr(plan, "compile_seconds", lambda arch, p, n: 35.0 if arch == "unetpp" else 0)
    planned = plan_for(cells, 1800)
    assert planned.costs.compile_s["unetpp"] == 35.0
    # its steps count at the compiled rate (and the epoch's share of the patches it keeps)
    share = planned.costs.steps_s["unetpp"] / 60.0
    assert planned.costs.epoch_s["unetpp"] == pytest.approx(60.0 * share * plan.COMPILED_STEP)
    assert planned.total_s <= budget.TARGET * 1800


def test_the_training_stages_get_a_hard_limit_above_their_plan(cells):
    planned = plan_for(cells, 1800)
    overlay = budget.finish(planned, default_params(), 1800)
    for arch in ("unet", "unetpp"):
        planned_s = planned.epochs * planned.costs.epoch_s[arch]
        limit = overlay["budget"][f"train_{arch}_s"]
        assert limit == pytest.approx(budget.TRAIN_SLACK * planned_s, rel=0.01)


@pytest.mark.parametrize(
    "text,seconds", [("20m", 1200), ("1h30m", 5400), ("90s", 90), ("1.5h", 5400)]
)
def test_budgets_are_durations(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["20", "", "0m", "twenty minutes", "-5m"])
def test_a_budget_that_is_not_a_duration_names_the_option(text):
    with pytest.raises(PipelineError, match="--budget"):
        parse_budget(text)


# --- the command -------------------------------------------------------------------------------


FAST = ["--seconds", "0.05"]  # steps timed briefly: the figures only need to be real


def folder_dataset(root, values=(0, 1), count=12):
    """Images and labels of discs whose label values are `values` (background, object)."""
    for i in range(count):
        label = discs(h=64, w=64, radius=5, gap=4)
        raw = np.where(label == 1, values[1], values[0]).astype(np.uint8)
        if len(values) == 3:
            raw[:2] = values[2]  # a border of the third value
        save_image(root / "images" / f"{i:02d}.png", image(64, 64))
        save_image(root / "labels" / f"{i:02d}.png", raw)
    return root


@pytest.fixture
def folder_project(project, tmp_path):
    """A project whose dataset is a folder of cells (timed for real by pipeline.plan)."""
    (project / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    from pipeline.preset import apply

    source = folder_dataset(tmp_path / "cells")
    apply({"dataset": {"name": "folder", "source": str(source)}})
    return project


def test_apply_writes_the_recipe_the_mapping_and_the_reasons(folder_project, tmp_path):
    out = tmp_path / "autoconf.json"
    main(["--budget", "5m", "--apply", "--json", str(out), *FAST])
    p = load_params()
    assert p.dataset.folder.mapping == {0: 0, 1: 1}  # the labels hold 0/1, proposed and written
    assert p.autoconf.budget_s == 300 and 0 < p.autoconf.planned_s <= 300
    assert json.loads(p.autoconf.fingerprint)["images"]["train"] > 0
    assert any(r.startswith("epochs: ") for r in p.autoconf.reasons)
    assert p.budget.train_unet_s > 0 and p.budget.train_unetpp_s > 0
    written = json.loads(out.read_text())
    assert written["plan"]["total"] == pytest.approx(p.autoconf.planned_s)
    # the stages at the chosen epochs add up to the total the budget was checked against
    assert sum(written["plan"]["stages"].values()) == pytest.approx(written["plan"]["total"], abs=1)
    assert written["plan"]["epochs"] == p.epochs
    # a second run replaces the fingerprint and keeps params.yaml loadable
    main(["--budget", "4m", "--apply", *FAST])
    assert load_params().autoconf.budget_s == 240


def test_source_on_the_command_line_plans_that_folder_and_apply_writes_it(project, tmp_path):
    """`--source DIR` alone: a folder of images/ and labels/ planned from the default params,
    and written with the recipe (the README's "your own data" in two commands)."""
    (project / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    source = folder_dataset(tmp_path / "mine")
    main(["--budget", "5m", "--source", str(source), "--apply", *FAST])
    p = load_params()
    assert (p.dataset.name, p.dataset.source) == ("folder", str(source))
    assert p.dataset.folder.mapping == {0: 0, 1: 1} and p.autoconf.budget_s == 300


def test_a_source_that_is_not_there_is_one_line_and_writes_nothing(project, tmp_path):
    (project / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    before = (project / "params.yaml").read_text()
    with pytest.raises(PipelineError, match="nowhere"):
        main(["--budget", "5m", "--source", str(tmp_path / "nowhere"), "--apply", *FAST])
    assert (project / "params.yaml").read_text() == before


def test_without_apply_nothing_is_written(folder_project):
    before = (folder_project / "params.yaml").read_text()
    main(["--budget", "5m", *FAST])
    assert (folder_project / "params.yaml").read_text() == before


def test_labels_read_two_ways_stop_with_both_and_write_nothing(folder_project, tmp_path):
    from pipeline.preset import apply

    apply({"dataset": {"source": str(folder_dataset(tmp_path / "three", (0, 255, 128)))}})
    before = (folder_project / "params.yaml").read_text()
    with pytest.raises(PipelineError, match="more than one way.*dataset.folder.mapping"):
        main(["--budget", "5m", "--apply", *FAST])
    assert (folder_project / "params.yaml").read_text() == before


def test_a_budget_too_small_writes_nothing(folder_project):
    before = (folder_project / "params.yaml").read_text()
    with pytest.raises(PipelineError, match="too small"):
        main(["--budget", "10s", "--apply", *FAST])
    assert (folder_project / "params.yaml").read_text() == before


def test_a_thin_middle_value_is_still_two_readings_not_a_lossy_mask():
    """0/128/255 with the 128 border under 1% of the pixels: three classes, or an ignored
    border? Not a JPEG-damaged 0/255 mask (that has many values)."""
    thin = check_mapping({0: 9000, 128: 50, 255: 950}, {0: 0, 255: 1}, ["bg", "fg"])
    assert thin.proposal is None and len(thin.readings) == 2
    trimap = check_mapping({1: 500, 2: 300, 3: 200}, {0: 0, 255: 1}, ["bg", "fg"])
    assert trimap.proposal is None and "{1: 0, 2: 255, 3: 1}" in trimap.message()


def test_the_reports_recipe_table_keeps_values_with_colons_whole():
    from pipeline.report.recipe import reasons_table

    values = {"dataset": {"folder": {"mapping": {0: 0, 1: 1}}}, "lr": 0.002, "loss": {"x": None}}
    reasons = ["dataset.folder.mapping: 1 the object: 22% of the pixels", "lr: Adam at batch 8"]
    table = reasons_table([*reasons, "loss.x: off"], values)
    assert table.to_dict("records") == [
        {"param": "dataset.folder.mapping", "value": "{0: 0, 1: 1}",
         "why": "1 the object: 22% of the pixels"},
        {"param": "lr", "value": "0.002", "why": "Adam at batch 8"},
        {"param": "loss.x", "value": "null", "why": "off"},
    ]  # fmt: skip


def test_the_epochs_and_the_compile_decision_they_lead_to_agree(cells, monkeypatch):
    """Compiling from 9 epochs on (its steps repay it) makes the steps faster but costs 35 s:
    whatever the epochs found, the costs returned are those of that many epochs."""
    import pipeline.plan as plan

    monkeypatch.setattr(
        plan,
        "compile_seconds",
        lambda arch, p, n: 35.0 if arch == "unetpp" and p.epochs >= 9 else 0,
    )
    for budget_s in (700, 760, 800, 900, 1000):
        planned = plan_for(cells, budget_s)
        compiled = planned.costs.compile_s["unetpp"] > 0
        assert compiled == (planned.epochs >= 9), budget_s
        assert planned.total_s <= budget.TARGET * budget_s


def test_a_preset_applied_after_autoconf_clears_its_limits_and_account(folder_project):
    from pipeline import preset

    main(["--budget", "5m", "--apply", *FAST])
    assert load_params().budget.train_unet_s > 0
    overlay, _ = preset.resolve("ci-cpu")
    preset.apply(overlay)
    p = load_params()
    assert p.budget.train_unet_s == 0 and p.budget.train_unetpp_s == 0
    assert p.autoconf.budget_s == 0 and p.autoconf.fingerprint == "" and p.autoconf.reasons == []


def test_a_proposed_mapping_replaces_the_old_one_whole(folder_project):
    """{0: 0, 255: 1} -> {0: 0, 1: 1}, not their union (a leaf-by-leaf -S would merge)."""
    from pipeline import preset

    preset.apply({"dataset": {"folder": {"mapping": {0: 0, 1: 1}}}})
    assert load_params().dataset.folder.mapping == {0: 0, 1: 1}
