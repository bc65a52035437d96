"""Parameter presets (pipeline/preset.py, pipeline/presets/*.yaml): every preset is valid, its
`dvc exp run -S` list round-trips through DVC's own -S code, bad keys and values give one-line
errors, and --apply replaces params.yaml atomically. No real dvc run (it would take minutes)."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tarfile
import zipfile

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from pipeline import preset
from pipeline.core import paths
from pipeline.core.common import PipelineError, run_cli
from pipeline.core.config import Params, flatten, load_params, parse_params

PROJECT_PARAMS = paths.PARAMS  # the real params.yaml (the `project` fixture repoints paths)
KINDS = "a local .zip/.tar(.gz) archive or folder, or an http(s) URL"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Each real-dataset preset's --source: a URL, or a small zip (a local one must exist)."""
    folder = tmp_path_factory.mktemp("sources")
    for name in ("DRIVE.zip", "CamVid.zip"):
        with zipfile.ZipFile(folder / name, "w") as zf:
            zf.writestr("README", "a stand-in")
    return {
        "drive-gpu": str(folder / "DRIVE.zip"),
        "camvid-gpu": "https://example.org/CamVid.zip",
        "drive-cpu": str(folder / "DRIVE.zip"),
        "camvid-cpu": str(folder / "CamVid.zip"),
    }


def _error(call) -> str:
    with pytest.raises(PipelineError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


@pytest.fixture
def params_copy(project):
    """The project's params.yaml in a temporary project (paths.PARAMS points at it)."""
    shutil.copyfile(PROJECT_PARAMS, paths.PARAMS)
    return paths.PARAMS


@pytest.fixture
def own_presets(tmp_path, monkeypatch):
    """An empty presets folder to write test presets into."""
    folder = tmp_path / "presets"
    folder.mkdir()
    monkeypatch.setattr(preset, "PRESETS", folder)
    return folder


def test_the_presets_are_there():
    assert {"drive-gpu", "camvid-gpu", "drive-cpu", "camvid-cpu", "ci-cpu"} <= set(
        preset.available()
    )


@pytest.mark.parametrize("name", preset.available())
def test_every_preset_merges_into_valid_params(name, sources):
    overlay, merged = preset.resolve(name, sources.get(name), params_path=PROJECT_PARAMS)
    params = parse_params(merged)
    assert isinstance(params, Params)
    # every leaf of the preset is in effect
    flat = flatten(merged)
    for key, value in flatten(overlay).items():
        assert flat[key] == value, key
    if name in sources:
        assert params.dataset.source == sources[name]
    if name.endswith("-gpu"):
        assert params.train.device == "cuda" and params.train.amp == "bf16"
    else:
        assert params.train.device == "cpu" and params.train.compile in (False, "auto")


def test_gpu_presets_choices(sources):
    drive = parse_params(
        preset.resolve("drive-gpu", sources["drive-gpu"], params_path=PROJECT_PARAMS)[1]
    )
    assert drive.dataset.name == "drive" and drive.preprocess.patches_per_epoch > 0
    assert drive.unetpp.base_channels == 32 and drive.unetpp.deep_supervision
    assert drive.loss.dice_weight > 0 and not drive.preprocess.border_weights.enabled
    camvid = parse_params(
        preset.resolve("camvid-gpu", sources["camvid-cpu"], params_path=PROJECT_PARAMS)[1]
    )
    assert camvid.dataset.name == "camvid" and camvid.loss.class_weights == "median_frequency"
    assert camvid.unet.encoder == "resnet34" and camvid.unet.encoder_weights is None
    assert camvid.train.augment and camvid.train.compile is True and camvid.train.channels_last


@pytest.mark.parametrize("name", preset.available())
def test_the_set_list_round_trips_through_dvc(name, tmp_path, sources):
    """What `dvc exp run -S ...` writes (DVC's apply_overrides) is the merged params."""
    overlay, merged = preset.resolve(name, sources.get(name), params_path=PROJECT_PARAMS)
    copy = tmp_path / "params.yaml"
    shutil.copyfile(PROJECT_PARAMS, copy)
    apply_overrides(copy, preset.set_args(overlay))
    assert yaml.safe_load(copy.read_text()) == merged
    assert load_params(copy) == parse_params(merged)


def test_awkward_values_round_trip(tmp_path):
    base = {
        "a": {"s": "x", "n": 1, "f": 0.5, "b": False, "z": None, "l": [1, 2]},
        "t": "y",
        "w": "",
    }
    overlay = {
        "a": {
            "s": "it's a, b: c ${x} \\ 'q' \\'",  # quotes, a comma (a sweep), interpolation
            "n": "1",  # a string that looks like a number
            "f": 2,
            "b": "true",  # a string that looks like a bool
            "z": "null",
            "l": ["resnet34", "x y", 0.25, None, True],
        },
        "t": "https://example.org/a b/CamVid.zip?x=1&y=2",
        "w": "C:\\data\\",  # backslashes, one before the closing quote
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(base))
    apply_overrides(path, preset.set_args(overlay))
    assert yaml.safe_load(path.read_text()) == preset.merge(base, overlay)


def test_plain_names_stay_unquoted():
    args = preset.set_args({"unet": {"encoder": "resnet34"}, "train": {"monitor": "val_dice"}})
    assert args == ["unet.encoder=resnet34", "train.monitor=val_dice"]
    assert preset.set_args({"x": "none"}) == ["x=none"]
    assert preset.set_args({"x": "True"}) == ["x='True'"]


def test_print_shows_the_dvc_command_and_it_parses_back(params_copy, capsys):
    preset.main(["ci-cpu", "--print"])
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("dvc exp run -n ci-cpu -S ")
    words = shlex.split(printed)
    sets = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
    overlay, _ = preset.resolve("ci-cpu")
    assert sets == preset.set_args(overlay)
    assert "lr=0.01" in sets and "loss.ds_weights=[0.5,0.5]" in sets


def test_default_mode_runs_dvc_exp_run_with_extra_args(params_copy, monkeypatch):
    calls = []

    class Done:
        returncode = 0

    monkeypatch.setattr(preset.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    preset.main(["ci-cpu", "--exp-name", "smoke", "--", "--temp"])
    (cmd,) = calls
    assert cmd[1:7] == ["-m", "dvc", "exp", "run", "-n", "smoke"]
    assert cmd[-1] == "--temp"
    overlay, _ = preset.resolve("ci-cpu")
    assert cmd[7:-1] == [a for arg in preset.set_args(overlay) for a in ("-S", arg)]


def test_a_failing_dvc_exp_run_is_one_line(params_copy, monkeypatch):
    class Failed:
        returncode = 2

    monkeypatch.setattr(preset.subprocess, "run", lambda cmd, **kw: Failed())
    assert _error(lambda: preset.main(["ci-cpu"])) == "dvc exp run exited with status 2"


def test_a_bad_key_gives_one_line_naming_it(params_copy, own_presets):
    (own_presets / "typo.yaml").write_text("train:\n  learning_rate: 0.1\n")
    message = _error(lambda: preset.main(["typo", "--print"]))
    assert message == "preset typo: train.learning_rate: not a key of params.yaml"
    (own_presets / "deep.yaml").write_text("lr:\n  value: 0.1\n")
    assert "lr.value: not a key" in _error(lambda: preset.main(["deep", "--print"]))


def test_a_bad_value_gives_one_line_naming_the_key(params_copy, own_presets):
    (own_presets / "neg.yaml").write_text("lr: -1\n")
    message = _error(lambda: preset.main(["neg", "--print"]))
    assert message.startswith("params.yaml + preset neg: lr: ")
    assert "greater than 0" in message


def test_unknown_preset_lists_the_available_ones(params_copy):
    message = _error(lambda: preset.main(["nope", "--print"]))
    assert message.startswith("unknown preset 'nope'; available: ")
    assert "drive-gpu" in message


def test_a_real_dataset_needs_a_source(params_copy):
    message = _error(lambda: preset.main(["drive-gpu", "--print"]))
    assert "needs --source" in message


def test_apply_writes_valid_params_yaml_atomically(params_copy, sources):
    before = params_copy.read_text()
    source = sources["drive-gpu"]
    preset.main(["drive-gpu", "--source", source, "--apply"])
    after = params_copy.read_text()
    params = load_params(params_copy)
    _, merged = preset.resolve("drive-gpu", source, params_path=PROJECT_PARAMS)
    assert params == parse_params(merged)
    assert params.dataset.source == source and params.epochs == 40
    # DVC's -S code keeps the comments and the key order
    assert after.splitlines()[0] == before.splitlines()[0]
    assert list(yaml.safe_load(after)) == list(yaml.safe_load(before))
    assert sorted(p.name for p in params_copy.parent.iterdir()) == ["params.yaml"]


def test_small_values_survive_dvcs_yaml_writer(params_copy, own_presets):
    # DVC writes 0.00001 as 1e-05 (an exponent without a dot): the stages read a float
    (own_presets / "tiny-lr.yaml").write_text("train:\n  min_lr: 0.00001\n")
    preset.main(["tiny-lr", "--apply"])
    assert load_params(params_copy).train.min_lr == 1e-05
    assert sorted(p.name for p in params_copy.parent.iterdir()) == ["params.yaml"]


def test_apply_takes_no_dvc_arguments(params_copy):
    message = _error(lambda: preset.main(["ci-cpu", "--apply", "--", "--temp"]))
    assert "not --apply" in message


# --- --source is checked when the preset is applied, not when download runs ------------------


def test_a_local_source_that_is_not_there_exits_1_at_preset_time(params_copy, tmp_path, caplog):
    """The issue's case: `--source /nonexistent/DRIVE.zip --apply` exited 0."""
    before = params_copy.read_text()
    missing = tmp_path / "nonexistent" / "DRIVE.zip"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(preset.main, ["drive-cpu", "--source", str(missing), "--apply"])
    assert exit_info.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"--source: {missing} not found ({KINDS})"]
    assert params_copy.read_text() == before
    assert sorted(p.name for p in params_copy.parent.iterdir()) == ["params.yaml"]


def test_a_source_that_is_no_archive_or_folder_is_one_line(params_copy, tmp_path):
    text = tmp_path / "DRIVE.zip"
    text.write_text("not an archive\n")
    message = _error(lambda: preset.main(["drive-cpu", "--source", str(text), "--print"]))
    assert message == f"--source: {text} is not a .zip or .tar(.gz) archive ({KINDS})"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    message = _error(lambda: preset.main(["drive-cpu", "--source", str(fifo), "--print"]))
    assert message == f"--source: {fifo} is not a regular file or folder ({KINDS})"


def test_a_relative_source_is_checked_against_the_project_root(params_copy):
    message = _error(lambda: preset.main(["drive-cpu", "--source", "inputs/DRIVE.zip", "--print"]))
    assert message == f"--source: {paths.ROOT / 'inputs' / 'DRIVE.zip'} not found ({KINDS})"


def test_folders_archives_and_urls_pass_and_urls_are_not_fetched(params_copy, tmp_path, sources):
    tar = tmp_path / "DRIVE.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(params_copy, arcname="params.yaml")
    for source in (str(tmp_path), str(tar), sources["drive-cpu"], "https://localhost:1/x.zip"):
        preset.main(["drive-cpu", "--source", source, "--print"])
