"""UNet and UNet++: shapes, gradients, deep supervision, pruning, the registry, parameter counts
and checkpoints. Tiny channel counts and inputs throughout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.core.common import PipelineError
from pipeline.engine.checkpoint import load_checkpoint, save_checkpoint
from pipeline.inference.stats import count_params
from pipeline.models import REGISTRY, build_model, out_channels
from pipeline.models.config import ModelConfig
from pipeline.models.unet import UNet
from pipeline.models.unetpp import UNetPlusPlus, node


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise_norm_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm running statistics, so eval-mode comparisons exercise them."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _unetpp(depth: int = 3, norm: str = "batch", **kw) -> UNetPlusPlus:
    model = build_model("unetpp", 3, 2, base_channels=4, depth=depth, norm=norm, **kw)
    return _randomise_norm_stats(model)


# --- UNet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("depth", [2, 3])
def test_unet_output_shape(upsampling, norm, depth):
    model = build_model(
        "unet", 3, 4, base_channels=4, depth=depth, upsampling=upsampling, norm=norm
    )
    assert isinstance(model, UNet) and model.depth == depth
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4, 32, 32)


def test_unet_norm_none_has_no_batchnorm_and_uses_conv_bias():
    model = build_model("unet", 3, 2, base_channels=4, depth=2, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)
    batch = build_model("unet", 3, 2, base_channels=4, depth=2, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize(("h", "w"), [(37, 45), (33, 32), (17, 50)])
def test_unet_same_padding_keeps_odd_sizes(upsampling, h, w):
    model = build_model("unet", 1, 2, base_channels=4, depth=3, upsampling=upsampling)
    assert model(torch.randn(1, 1, h, w)).shape == (1, 1, h, w)


def _valid_output_size(size: int, depth: int) -> int:
    """Output size of the paper's valid-convolution U-Net: each DoubleConv loses 4 px."""
    for _ in range(depth):
        size = (size - 4) // 2
    size -= 4
    for _ in range(depth):
        size = size * 2 - 4
    return size


def test_valid_output_size_helper_matches_the_paper():
    assert _valid_output_size(572, 4) == 388


@pytest.mark.parametrize(("size", "depth", "expected"), [(188, 4, 4), (572, 4, 388), (60, 2, 20)])
def test_unet_valid_padding_gives_the_paper_style_smaller_output(size, depth, expected):
    assert _valid_output_size(size, depth) == expected
    model = build_model("unet", 1, 2, base_channels=2, depth=depth, norm="none", padding=0)
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 1, size, size))
    assert out.shape == (1, 1, expected, expected)


def test_unet_backward_reaches_every_parameter():
    model = build_model("unet", 3, 2, base_channels=4, depth=3)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


# --- UNet++ ---------------------------------------------------------------------------------


def test_unetpp_nodes_live_in_a_module_dict():
    model = _unetpp(depth=3)
    assert isinstance(model.nodes, nn.ModuleDict)
    expected = {node(i, j) for j in range(1, 4) for i in range(4 - j)}
    assert set(model.nodes.keys()) == expected
    assert len(expected) == 3 * 4 // 2
    assert isinstance(model.heads, nn.ModuleDict)
    assert model.head_depths == [1, 2, 3]


@pytest.mark.parametrize("depth", [2, 3])
def test_unetpp_deep_supervision_returns_all_heads_in_train_mode(depth):
    model = _unetpp(depth=depth).train()
    outs = model(torch.randn(2, 3, 32, 32))
    assert isinstance(outs, list) and len(outs) == depth
    for out in outs:
        assert out.shape == (2, 1, 32, 32)


def test_unetpp_returns_the_deepest_head_in_eval_mode():
    model = _unetpp(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        heads = model.forward_heads(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 32, 32)
    assert torch.equal(out, heads[3])


def test_unetpp_without_deep_supervision_has_one_head():
    model = _unetpp(depth=3, deep_supervision=False).train()
    assert model.head_depths == [3]
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 32, 32)


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_unetpp_shapes_for_every_option(upsampling, norm):
    model = _unetpp(depth=2, norm=norm, upsampling=upsampling).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_unetpp_keeps_odd_sizes():
    model = _unetpp(depth=3).eval()
    with torch.no_grad():
        heads = model.forward_heads(torch.randn(1, 3, 37, 45))
    assert all(h.shape == (1, 1, 37, 45) for h in heads.values())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_forward_heads_up_to_a_depth(k):
    model = _unetpp(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_heads(x)
        part = model.forward_heads(x, depth=k)
    assert list(part) == list(range(1, k + 1))
    for j, logits in part.items():
        assert torch.equal(logits, full[j])


@pytest.mark.parametrize("depth", [0, 4])
def test_forward_heads_rejects_a_depth_out_of_range(depth):
    with pytest.raises(ValueError, match="depth"):
        _unetpp(depth=3).forward_heads(torch.randn(1, 3, 32, 32), depth=depth)


def test_unetpp_backward_with_deep_supervision_reaches_every_parameter():
    model = _unetpp(depth=3).train()
    outs = model(torch.randn(2, 3, 32, 32))
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("depth", [2, 3])
def test_prune_to_every_depth_reproduces_that_head(depth):
    model = _unetpp(depth=depth).eval()
    x = torch.randn(2, 3, 32, 32)
    full_params = count_params(model)
    with torch.no_grad():
        heads = model.forward_heads(x)
        for k in range(1, depth + 1):
            pruned = model.prune(k)
            assert isinstance(pruned, UNetPlusPlus)
            assert pruned.depth == k and pruned.head_depths == [k]
            assert not pruned.training
            if k < depth:
                assert count_params(pruned) < full_params
            else:  # same nodes, one head instead of `depth`
                assert count_params(pruned) <= full_params
            out = pruned(x)
            assert out.shape == heads[k].shape
            assert torch.equal(out, heads[k])


def test_pruned_model_holds_only_the_nodes_its_head_needs():
    pruned = _unetpp(depth=3).prune(2)
    assert set(pruned.nodes.keys()) == {node(0, 1), node(1, 1), node(0, 2)}
    assert len(pruned.encoder) == 3
    assert list(pruned.heads.keys()) == ["2"]


def test_params_shrink_with_pruning_depth():
    model = _unetpp(depth=3)
    counts = [count_params(model.prune(k)) for k in (1, 2, 3)]
    assert counts == sorted(counts) and len(set(counts)) == 3


def test_pruned_model_is_a_standalone_copy():
    model = _unetpp(depth=3).eval()
    pruned = model.prune(2)
    before = model.encoder[0].block[0].weight.clone()
    with torch.no_grad():
        pruned.encoder[0].block[0].weight.add_(1.0)
    assert torch.equal(model.encoder[0].block[0].weight, before)


def test_prune_keeps_the_training_mode():
    model = _unetpp(depth=3)
    assert model.train().prune(2).training
    assert not model.eval().prune(2).training


def test_prune_without_that_head_raises():
    model = _unetpp(depth=3, deep_supervision=False)
    with pytest.raises(ValueError, match="no head at depth 2"):
        model.prune(2)
    assert model.prune(3).head_depths == [3]
    with pytest.raises(ValueError, match="no head at depth 4"):
        _unetpp(depth=3).prune(4)


def test_heads_must_lie_within_the_depth():
    with pytest.raises(ValueError, match="heads"):
        UNetPlusPlus(ModelConfig("unetpp", 3, 2, base_channels=4, depth=2, heads=(3,)))


# --- registry -------------------------------------------------------------------------------


def test_registry_holds_both_architectures():
    assert set(REGISTRY) == {"unet", "unetpp"}
    assert isinstance(build_model("unetpp", 3, 2, base_channels=4, depth=2), UNetPlusPlus)


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown arch 'resnet'; valid: unet, unetpp"):
        build_model("resnet", 3, 2)


@pytest.mark.parametrize(("arch", "option"), [("unet", "bogus"), ("unetpp", "padding")])
def test_unknown_option_is_rejected(arch, option):
    with pytest.raises(ValueError, match=option) as info:
        build_model(arch, 3, 2, base_channels=4, depth=2, **{option: 1})
    assert str(info.value).startswith(f"{arch}: ")


def test_unknown_upsampling_is_rejected():
    with pytest.raises(ValueError, match="upsampling"):
        build_model("unet", 3, 2, base_channels=4, depth=2, upsampling="nearest")


def test_num_classes_must_be_at_least_two():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("unet", 3, 1)


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
@pytest.mark.parametrize(("num_classes", "channels"), [(2, 1), (5, 5)])
def test_binary_gets_one_output_channel_multiclass_one_per_class(arch, num_classes, channels):
    assert out_channels(num_classes) == channels
    model = build_model(arch, 3, num_classes, base_channels=4, depth=2).eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, channels, 16, 16)


# --- the paper's configuration --------------------------------------------------------------

PAPER = dict(base_channels=32, depth=4, norm="none", upsampling="transpose")


def _millions(model: nn.Module) -> float:
    return round(count_params(model) / 1e6, 2)


def test_paper_configuration_parameter_counts():
    """UNet++ paper (Zhou et al. 2018), one input and one output channel: UNet 7.76M,
    UNet++ 9.04M; pruned to L1..L4: 0.10M, 0.51M, 2.21M, 9.04M, counted as the paper does, with
    the pruned model's supervision heads (a 1x1 conv each). Standalone, with head k only:
    100,961 / 511,105 / 2,204,961 / 9,041,601."""
    unet = build_model("unet", 1, 2, **PAPER)
    unetpp = build_model("unetpp", 1, 2, **PAPER)
    assert count_params(unet) == 7_759_521 and _millions(unet) == 7.76
    assert count_params(unetpp) == 9_041_700 and _millions(unetpp) == 9.04
    paper = [_millions(unetpp.prune(k, keep_heads=True)) for k in (1, 2, 3, 4)]
    assert paper == [0.10, 0.51, 2.21, 9.04]
    alone = [count_params(unetpp.prune(k)) for k in (1, 2, 3, 4)]
    assert alone == [100_961, 511_105, 2_204_961, 9_041_601]


def test_prune_keeping_heads_still_outputs_head_k():
    model = _unetpp(depth=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        sub = model.prune(2, keep_heads=True).eval()
        assert sub.head_depths == [1, 2]
        assert torch.equal(sub(x), model.forward_heads(x)[2])


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    options = dict(base_channels=4, depth=2, upsampling="bilinear", norm="batch")
    model = _randomise_norm_stats(build_model("unet", 3, 2, **options)).eval()
    path = tmp_path / "models" / "unet.pt"
    config = {"in_channels": 3, "num_classes": 2, "options": options}
    save_checkpoint(path, model, arch="unet", model_config=config, best_epoch=3)
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["best_epoch"] == 3 and ckpt["arch"] == "unet"
    assert not loaded.training
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [p.name for p in path.parent.iterdir()] == ["unet.pt"]


def test_load_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(PipelineError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="not a readable checkpoint"):
        load_checkpoint(bad)


def test_load_checkpoint_of_a_foreign_torch_file_is_one_line(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(PipelineError, match="weights.pt"):
        load_checkpoint(path)


# --- the option grid, smp encoders and input sizes ------------------------------------------

SMP = "mobilenet_v2"  # a light smp encoder: random init, no download


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
@pytest.mark.parametrize("encoder", ["none", SMP])
def test_every_option_combination_builds_keeps_the_size_and_trains(
    arch, depth, norm, upsampling, encoder
):
    model = build_model(
        arch, 3, 4, base_channels=4, depth=depth, norm=norm, upsampling=upsampling, encoder=encoder
    )
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    outs = out if isinstance(out, list) else [out]
    assert all(o.shape == (2, 4, 64, 64) for o in outs)
    sum(o.square().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]


@pytest.mark.parametrize("encoder", ["mobilenet_v2", "resnet18", "efficientnet-b0"])
def test_prune_on_an_smp_encoder_reproduces_every_head_and_sheds_weights(encoder):
    model = _unetpp(depth=3, encoder=encoder).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        heads = model.forward_heads(x)
        sizes = []
        for k in (1, 2, 3):
            sub = model.prune(k).eval()
            assert torch.equal(sub(x), heads[k]), f"L{k}"
            sizes.append(count_params(sub))
    assert sizes == sorted(sizes) and sizes[-1] < count_params(model)
    assert sizes[0] < count_params(model) / 5  # the unused encoder stages are really gone


def test_smp_encoder_weights_default_to_none_and_unknown_encoders_are_listed():
    model = build_model("unet", 3, 2, base_channels=4, depth=2, encoder=SMP)
    assert model.encoder.channels == (16, 24, 32)  # the encoder's widths, not base * 2**i
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet9000'.*e\.g\."):
        build_model("unetpp", 3, 2, base_channels=4, depth=2, encoder="resnet9000")


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_smp_encoder_input_not_divisible_names_the_padded_size(arch):
    model = build_model(arch, 3, 2, base_channels=4, depth=3, encoder=SMP).eval()
    assert model.size_multiple == 16
    with pytest.raises(ValueError, match=r"input 50x70: .* divisible by 16; pad to 64x80"):
        model(torch.zeros(1, 3, 50, 70))


def test_valid_convolution_unet_names_the_nearest_size_it_takes():
    model = build_model("unet", 1, 2, base_channels=2, depth=2, norm="none", padding=0)
    with pytest.raises(ValueError, match=r"input 61x61: .* nearest valid padded size 64x64"):
        model(torch.zeros(1, 1, 61, 61))
    assert model.size_multiple is None


def test_classic_same_padding_models_take_any_size_and_suggest_a_multiple():
    for arch in ("unet", "unetpp"):
        model = build_model(arch, 3, 2, base_channels=4, depth=3).eval()
        assert model.size_multiple == 8
        assert model(torch.zeros(1, 3, 37, 29)).shape == (1, 1, 37, 29)


def test_valid_convolutions_need_the_classic_encoder():
    with pytest.raises(ValueError, match="classic encoder"):
        build_model("unet", 3, 2, base_channels=4, depth=2, padding=0, encoder=SMP)


def test_model_stats_record_what_they_measured():
    from pipeline.inference.stats import model_stats

    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    stats = model_stats(model, (2, 3, 32, 48), runs=3, warmup=1)
    assert stats["params"] == count_params(model) and stats["gflops"] > 0
    assert stats["latency_ms"] > 0 and stats["device"].startswith("cpu")
    assert (stats["batch"], stats["input"]) == (2, "3x32x48")
    # FLOPs per image: the same for a batch of one
    assert model_stats(model, (1, 3, 32, 48), 1, 0)["gflops"] == stats["gflops"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError("[Errno -3] Temporary failure in name resolution"),
        ValueError("Cannot find the requested files in the local cache (offline mode)"),
    ],
)
def test_pretrained_weights_that_cannot_be_fetched_are_one_line(monkeypatch, failure):
    """Offline, smp's Hugging Face download fails deep in the hub: one line says what to do."""
    from segmentation_models_pytorch import encoders

    def offline(*args, **kwargs):
        raise failure

    monkeypatch.setattr(encoders, "hf_hub_download", offline)
    with pytest.raises(PipelineError) as info:
        build_model(
            "unet", 3, 2, base_channels=4, depth=2, encoder="resnet18", encoder_weights="imagenet"
        )
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("encoder_weights: imagenet: the pretrained resnet18 weights")
    assert "encoder_weights: null" in message and "HF_HOME" in message
    # without weights nothing is downloaded, so nothing can fail that way
    build_model("unet", 3, 2, base_channels=4, depth=2, encoder="resnet18")


def test_params_and_the_model_config_share_one_set_of_defaults():
    """params.yaml's unet:/unetpp: sections and ModelConfig default alike, field by field."""
    from dataclasses import fields

    from pipeline.core.config import ModelParams, UNetPPParams

    config = {f.name: f.default for f in fields(ModelConfig)}
    for section in (ModelParams, UNetPPParams):
        for name, field in section.model_fields.items():
            assert field.default == config[name], f"{section.__name__}.{name}"
    # and a pruned UNet++ is its config with a smaller depth, fetching no pretrained weights
    full = ModelConfig("unetpp", 3, 2, encoder="resnet18", encoder_weights="imagenet")
    assert full.pruned(2, (2,)) == ModelConfig(
        "unetpp", 3, 2, depth=2, encoder="resnet18", heads=(2,)
    )
