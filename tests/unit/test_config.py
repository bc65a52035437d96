"""params.yaml validation, as a spec: what loads, the defaults, and the one-line errors."""

from __future__ import annotations

import pytest
import yaml

from pipeline.core import paths
from pipeline.core.common import PipelineError
from pipeline.core.config import Params, flatten, load_params, parse_params


def _error(data) -> str:
    """The PipelineError message parse_params raises for `data` (fails if none is raised)."""
    with pytest.raises(PipelineError) as info:
        parse_params(data)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    assert message.startswith("params.yaml: ")
    return message


# --- what loads ---------------------------------------------------------------------------------


def test_shipped_params_yaml_loads_and_matches_the_file():
    params = load_params(paths.PARAMS)
    raw = yaml.safe_load(paths.PARAMS.read_text())
    assert isinstance(params, Params)
    assert params.model_dump() == parse_params(raw).model_dump()
    assert params.lr == raw["lr"]
    assert params.unetpp.depth == raw["unetpp"]["depth"]
    assert params.loss.ds_weights == raw["loss"]["ds_weights"]


def test_load_params_without_argument_reads_the_project_params_yaml():
    assert load_params() == load_params(paths.PARAMS)


def test_empty_mapping_and_empty_file_give_the_defaults_where_asked(tmp_path):
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    assert load_params(empty, complete=False) == parse_params({}) == parse_params(None) == Params()


READ_ALL = "missing (the stages read every key of params.yaml; add it back, "


@pytest.mark.parametrize(
    ("delete", "hint"),
    [
        ("batch_size", "its default is 8)"),
        ("inference.tta", 'its default is "none")'),
        ("train", "the whole section, as in the project's params.yaml)"),
    ],
)
def test_a_stage_refuses_a_params_file_that_lacks_a_key(tmp_path, delete, hint):
    """Outside DVC too: a deleted key is an error naming it, not a silent default."""
    data = yaml.safe_load(paths.PARAMS.read_text())
    *parents, last = delete.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError) as err:
        load_params(path)
    assert str(err.value) == f"params.yaml: {delete}: {READ_ALL}{hint}"
    load_params(path, complete=False)  # what the benchmark scripts read: defaults fill in


def test_an_empty_params_file_names_the_first_key_and_how_many_more(tmp_path):
    empty = tmp_path / "params.yaml"
    empty.write_text("")
    with pytest.raises(
        PipelineError, match=r"^params\.yaml: seed: missing \(.*; \d+ more missing\)$"
    ):
        load_params(empty)


def test_defaults():
    p = parse_params({})
    assert (p.seed, p.lr, p.epochs, p.batch_size) == (42, 0.003, 12, 8)
    assert (p.train.scheduler, p.train.warmup_epochs) == ("cosine", 1.0)
    assert p.dataset.name == "synthetic"
    assert (p.dataset.num_images, p.dataset.image_size) == (32, 128)
    assert (p.dataset.val_count, p.dataset.test_count) == (4, 8)
    assert (p.preprocess.crop_size, p.preprocess.crop_stride) == (64, 32)
    for model in (p.unet, p.unetpp):
        assert (model.base_channels, model.depth) == (16, 4)
        assert (model.upsampling, model.norm) == ("transpose", "batch")
    assert p.unetpp.deep_supervision is True
    assert p.loss.ds_weights == [0.25] * 4
    assert p.train.optimizer == "adam" and p.train.monitor == "val_miou"
    assert p.pruning.depths == [1, 2, 3, 4]
    assert p.mlflow.tracking_uri == "" and p.mlflow.enabled is True


def test_partial_sections_keep_the_other_defaults():
    p = parse_params({"unet": {"base_channels": 8}, "lr": 1})  # an int is a valid float
    assert p.unet.base_channels == 8
    assert p.unet.depth == 4
    assert p.lr == 1.0
    assert p.unetpp.base_channels == 16


def test_channels_double_at_each_level():
    from pipeline.models.config import ModelConfig

    p = parse_params({"unet": {"base_channels": 8, "depth": 3}})
    config = ModelConfig.of("unet", 3, 2, **p.unet.model_dump(include={"base_channels", "depth"}))
    assert config.channels == (8, 16, 32, 64)
    assert p.model("unet") is p.unet
    assert p.model("unetpp") is p.unetpp


def test_params_are_frozen():
    p = parse_params({})
    with pytest.raises(ValueError):
        p.lr = 1.0


# --- one-line errors that name the key ----------------------------------------------------------


def test_unknown_top_level_key():
    assert _error({"lrr": 0.1}) == "params.yaml: lrr: unknown key"


def test_unknown_nested_key():
    assert _error({"unet": {"bogus": 1}}) == "params.yaml: unet.bogus: unknown key"


def test_lr_as_a_string_is_a_type_error():
    message = _error({"lr": "0.01"})
    assert message.startswith("params.yaml: lr: ")
    assert "'0.01'" in message


def test_fractional_epochs_is_a_type_error():
    message = _error({"epochs": 1.5})
    assert message.startswith("params.yaml: epochs: ")
    assert "integer" in message and "1.5" in message


def test_bool_is_not_an_int():
    assert _error({"seed": True}).startswith("params.yaml: seed: ")


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_an_unknown_encoder_fails_when_params_load_naming_close_ones(arch):
    message = _error({arch: {"encoder": "resnet999"}})
    assert message.startswith(f"params.yaml: {arch}.encoder: ")
    assert "unknown encoder 'resnet999'" in message and "resnet" in message.split("e.g.")[1]
    assert parse_params({arch: {"encoder": "resnet18"}}).model_dump()[arch]["encoder"] == "resnet18"


@pytest.mark.parametrize("key", ["seed", "dataset.seed"])
def test_seeds_are_bounded_where_numpy_stops(key):
    """A seed numpy cannot take fails when params load, not after the data stages ran."""
    value = 99999999999999999999999
    params = {"seed": value} if key == "seed" else {"dataset": {"seed": value}}
    message = _error(params)
    assert (
        message.startswith(f"params.yaml: {key}: ")
        and "less than or equal to 4294967295" in message
    )
    assert "\n" not in message


@pytest.mark.parametrize("lr", [0, 0.0, -1, -0.001])
def test_lr_must_be_positive(lr):
    message = _error({"lr": lr})
    assert message.startswith("params.yaml: lr: ")
    assert "greater than 0" in message


@pytest.mark.parametrize("epochs", [0, -3])
def test_epochs_must_be_at_least_one(epochs):
    message = _error({"epochs": epochs})
    assert message.startswith("params.yaml: epochs: ")
    assert "greater than or equal to 1" in message


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_unknown_upsampling(arch):
    message = _error({arch: {"upsampling": "nearest"}})
    assert message.startswith(f"params.yaml: {arch}.upsampling: ")
    assert "'nearest'" in message


def test_unknown_norm():
    assert _error({"unet": {"norm": "group"}}).startswith("params.yaml: unet.norm: ")


def test_a_section_must_be_a_mapping():
    assert _error({"unet": 5}).startswith("params.yaml: unet: ")


def test_top_level_must_be_a_mapping():
    assert _error([1, 2]) == "params.yaml: expected a mapping of keys at the top level"


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.2] * 5])
def test_ds_weights_need_one_weight_per_unetpp_depth(weights):
    message = _error({"loss": {"ds_weights": weights}})
    assert "loss.ds_weights" in message
    assert f"got {len(weights)}" in message


def test_ds_weights_length_follows_unetpp_depth():
    p = parse_params(
        {
            "unetpp": {"depth": 2},
            "loss": {"ds_weights": [0.5, 0.5]},
            "pruning": {"depths": [1, 2]},
        }
    )
    assert p.unetpp.depth == 2


def test_ds_weights_must_not_be_all_zero():
    assert "ds_weights" in _error({"loss": {"ds_weights": [0.0] * 4}})


def test_negative_loss_weight():
    assert _error({"loss": {"ce_weight": -1.0}}).startswith("params.yaml: loss.ce_weight: ")


@pytest.mark.parametrize("crop_size", [40, 72, 24])
def test_crop_size_must_be_divisible_by_2_pow_depth(crop_size):
    message = _error({"preprocess": {"crop_size": crop_size, "crop_stride": 8}})
    assert "preprocess.crop_size" in message
    assert "must be divisible by 16 for unet (depth 4, encoder none)" in message


def test_crop_stride_must_not_exceed_crop_size():
    message = _error({"preprocess": {"crop_size": 32, "crop_stride": 48}})
    assert message.startswith("params.yaml: preprocess.crop_stride (48) must not exceed")


def test_crop_size_divisibility_checks_the_unet_depth_too():
    # 48 is divisible by 2**4 (UNet++ default depth) but not by 2**5
    data = {"preprocess": {"crop_size": 48}, "unet": {"depth": 5}}
    assert "preprocess.crop_size" in _error(data)


def test_crop_size_must_not_exceed_the_image_size():
    data = {"dataset": {"image_size": 64}, "preprocess": {"crop_size": 128}}
    assert "preprocess.crop_size" in _error(data)


@pytest.mark.parametrize(("val", "test"), [(16, 16), (20, 20), (31, 1)])
def test_val_and_test_must_leave_training_images(val, test):
    message = _error({"dataset": {"num_images": 32, "val_count": val, "test_count": test}})
    assert message.startswith("params.yaml: dataset: ")
    assert "val_count + test_count" in message


def test_one_training_image_is_enough():
    p = parse_params({"dataset": {"num_images": 32, "val_count": 15, "test_count": 16}})
    assert p.dataset.val_count + p.dataset.test_count == 31


def test_pruning_depth_beyond_unetpp_depth():
    message = _error({"pruning": {"depths": [1, 5]}})
    assert "pruning.depths" in message
    assert "[5]" in message and "unetpp.depth (4)" in message


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("lr: [0.1\nepochs: 3\n")
    with pytest.raises(PipelineError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML")
    assert "\n" not in message


def test_missing_params_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(PipelineError, match="params file not found") as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_errors_from_a_file_name_that_file(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("epochs: 0\n")
    with pytest.raises(PipelineError) as info:
        load_params(path)
    assert str(info.value).startswith("other.yaml: epochs: ")


# --- flatten --------------------------------------------------------------------------------


def test_flatten_nested_dicts_to_dotted_keys():
    flat = flatten({"a": 1, "b": {"c": 2, "d": {"e": "x"}}})
    assert flat == {"a": 1, "b.c": 2, "b.d.e": "x"}


def test_flatten_with_prefix():
    assert flatten({"depth": 4}, "unet.") == {"unet.depth": 4}


def test_flatten_params_model():
    flat = flatten(parse_params({}))
    assert flat["lr"] == 0.003
    assert flat["unet.depth"] == 4
    assert flat["unetpp.deep_supervision"] is True
    assert flat["mlflow.experiment"] == "unet-pipeline"
    assert str(flat["loss.ds_weights"]) == "[0.25, 0.25, 0.25, 0.25]"
    assert not any(isinstance(v, dict) for v in flat.values())
    assert len(flat) == len(set(flat))


def test_flatten_accepts_sections_inside_a_dict():
    p = parse_params({})
    flat = flatten({"pruning": p.pruning.model_dump(), "seed": p.seed})
    assert flat["pruning.tolerance"] == 0.01
    assert flat["seed"] == 42


def test_flatten_expands_sections_passed_as_models():
    p = parse_params({})
    flat = flatten({"pruning": p.pruning, "seed": p.seed})
    assert flat["pruning.tolerance"] == 0.01
    assert "pruning" not in flat


def test_pruning_depths_must_not_be_empty():
    assert "pruning.depths" in _error({"pruning": {"depths": []}})


# --- datasets ------------------------------------------------------------------------------


def test_unknown_dataset_name_lists_the_valid_ones():
    assert _error({"dataset": {"name": "kitti"}}) == (
        "params.yaml: dataset.name: Input should be 'synthetic', 'drive', 'camvid' or 'folder' "
        "(got 'kitti')"
    )


@pytest.mark.parametrize("name", ["drive", "camvid", "folder"])
def test_real_datasets_need_a_source(name):
    message = _error({"dataset": {"name": name}})
    assert message.startswith(f"params.yaml: dataset.source is required for dataset.name={name}")


def test_a_source_with_the_synthetic_dataset_is_a_mistake():
    assert "dataset.source is set but dataset.name is synthetic" in _error(
        {"dataset": {"source": "/data/DRIVE.zip"}}
    )


def test_sha256_must_be_64_hex_digits_or_empty():
    assert "dataset.sha256" in _error({"dataset": {"sha256": "abc123"}})
    ok = {"name": "drive", "source": "x.zip", "sha256": "A" * 64}
    assert parse_params({"dataset": ok}).dataset.sha256 == "A" * 64


def test_drive_validation_count_must_leave_training_images():
    data = {"dataset": {"name": "drive", "source": "x.zip", "val_count": 20}}
    assert "dataset.val_count (20)" in _error(data)


def test_crop_size_is_not_bounded_by_the_synthetic_image_size_for_real_data():
    data = {
        "dataset": {"name": "camvid", "source": "c.zip", "image_size": 64},
        "preprocess": {"crop_size": 256, "crop_stride": 224},
    }
    assert parse_params(data).preprocess.crop_size == 256


def test_folder_mapping_keys_may_be_digit_strings_as_dvc_writes_them():
    data = {"dataset": {"folder": {"mapping": {"0": 0, "255": 1, 128: 255}}}}
    assert parse_params(data).dataset.folder.mapping == {0: 0, 255: 1, 128: 255}


def test_folder_mapping_key_that_is_not_a_number_is_named():
    message = _error({"dataset": {"folder": {"mapping": {"white": 1}}}})
    assert message.startswith("params.yaml: dataset.folder.mapping.white: ")


def test_folder_mapping_to_a_class_without_a_name_is_refused():
    message = _error({"dataset": {"folder": {"mapping": {0: 0, 255: 2}}}})
    assert "dataset.folder.mapping: class indices [2] have no name" in message


def test_folder_mapping_to_255_means_ignore():
    data = {"dataset": {"folder": {"mapping": {0: 0, 255: 1, 128: 255}}}}
    assert parse_params(data).dataset.folder.mapping[128] == 255


def test_folder_fractions_must_leave_training_images():
    message = _error({"dataset": {"folder": {"val_fraction": 0.5, "test_fraction": 0.5}}})
    assert "dataset.folder.val_fraction + test_fraction" in message


def test_patches_per_epoch_is_a_count_and_the_foreground_a_share():
    assert "preprocess.patches_per_epoch" in _error({"preprocess": {"patches_per_epoch": -1}})
    assert "preprocess.foreground" in _error({"preprocess": {"foreground": 1.5}})
    assert "preprocess.sampling" in _error({"preprocess": {"sampling": "sliding"}})
    assert "preprocess.workers" in _error({"preprocess": {"workers": -2}})


def test_the_old_crops_per_image_names_its_replacement():
    message = _error({"preprocess": {"crops_per_image": 9}})
    assert message.startswith("params.yaml: preprocess.crops_per_image: replaced by ")
    assert "preprocess.patches_per_epoch" in message and "\n" not in message


def test_grid_sampling_takes_no_patch_count():
    message = _error({"preprocess": {"sampling": "grid", "patches_per_epoch": 100}})
    assert message.startswith("params.yaml: preprocess.patches_per_epoch: grid sampling")


def test_smp_encoders_give_at_most_four_levels():
    assert "unetpp.depth: at most 4 on an smp encoder" in _error(
        {"unetpp": {"encoder": "resnet34", "depth": 5}, "loss": {"ds_weights": [1.0] * 5}}
    )


def test_smp_encoders_need_crops_divisible_by_one_more_power_of_two():
    data = {"unet": {"encoder": "resnet34", "depth": 4}, "preprocess": {"crop_size": 48}}
    assert "must be divisible by 32 for unet (depth 4, encoder resnet34)" in _error(data)


def test_encoder_weights_are_none_or_imagenet():
    assert parse_params({}).unet.encoder_weights is None
    assert parse_params({"unet": {"encoder_weights": "imagenet"}}).unet.encoder_weights
    assert "unet.encoder_weights" in _error({"unet": {"encoder_weights": "coco"}})


def test_small_numbers_as_dvc_writes_them_are_floats(tmp_path):
    """`dvc exp run -S lr=0.00001` writes `lr: 1e-05`: YAML 1.1 would read a string."""
    from pipeline.core.config import load_params

    path = tmp_path / "params.yaml"
    path.write_text("lr: 1e-05\ntrain:\n  min_lr: 5E-7\n  weight_decay: 1.0e-4\n")
    params = load_params(path, complete=False)
    assert params.lr == 1e-05
    assert params.train.min_lr == 5e-7
    assert params.train.weight_decay == 1e-4
