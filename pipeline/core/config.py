"""params.yaml, validated once into a typed object.

Any unknown key, wrong type or out-of-range value stops the stage with one line that names the
key, e.g. ``params.yaml: lr: must be > 0 (got -1)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.core import paths
from pipeline.core.common import PipelineError

PositiveInt = Annotated[int, Field(ge=1)]
IGNORE_INDEX = 255  # label value ignored by losses and metrics
DRIVE_TRAIN_IMAGES = 20
NonNegFloat = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    # strict: "0.01" (a string) is not a float; extra="forbid": typos are errors, not ignored;
    # no .inf/.nan: a non-finite weight decay or loss weight would only surface as a NaN loss
    # that blames lr
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


DATASETS = ("synthetic", "drive", "camvid", "folder")


class FolderParams(Section):
    """`dataset.name: folder`: your own images and label masks (folders relative to the
    downloaded source's root)."""

    images: Annotated[str, Field(min_length=1)] = "images"
    labels: Annotated[str, Field(min_length=1)] = "labels"
    masks: str = ""  # optional FOV/ignore masks: 0 = ignore, anything else = keep
    # raw label pixel value (the key: 255 may well be a real class, e.g. white = foreground)
    # -> class index (the value: 255 here means "ignore this pixel" in loss and metrics);
    # a raw value not listed is an error. Keys may also be digit strings ("255"), as
    # `dvc exp run -S` or JSON would write them
    mapping: dict[
        Annotated[int, Strict(False), Field(ge=0, le=65535)], Annotated[int, Field(ge=0, le=255)]
    ] = {
        0: 0,
        255: 1,
    }
    class_names: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=2)] = [
        "background",
        "foreground",
    ]
    # binary tasks: the class that sensitivity, precision, F1 (= Dice) and AUC score as
    # positive, and the model's sigmoid channel: one of class_names, or "" for the second one
    # (class index 1); unused with 3+ classes
    positive: str = ""
    # 16-bit images are scaled by 2**bit_depth - 1: 0 = the file's 16 bits; e.g. 12 for a
    # camera's 12-bit values stored in 16-bit TIFFs (8-bit images are read as they are)
    bit_depth: Annotated[int, Field(ge=0, le=16)] = 0
    split: Literal["fractions", "folders"] = "fractions"  # folders: <images>/{train,val,test}
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2

    @model_validator(mode="after")
    def _consistent(self) -> FolderParams:
        n = len(self.class_names)
        bad = sorted({c for c in self.mapping.values() if c >= n and c != IGNORE_INDEX})
        if bad:
            raise ValueError(
                f"dataset.folder.mapping: class indices {bad} have no name in "
                f"dataset.folder.class_names ({n} classes; 255 = ignore)"
            )
        if len(set(self.class_names)) != n:
            raise ValueError("dataset.folder.class_names: names must be unique")
        produced = set(self.mapping.values())
        unmapped = [name for c, name in enumerate(self.class_names) if c not in produced]
        if unmapped:  # a class no pixel can have: an extra output channel and a 0.0 IoU in mIoU
            raise ValueError(
                f"dataset.folder.class_names: no raw value in dataset.folder.mapping "
                f"{dict(self.mapping)} gives class {', '.join(map(repr, unmapped))}: map a "
                "label value to each class, or drop the name"
            )
        if n == 2 and self.positive and self.positive not in self.class_names:
            raise ValueError(
                f"dataset.folder.positive: {self.positive!r} is not one of "
                f"dataset.folder.class_names {self.class_names}"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "dataset.folder.val_fraction + test_fraction must leave training images (< 1)"
            )
        return self


class DatasetParams(Section):
    name: Literal["synthetic", "drive", "camvid", "folder"] = "synthetic"
    # drive | camvid | folder: an http(s) URL, a local archive (.zip, .tar, .tar.gz) or folder;
    # a relative path is relative to the repository root
    source: str = ""
    sha256: Annotated[str, Field(pattern=r"^([0-9a-fA-F]{64})?$")] = ""  # "" = not checked
    num_images: Annotated[int, Field(ge=3)] = 32  # synthetic
    image_size: Annotated[int, Field(ge=32, le=4096)] = 128  # synthetic
    val_count: PositiveInt = 4  # synthetic and drive (out of DRIVE's 20 training images)
    test_count: PositiveInt = 8  # synthetic
    # what the data is: the synthetic images and every seeded split (drive's validation
    # images, a folder's fractions). The top-level `seed` varies the training run only (crops,
    # init, shuffling, augmentation), so runs over seeds are scored on the same test images.
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    # download: an archive that would unpack to more than this (GB = 1e9 bytes) is refused
    # before anything is written (an archive bomb), and stopped if its headers lied
    max_unpacked_gb: Annotated[float, Field(gt=0)] = 20.0
    # preprocess: an image of more pixels is refused before it is decoded (a decompression
    # bomb: a small PNG claiming 15000x15000); PIL's own limit by default; 0 = no limit
    max_image_pixels: Annotated[int, Field(ge=0)] = 178_956_970
    folder: FolderParams = FolderParams()

    @model_validator(mode="after")
    def _consistent(self) -> DatasetParams:
        if self.name == "synthetic":
            if self.source:
                raise ValueError(
                    "dataset.source is set but dataset.name is synthetic (generated offline): "
                    "set dataset.name to drive, camvid or folder"
                )
            if self.val_count + self.test_count >= self.num_images:
                raise ValueError(
                    f"val_count + test_count ({self.val_count + self.test_count}) must leave "
                    f"training images out of num_images ({self.num_images})"
                )
        elif not self.source:
            raise ValueError(
                f"dataset.source is required for dataset.name={self.name}: "
                "an http(s) URL, a local archive or a local folder"
            )
        if self.name == "drive" and self.val_count >= DRIVE_TRAIN_IMAGES:
            raise ValueError(
                f"dataset.val_count ({self.val_count}) must leave training images out of "
                f"DRIVE's {DRIVE_TRAIN_IMAGES}"
            )
        return self


class BorderWeightParams(Section):
    """The U-Net paper's weight map w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)),
    written next to every training crop when enabled and used by the pixel-wise loss."""

    enabled: bool = False
    w0: NonNegFloat = 10.0
    sigma: Annotated[float, Field(gt=0)] = 5.0  # pixels


class PreprocessParams(Section):
    """How the data is prepared (read by the preprocess stage) and how training patches are
    cut from it (crop_size .. foreground: read by the training stages only, which sample the
    patches afresh every epoch from the stored full-size images; changing them re-trains
    without re-running preprocess)."""

    # processes that prepare the images (0: one per core, with at least 32 images each); the
    # outputs do not depend on it
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    crop_size: Annotated[int, Field(ge=16)] = 64  # training patches are crop_size px squares
    # random: a new window per patch every epoch; grid: the same windows every epoch, every
    # crop_stride px (flipped afresh), as the pipeline cut them before patches were sampled
    sampling: Literal["random", "grid"] = "random"
    crop_stride: PositiveInt = 32
    # patches (training items) per epoch, spread evenly over the training images; 0: as many
    # as the crop_stride grid has windows (grid sampling takes exactly the grid's)
    patches_per_epoch: Annotated[int, Field(ge=0)] = 0
    # share of random patches centred on a pixel of a class drawn among those the image holds
    # (binary: the foreground; multi-class: every class alike, so rare ones get as many as
    # common ones); the rest lie anywhere. nnU-Net forces a third (0.33): for small or rare
    # objects; 0 where the foreground lies in nearly every window (vessels)
    foreground: Annotated[float, Field(ge=0, le=1)] = 0.0
    # CLAHE clip limit applied to every image (all splits, and pipeline.predict); 0 = off
    clahe: Annotated[float, Field(ge=0, le=40)] = 0.0
    # every image resized by this factor before anything else (CLAHE first): the models train
    # and predict at that size, and their logits are upsampled to score every original pixel
    # (labels of val/test stay full-size); 0.5 = a quarter of the pixels per pass
    scale: Annotated[float, Field(gt=0, le=1)] = 1.0
    border_weights: BorderWeightParams = BorderWeightParams()

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "crops_per_image" in data:
            raise ValueError(
                "preprocess.crops_per_image: replaced by preprocess.patches_per_epoch (random "
                "patches are now drawn afresh every epoch): set it to crops_per_image x the "
                "training images, and drop crops_per_image"
            )
        return data

    @model_validator(mode="after")
    def _covers(self) -> PreprocessParams:
        if self.crop_stride > self.crop_size:
            raise ValueError(
                f"preprocess.crop_stride ({self.crop_stride}) must not exceed "
                f"preprocess.crop_size ({self.crop_size}): pixels would be skipped"
            )
        if self.sampling == "grid" and self.patches_per_epoch:
            raise ValueError(
                "preprocess.patches_per_epoch: grid sampling takes the grid's windows; set it "
                "to 0 or preprocess.sampling to random"
            )
        return self


class ModelParams(Section):
    base_channels: PositiveInt = 16
    depth: Annotated[int, Field(ge=1, le=6)] = 4
    upsampling: Literal["transpose", "bilinear"] = "transpose"
    norm: Literal["batch", "none"] = "batch"
    # "none": the classic conv encoder; else an smp encoder name (resnet34, efficientnet-b0, ...)
    encoder: Annotated[str, Field(min_length=1)] = "none"
    # None: random init (offline); "imagenet" downloads pretrained weights (needs internet)
    encoder_weights: Literal["imagenet"] | None = None

    def size_multiple(self) -> int:
        """Input sides must divide by this (an smp encoder starts at stride 2: one more)."""
        return 2 ** (self.depth + (self.encoder != "none"))

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, name: str) -> str:
        """An unknown name fails when params load, not as a traceback when a stage builds the
        model (smp is imported only when an smp encoder is asked for)."""
        if name != "none":
            from pipeline.core.encoders import check_encoder

            check_encoder(name)
        return name


class UNetPPParams(ModelParams):
    deep_supervision: bool = True


class LossParams(Section):
    ce_weight: NonNegFloat = 1.0
    dice_weight: NonNegFloat = 1.0
    focal_weight: NonNegFloat = 0.0  # focal loss term; 0 = off
    focal_gamma: NonNegFloat = 2.0
    # per-class weights of the CE term: null (none), "median_frequency" (from the training
    # split's class histogram), "sqrt_median_frequency" (its square root: milder) or one
    # weight per class
    class_weights: (
        Literal["median_frequency", "sqrt_median_frequency"] | list[NonNegFloat] | None
    ) = None
    # weight of each UNet++ head, shallowest (L1) first; one per depth
    ds_weights: list[NonNegFloat] = [0.25, 0.25, 0.25, 0.25]

    @model_validator(mode="after")
    def _some_weight(self) -> LossParams:
        if self.ce_weight + self.dice_weight + self.focal_weight <= 0:
            raise ValueError("loss: ce_weight + dice_weight + focal_weight must be > 0")
        if not self.ds_weights or sum(self.ds_weights) <= 0:
            raise ValueError("ds_weights must hold at least one positive weight")
        return self


class TrainParams(Section):
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    weight_decay: NonNegFloat = 0.0
    # learning-rate schedule, stepped every batch: none | step | cosine | poly
    scheduler: Literal["none", "step", "cosine", "poly"] = "cosine"
    warmup_epochs: NonNegFloat = 1.0  # linear warm-up from 0 (fractions of an epoch allowed)
    step_epochs: PositiveInt = 10  # step: multiply lr by step_gamma every step_epochs
    step_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    poly_power: Annotated[float, Field(gt=0)] = 0.9
    min_lr: NonNegFloat = 0.0  # cosine / poly end at this lr
    grad_clip: NonNegFloat = 0.0  # max gradient norm; 0 = off
    # augmentation of the training crops: dihedral = flips and 90-degree rotations (no up:
    # vessels, cells); scene = horizontal flip, zoom and brightness/contrast jitter (photographs
    # with an up); none. true / false (older params) mean dihedral / none.
    augment: Literal["none", "dihedral", "scene"] = "dihedral"
    num_workers: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # mixed precision: auto = bf16 where the hardware has it natively (CUDA; CPUs with AVX512-BF16
    # or AMX), else fp32 (pipeline.engine.numerics); fp16 adds a gradient scaler
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    channels_last: bool = True  # NHWC: on CUDA, and on a CPU with bf16
    # torch.compile the forward; auto: where the run is long enough to repay compiling
    # (pipeline.engine.numerics.compile_decision: UNet++ in bf16 on a CPU from 80 M patch
    # pixels; never on CUDA, where the GPU presets set true)
    compile: bool | Literal["auto"] = "auto"
    # processes for DDP (torchrun, one per GPU; gloo on CPU); batch_size is the global batch.
    # Under an outer `torchrun`, its WORLD_SIZE wins.
    processes: PositiveInt = 1
    resume: bool = True  # continue an interrupted run from its last epoch checkpoint
    # metric that picks the best checkpoint; "val_loss" is minimised, the others maximised;
    # "last" keeps the final epoch (as nnU-Net does): for a schedule that decays to its end
    # and a validation split too small to rank epochs that differ by less than its noise
    monitor: Literal[
        "val_loss", "val_miou", "val_dice", "val_global_accuracy", "val_mean_accuracy", "last"
    ] = "val_miou"

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_bool(cls, value: object) -> object:
        """`augment: true` in params written before the named policies still means flips."""
        if isinstance(value, bool):
            return "dihedral" if value else "none"
        return value


class PruningParams(Section):
    depths: Annotated[list[Annotated[int, Field(ge=1, le=6)]], Field(min_length=1)] = [1, 2, 3, 4]
    latency_runs: PositiveInt = 20
    latency_warmup: Annotated[int, Field(ge=0)] = 3
    # the report's "best depth": the shallowest whose test mIoU is within this of the deepest
    tolerance: NonNegFloat = 0.01
    # export the full UNet++ and every pruned depth to models/onnx/: asked for, since the five
    # exports take longer than the rest of the prune stage (pipeline.export does one on demand)
    onnx: bool = False


class InferenceParams(Section):
    """Full-size images (validation, test, `pipeline.predict`) are predicted tile by tile:
    mirror padding at the borders, tiles overlapping by `tile_overlap` px, blended."""

    tile_size: Annotated[int, Field(ge=0)] = 128  # 0 = the whole image in one forward
    tile_overlap: Annotated[int, Field(ge=0)] = 32
    blend: Literal["gaussian", "constant"] = "gaussian"
    # test-time augmentation: average the logits of the image and its flips (x2 or x4 cost)
    tta: Literal["none", "hflip", "flips"] = "none"

    @model_validator(mode="after")
    def _overlap(self) -> InferenceParams:
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise ValueError(
                f"inference.tile_overlap ({self.tile_overlap}) must be smaller than "
                f"inference.tile_size ({self.tile_size})"
            )
        return self


class ReportParams(Section):
    dpi: Annotated[int, Field(ge=50, le=600)] = 110
    metric: Literal["miou", "dice", "global_accuracy", "mean_accuracy"] = "miou"
    # qualitative panels (image, truth, both predictions, their errors) of the first N test
    # images; 0 = none
    panels: Annotated[int, Field(ge=0, le=20)] = 3
    # true: a smoke test (the ci-cpu preset) whose metrics mean nothing: the report says so at
    # its top, every MLflow run of it is tagged pipeline.smoke (the parent run's description
    # too), and no model is registered
    smoke: bool = False


class MlflowParams(Section):
    # empty: sqlite:///<repo root>/mlflow.db; MLFLOW_TRACKING_URI overrides both
    tracking_uri: str = ""
    experiment: Annotated[str, Field(min_length=1)] = "unet-pipeline"
    enabled: bool = True
    # the report stage registers the chosen model under this name ({dataset} filled in);
    # "" registers nothing
    registered_model: str = "unet-family-{dataset}"


class BudgetParams(Section):
    """Wall-time limits of the training stages, in seconds (0: none). A stage that reaches its
    limit stops after the epoch that crossed it, keeps its best epoch so far, and says so in its
    metrics and the report. `python -m pipeline.autoconf --apply` sets them from its plan."""

    train_unet_s: NonNegFloat = 0.0  # read by name (train_<arch>_s): each stage lists its own
    train_unetpp_s: NonNegFloat = 0.0


class AutoconfParams(Section):
    """What `python -m pipeline.autoconf --apply` measured and chose: shown by the report and
    bench/results.py, logged with every param on the MLflow parent run; no stage computes with
    it. Empty when no recipe was planned (a preset applied afterwards empties it)."""

    budget_s: NonNegFloat = 0.0  # the budget of `dvc repro` the recipe was planned for
    planned_s: NonNegFloat = 0.0  # the plan's estimate of that `dvc repro`
    # the training data's fingerprint (pipeline.autoconf) as one JSON object: a single value
    # for DVC's YAML writer (which mangles an emptied block mapping) and for MLflow
    fingerprint: str = ""
    reasons: list[str] = []  # "key: why", one per choice (the value: the param itself)


class Params(Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42  # numpy's seeds stop at 2**32 - 1
    lr: Annotated[float, Field(gt=0, le=10)] = 0.003
    epochs: PositiveInt = 12
    batch_size: PositiveInt = 8
    dataset: DatasetParams = DatasetParams()
    preprocess: PreprocessParams = PreprocessParams()
    unet: ModelParams = ModelParams()
    unetpp: UNetPPParams = UNetPPParams()
    loss: LossParams = LossParams()
    train: TrainParams = TrainParams()
    inference: InferenceParams = InferenceParams()
    pruning: PruningParams = PruningParams()
    report: ReportParams = ReportParams()
    mlflow: MlflowParams = MlflowParams()
    budget: BudgetParams = BudgetParams()
    autoconf: AutoconfParams = AutoconfParams()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.dataset.name == "synthetic" and self.preprocess.crop_size > self.dataset.image_size:
            raise ValueError("preprocess.crop_size must not exceed dataset.image_size")
        for arch in ("unet", "unetpp"):
            mp = self.model(arch)
            multiple = mp.size_multiple()
            if self.preprocess.crop_size % multiple:
                raise ValueError(
                    f"preprocess.crop_size ({self.preprocess.crop_size}) must be divisible by "
                    f"{multiple} for {arch} (depth {mp.depth}, encoder {mp.encoder})"
                )
            if mp.encoder != "none" and mp.depth > 4:
                raise ValueError(f"{arch}.depth: at most 4 on an smp encoder")
            tile = self.inference.tile_size
            if tile % multiple:
                raise ValueError(
                    f"inference.tile_size ({tile}) must be divisible by {multiple} for {arch} "
                    f"(depth {mp.depth}, encoder {mp.encoder})"
                )
        if self.batch_size % self.train.processes:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by train.processes "
                f"({self.train.processes}): it is the global batch"
            )
        if len(self.loss.ds_weights) != self.unetpp.depth:
            raise ValueError(
                f"loss.ds_weights needs one weight per UNet++ depth ({self.unetpp.depth}), "
                f"got {len(self.loss.ds_weights)}"
            )
        bad = [d for d in self.pruning.depths if d > self.unetpp.depth]
        if bad:
            raise ValueError(f"pruning.depths {bad} exceed unetpp.depth ({self.unetpp.depth})")
        return self

    def model(self, arch: str) -> ModelParams:
        return {"unet": self.unet, "unetpp": self.unetpp}[arch]


def _one_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if p != "[key]")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    # model-level checks name their keys themselves
    where = f"{source}: {key}" if key and not msg.startswith(f"{key}.") else source
    got = f" (got {err['input']!r})" if err["type"] not in {"extra_forbidden", "missing"} else ""
    if err["loc"] == () or err["type"] == "value_error":
        got = ""
    return f"{where}: {msg}{got}"


def parse_params(data: Any, source: str = "params.yaml") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"{source}: expected a mapping of keys at the top level")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(_one_line(exc, source)) from None


class _ParamsLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-05`, how `dvc exp run -S lr=0.00001` writes a small number, is a
    float here, not the string YAML 1.1 (PyYAML's default) makes of an exponent without a dot."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _unique_keys(loader: _ParamsLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    """A key written twice in one mapping is an error: YAML would keep the later value
    silently, and the edit a user makes to the earlier one would do nothing."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{key!r} is written twice (lines {seen[key]} and {line}); keep one",
                key_node.start_mark,
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_ParamsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def load_yaml(text: str) -> Any:
    """Parse params YAML (safe, with YAML 1.2 floats)."""
    return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass


def parse_yaml(text: str, source: object) -> Any:
    """`load_yaml`, a syntax error being one line naming `source`."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None


def missing_keys(model: type[BaseModel], data: Any, prefix: str = "") -> list[str]:
    """Dotted names of the keys `model` defines that the mapping `data` lacks, in order."""
    if not isinstance(data, dict):
        return []  # not a mapping: validation says so
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            out.append(key)
        elif isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            out += missing_keys(field.annotation, data[name], f"{key}.")
    return out


def _default_hint(key: str) -> str:
    value: Any = Params()
    for part in key.split("."):
        value = getattr(value, part)
    if isinstance(value, BaseModel):
        return "the whole section, as in the project's params.yaml"
    return f"its default is {json.dumps(value)}"


def load_params(path: Path | None = None, complete: bool = True) -> Params:
    """The params file, validated. `complete` (what every stage asks for): a key the file
    lacks is an error naming it, never a silent default the run was not asked for. The
    benchmark scripts read partial files (complete=False: the rest are defaults)."""
    path = Path(path or paths.PARAMS)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: params file not found") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read params file ({exc.strerror})") from None
    data = parse_yaml(text, path)
    params = parse_params(data, path.name)
    missing = missing_keys(Params, data if data is not None else {})
    if complete and missing:
        more = f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""
        raise PipelineError(
            f"{path.name}: {missing[0]}: missing (the stages read every key of params.yaml; "
            f"add it back, {_default_hint(missing[0])}{more})"
        )
    return params


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"unet": {"depth": 4}} -> {"unet.depth": 4}, for MLflow params; sections may be
    param objects or dicts, at any level."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump()
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if isinstance(value, dict) and value:  # an empty mapping is a value of its own
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
