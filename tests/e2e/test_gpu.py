"""The CUDA paths of training: bf16 autocast, fp16 with a gradient scaler, channels_last,
torch.compile, pinned memory with persistent workers. CI has no GPU: these skip there."""

from __future__ import annotations

import math

import pytest
import torch

import pipeline.stages.train as tr
from tests.unit.engine.test_training import _params
from tests.unit.engine.test_training import data as data  # the tiny project fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU path is tested elsewhere)"
    ),
]


@pytest.mark.parametrize(
    "train",
    [
        {"device": "cuda", "amp": "auto"},
        {"device": "cuda", "amp": "fp16"},
        {"device": "cuda", "amp": "bf16", "num_workers": 2},
        {"device": "cuda", "amp": "bf16", "compile": True},
    ],
    ids=["bf16-channels-last", "fp16-scaler", "workers-pinned", "compile"],
)
def test_cuda_training_paths(data, train):
    metrics = tr.train("unetpp", _params(train={"warmup_epochs": 0.5, **train}))
    assert metrics["device"].startswith("cuda") or "NVIDIA" in metrics["device"]
    assert math.isfinite(metrics["miou"])


def test_cuda_bf16_step_matches_fp32_closely():
    from pipeline.engine.losses import SegmentationLoss
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", 3, 2, base_channels=8, depth=2).cuda()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    labels = torch.randint(0, 2, (4, 32, 32), device="cuda")
    with torch.no_grad():
        fp32 = SegmentationLoss()(model(images), labels)
        with torch.autocast("cuda", torch.bfloat16):
            bf16 = SegmentationLoss()(model(images), labels)
    assert float(bf16) == pytest.approx(float(fp32), rel=0.05)
