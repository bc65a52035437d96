"""Overlap-tile prediction: exact coverage and blending, mirror-padded borders, any image size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.inference.forward import predict_logits
from pipeline.inference.tiling import (
    blend_window,
    mirror_pad,
    predict_tiled,
    tile_count,
    tile_origins,
)
from pipeline.models import build_model
from tests.fakes import tiny_model


def pointwise(in_channels: int = 3, out_channels: int = 2) -> nn.Module:
    """1x1 convolutions only: a pixel's logits depend on that pixel alone, so any correct
    tiling (every pixel covered, weights normalised, cropped back in place) reproduces a
    single full-image forward exactly."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 1), nn.ReLU(), nn.Conv2d(8, out_channels, 1)
    ).eval()


def tiny(arch: str, **options) -> nn.Module:
    return tiny_model(arch, **options).eval()


def test_tile_origins_by_hand():
    assert tile_origins(10, 4, 3) == [0, 3, 6]
    assert tile_origins(10, 4, 2) == [0, 2, 4, 6]
    assert tile_origins(11, 4, 4) == [0, 4, 7]  # the last tile flush with the end
    assert tile_origins(8, 4, 4) == [0, 4]  # exact fit: no extra tile
    assert tile_origins(4, 4, 2) == [0]
    assert tile_origins(3, 8, 6) == [0]  # the tile covers it all
    with pytest.raises(ValueError, match="stride"):
        tile_origins(10, 4, 0)


def test_gaussian_window_peaks_at_one_with_a_positive_floor():
    window = blend_window(32, 16)
    assert window.shape == (32, 16) and window.dtype == torch.float32
    assert window.max() == pytest.approx(1.0)
    assert window.min() > 0
    assert window[16, 8] > window[16, 4] > window[8, 4]  # highest in the centre
    assert torch.equal(blend_window(8, 8, "constant"), torch.ones(8, 8))
    with pytest.raises(ValueError, match="unknown blend 'median'"):
        blend_window(8, 8, "median")


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize(
    ("size", "tile", "overlap", "batch_size"),
    [
        ((37, 53), 16, 4, 3),
        ((45, 29), 16, 13, 8),  # stride 3
        ((64, 64), 32, 0, 1),
        ((33, 81), 24, 8, 64),
        ((5, 70), 16, 6, 2),  # shorter than a tile in one dimension
    ],
)
def test_pointwise_model_tiled_equals_one_forward(size, tile, overlap, batch_size, blend):
    model = pointwise()
    x = torch.randn(3, 3, *size)
    got = predict_tiled(model, x, tile, overlap, 8, blend, batch_size)
    assert got.shape == (3, 2, *size) and got.dtype == torch.float32
    torch.testing.assert_close(got, model(x), atol=1e-5, rtol=0)


def test_bf16_logits_are_accumulated_in_float32():
    model = pointwise()
    x = torch.randn(2, 3, 40, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = predict_tiled(model, x, 16, 4, 8)
        expected = model(x)
    assert expected.dtype == torch.bfloat16 and got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_one_tile_equals_whole_image_forward(arch):
    model = tiny(arch)
    x = torch.randn(2, 3, 32, 32)
    expected = predict_logits(model, x, model.size_multiple)
    # no overlap, so no margin: the one 32x32 tile is the image itself
    torch.testing.assert_close(predict_tiled(model, x, 64, 0, 4), expected, atol=1e-5, rtol=0)
    # tile 0: the whole image in one forward, whatever its size
    y = torch.randn(1, 3, 27, 45)
    expected = predict_logits(model, y, model.size_multiple)
    torch.testing.assert_close(predict_tiled(model, y, 0, 16, 4), expected, atol=0, rtol=0)


def test_borders_are_not_degraded():
    """The image's border pixels get mirrored context, as if the image went on: tiled logits
    are as close there to a forward on the mirror-padded whole image as they are inside. A
    plain forward (zero padding in every conv) is far off at the border."""
    model = tiny("unet", norm="none", depth=3)
    h, w, tile, overlap = 70, 90, 32, 16
    x = torch.randn(2, 3, h, w)
    m = overlap // 2
    padded = mirror_pad(x, m, m, m, m)
    reference = predict_logits(model, padded, model.size_multiple)[..., m : m + h, m : m + w]
    tiled = predict_tiled(model, x, tile, overlap, model.size_multiple)
    naive = predict_logits(model, x, model.size_multiple)

    band = torch.ones(h, w, dtype=torch.bool)
    band[8:-8, 8:-8] = False  # the 8 px next to the border
    dev = (tiled - reference).abs()
    scale = reference.std()
    border, interior = dev[..., band].mean(), dev[..., ~band].mean()
    assert border <= 1.5 * interior + 1e-3 * scale
    assert border < 0.05 * scale and interior < 0.05 * scale
    naive_border = (naive - reference).abs()[..., band].mean()
    assert naive_border > 10 * border


def test_mirror_pad_any_amount():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    # [0 1 2] mirrored without repeating the edge, again and again (numpy's "reflect")
    assert mirror_pad(x, 0, 0, 4, 5)[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]
    one = torch.full((1, 2, 1, 1), 7.0)
    assert torch.equal(mirror_pad(one, 2, 3, 1, 0), torch.full((1, 2, 6, 2), 7.0))  # replicated


@pytest.mark.parametrize("size", [(1, 1), (17, 33), (100, 7), (3, 2)])
@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_any_size_works(arch, size):
    model = tiny(arch)
    out = predict_tiled(model, torch.randn(2, 3, *size), 16, 8, model.size_multiple, batch_size=3)
    assert out.shape == (2, 1, *size) and torch.isfinite(out).all()
    # a tile larger than the image: one padded forward
    assert tile_count(*size, tile=128, overlap=8, multiple=4) == 1
    out = predict_tiled(model, torch.randn(1, 3, *size), 128, 8, model.size_multiple)
    assert out.shape == (1, 1, *size)


def test_one_channel_images_and_three_classes():
    torch.manual_seed(0)
    model = build_model("unetpp", 1, 3, base_channels=4, depth=2).eval()
    out = predict_tiled(model, torch.randn(2, 1, 1, 1), 8, 4, model.size_multiple)
    assert out.shape == (2, 3, 1, 1)
    out = predict_tiled(model, torch.randn(1, 1, 19, 23), 8, 4, model.size_multiple)
    assert out.shape == (1, 3, 19, 23)


def test_bad_arguments_raise():
    model = pointwise()
    x = torch.randn(1, 3, 20, 20)
    with pytest.raises(ValueError, match=r"tile \(24\) must be 0 or a positive multiple of 16"):
        predict_tiled(model, x, 24, 8, 16)
    with pytest.raises(ValueError, match=r"overlap \(16\) must lie in 0\.\.15"):
        predict_tiled(model, x, 16, 16, 16)
    with pytest.raises(ValueError, match="unknown blend"):
        predict_tiled(model, x, 16, 4, 16, blend="max")


def test_a_model_that_shrinks_its_input_is_refused():
    model = build_model("unet", 3, 2, base_channels=4, depth=1, padding=0).eval()
    with pytest.raises(ValueError, match="needs an output the size of its input"):
        predict_tiled(model, torch.randn(1, 3, 40, 40), 20, 4, 2)


# --- test-time augmentation -------------------------------------------------------------------


@pytest.mark.parametrize("tile", [0, 16])
def test_tta_averages_the_logits_of_the_flipped_images_flipped_back(tile):
    model = tiny("unet")
    x = torch.randn(2, 3, 21, 27)

    def plain(images):
        return predict_tiled(model, images, tile, 4, model.size_multiple)

    hflip = (plain(x) + plain(x.flip(-1)).flip(-1)) / 2
    torch.testing.assert_close(predict_tiled(model, x, tile, 4, 4, tta="hflip"), hflip)
    flips = (
        plain(x)
        + plain(x.flip(-1)).flip(-1)
        + plain(x.flip(-2)).flip(-2)
        + plain(x.flip(-2, -1)).flip(-2, -1)
    ) / 4
    torch.testing.assert_close(predict_tiled(model, x, tile, 4, 4, tta="flips"), flips)
    assert torch.equal(predict_tiled(model, x, tile, 4, 4, tta="none"), plain(x))


def test_tta_leaves_a_flip_equivariant_model_unchanged_and_refuses_unknown_names():
    model = pointwise()  # 1x1 convolutions commute with flips
    x = torch.randn(1, 3, 20, 20)
    torch.testing.assert_close(predict_tiled(model, x, 0, 0, 1, tta="flips"), model(x))
    with pytest.raises(ValueError, match="tta 'rot90': valid are none, hflip, flips"):
        predict_tiled(model, x, 0, 0, 1, tta="rot90")
