"""Model statistics: parameter counts, FLOPs by hand (torch's flop counter) and latency as the
median forward after a warm-up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.inference.stats import count_params, gflops, latency_ms
from pipeline.models import build_model

# --- model statistics -----------------------------------------------------------------------


def test_count_params_of_a_single_conv():
    assert count_params(nn.Conv2d(1, 1, 3)) == 9 + 1
    assert count_params(nn.Conv2d(3, 8, 3, bias=False)) == 3 * 8 * 9


def test_gflops_of_a_single_conv_by_hand():
    """torch's flop counter counts 2 FLOPs per multiply-accumulate and ignores the bias.
    Conv 1->1 3x3 without padding on 8x8: 6x6 outputs x 9 MACs = 324 MACs = 648 FLOPs."""
    assert gflops(nn.Conv2d(1, 1, 3), (1, 1, 8, 8)) == pytest.approx(648e-9)
    # same padding: 8x8 outputs x 9 MACs x 2
    assert gflops(nn.Conv2d(1, 1, 3, padding=1), (1, 1, 8, 8)) == pytest.approx(1152e-9)


def test_gflops_are_per_image():
    conv = nn.Conv2d(1, 1, 3)
    assert gflops(conv, (4, 1, 8, 8)) == pytest.approx(gflops(conv, (1, 1, 8, 8)))


def test_pruned_unetpp_needs_fewer_flops():
    model = build_model("unetpp", 3, 2, base_channels=4, depth=3)
    flops = [gflops(model.prune(k), (1, 3, 32, 32)) for k in (1, 2, 3)]
    assert 0 < flops[0] < flops[1] < flops[2]


class Sleeper(nn.Module):
    """A model whose forwards take a known time: 50 ms for the first (a warm-up cost), then
    10 ms, except one 200 ms outlier."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # latency_ms finds the device from it
        self.calls = 0

    def forward(self, x):
        import time

        self.calls += 1
        time.sleep(0.05 if self.calls == 1 else 0.2 if self.calls == 4 else 0.01)
        return x


def test_latency_ms_is_the_median_forward_after_the_warm_up():
    model = Sleeper()
    ms = latency_ms(model, (1, 1, 8, 8), runs=5, warmup=1)
    assert model.calls == 6  # 1 warm-up + 5 timed forwards
    assert 10 <= ms < 15  # the median: neither the slow warm-up nor the 200 ms outlier
