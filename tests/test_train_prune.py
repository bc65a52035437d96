"""Training-loop and pruning-summary rules that need no data on disk."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.common import PipelineError
from pipeline.losses import CEDiceLoss
from pipeline.models import build_model
from pipeline.prune import best_depth
from pipeline.train import is_better, train_epoch


def _loader(n: int = 4) -> DataLoader:
    images = torch.randn(n, 3, 16, 16)
    labels = torch.randint(0, 2, (n, 16, 16))
    labels[:, :2] = 255
    return DataLoader(TensorDataset(images, labels), batch_size=2)


def test_train_epoch_returns_the_mean_loss_and_updates_the_weights():
    torch.manual_seed(0)
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = train_epoch(model, _loader(), CEDiceLoss(), optimizer, torch.device("cpu"), "test")
    assert math.isfinite(loss) and loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_train_epoch_stops_on_a_non_finite_loss_before_touching_the_weights():
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def nan_loss(logits, target):
        return logits.sum() * float("nan")

    with pytest.raises(PipelineError, match="unet epoch 3/9: loss became nan"):
        train_epoch(model, _loader(), nan_loss, optimizer, torch.device("cpu"), "unet epoch 3/9")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_best_checkpoint_rule_minimises_loss_and_maximises_the_rest():
    assert is_better("val_miou", 0.5, None)
    assert is_better("val_miou", 0.6, 0.5) and not is_better("val_miou", 0.4, 0.5)
    assert is_better("val_loss", 0.4, 0.5) and not is_better("val_loss", 0.6, 0.5)
    assert not is_better("val_miou", float("nan"), None)
    assert is_better("val_miou", 0.1, float("nan"))


def test_best_depth_is_the_shallowest_within_tolerance_of_the_deepest():
    rows = [
        {"depth": 1, "miou": 0.80},
        {"depth": 2, "miou": 0.865},
        {"depth": 3, "miou": 0.88},
        {"depth": 4, "miou": 0.87},
    ]
    assert best_depth(rows, "miou", 0.01) == 2
    assert best_depth(rows, "miou", 0.0) == 3  # L3 beats L4
    assert best_depth(rows, "miou", 0.1) == 1
