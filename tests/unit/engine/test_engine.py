"""The training engine without data on disk: schedules, one optimisation step (fp32, bf16,
fp16 with a scaler, clipping), non-finite losses, the epoch loop's bookkeeping, the sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.core.common import PipelineError
from pipeline.core.config import parse_params
from pipeline.data.loading import EpochSampler
from pipeline.engine.distributed import pick_device
from pipeline.engine.loop import Engine, NonFiniteLoss, is_better, train_epoch
from pipeline.engine.losses import SegmentationLoss
from pipeline.engine.numerics import amp_dtype
from pipeline.engine.optim import lr_factor, make_optimizer, make_scheduler
from pipeline.models import build_model


def _params(**train):
    return parse_params({"lr": 0.1, "epochs": 10, "train": train})


def _loader(n: int = 4) -> DataLoader:
    images = torch.randn(n, 3, 16, 16)
    labels = torch.randint(0, 2, (n, 16, 16))
    labels[:, :2] = 255
    return DataLoader(TensorDataset(images, labels), batch_size=2)


def _engine(model, lr=1e-2, **kw) -> Engine:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return Engine(model=model, loss_fn=SegmentationLoss(), optimizer=optimizer, **kw)


# --- learning-rate schedules ---------------------------------------------------------------


def test_constant_schedule_with_linear_warmup():
    p = _params(scheduler="none", warmup_epochs=1.0)
    factors = [lr_factor(p, s, steps_per_epoch=4) for s in range(8)]
    assert factors[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert factors[4:] == [1.0] * 4


def test_step_schedule_multiplies_by_gamma_every_step_epochs():
    p = _params(scheduler="step", warmup_epochs=0.0, step_epochs=3, step_gamma=0.5)
    by_epoch = [lr_factor(p, e * 5, steps_per_epoch=5) for e in range(10)]
    assert by_epoch == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125])


def test_cosine_schedule_falls_from_lr_to_min_lr():
    p = _params(scheduler="cosine", warmup_epochs=0.0, min_lr=0.01)
    steps = 10 * 4
    f = [lr_factor(p, s, 4) for s in range(steps)]
    assert f[0] == pytest.approx(1.0)
    assert f[steps // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f, f[1:], strict=False))
    assert lr_factor(p, steps, 4) == pytest.approx(0.1)  # min_lr / lr


def test_poly_schedule_by_hand():
    p = _params(scheduler="poly", warmup_epochs=0.0, poly_power=0.9)
    assert lr_factor(p, 20, 4) == pytest.approx((1 - 20 / 40) ** 0.9)


def test_warmup_then_cosine_starts_its_decay_after_the_warmup():
    p = _params(scheduler="cosine", warmup_epochs=2.0)
    assert lr_factor(p, 7, 4) < 1.0 and lr_factor(p, 8, 4) == pytest.approx(1.0)
    assert lr_factor(p, 9, 4) < 1.0


def test_scheduler_steps_the_optimizer_lr_and_round_trips_its_state():
    p = _params(scheduler="cosine", warmup_epochs=0.5)
    model = torch.nn.Linear(2, 2)
    opt = make_optimizer(p, model)
    sched = make_scheduler(p, opt, steps_per_epoch=4)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(p, 5, 4))
    opt2 = make_optimizer(p, model)
    sched2 = make_scheduler(p, opt2, 4)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 5


@pytest.mark.parametrize("name,cls", [("adam", "Adam"), ("adamw", "AdamW"), ("sgd", "SGD")])
def test_optimizers_from_params(name, cls):
    p = parse_params({"train": {"optimizer": name, "weight_decay": 0.01, "momentum": 0.8}})
    opt = make_optimizer(p, torch.nn.Linear(2, 2))
    assert type(opt).__name__ == cls
    assert opt.param_groups[0]["weight_decay"] == 0.01
    if name == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.8


# --- devices and precision --------------------------------------------------------------


def test_auto_precision_on_cuda_is_bf16_where_native_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16
    # GPUs without native bf16 (V100, T4) get fp16 and, with it, a gradient scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert amp_dtype("auto", torch.device("cuda")) is torch.float16
    assert amp_dtype("fp16", torch.device("cpu")) is torch.float16
    assert amp_dtype("none", torch.device("cuda")) is None


def test_cuda_requested_without_a_gpu_is_a_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PipelineError, match=r"^train.device cuda: no CUDA device available"):
        pick_device("cuda")
    with pytest.raises(PipelineError, match=r"^--device cuda: no CUDA device available"):
        pick_device("cuda", name="--device")  # predict's flag names itself
    with pytest.raises(PipelineError, match=r"^--device gpu: valid: cpu, cuda, auto"):
        pick_device("gpu", name="--device")
    assert pick_device("auto").type == "cpu"


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_train_epoch_returns_the_mean_loss_and_timings_and_updates_the_weights(amp):
    torch.manual_seed(0)
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    out = train_epoch(_engine(model, amp_dtype=amp), _loader(), "test")
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert out["images"] == 4
    assert out["data_seconds"] >= 0 and out["compute_seconds"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fp16_with_a_gradient_scaler_trains():
    torch.manual_seed(0)
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    out = train_epoch(_engine(model, amp_dtype=torch.float16, scaler=scaler), _loader(), "t")
    assert math.isfinite(out["loss"])
    assert scaler.get_scale() > 0


def test_gradient_clipping_bounds_the_update():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 1)
    images, labels = torch.randn(2, 3, 8, 8) * 100, torch.randint(0, 2, (2, 8, 8))
    engine = _engine(model, grad_clip=1e-3)
    engine.step(images, labels)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(norm) <= 1e-3 + 1e-6


def test_a_non_finite_loss_stops_before_touching_the_weights():
    model = build_model("unet", 3, 2, base_channels=4, depth=2)
    before = [p.detach().clone() for p in model.parameters()]
    engine = _engine(model)
    engine.loss_fn = lambda out, target, weight=None: out.sum() * float("nan")
    with pytest.raises(NonFiniteLoss, match="unet epoch 3/9, batch 1: loss is nan"):
        train_epoch(engine, _loader(), "unet epoch 3/9")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_pixel_weights_reach_the_loss():
    seen = {}

    def loss_fn(out, target, weight=None):
        seen["weight"] = weight
        return out.float().mean() * 0 + 1.0

    images, labels = torch.randn(2, 3, 8, 8), torch.randint(0, 2, (2, 8, 8))
    weights = torch.rand(2, 8, 8)
    loader = DataLoader(TensorDataset(images, labels, weights), batch_size=2)
    model = torch.nn.Conv2d(3, 2, 1)
    engine = Engine(model, loss_fn, torch.optim.SGD(model.parameters(), lr=0.1))
    train_epoch(engine, loader, "t")
    assert torch.equal(seen["weight"], weights)


def test_best_checkpoint_rule_minimises_loss_and_maximises_the_rest():
    assert is_better("val_miou", 0.5, None)
    assert is_better("val_miou", 0.6, 0.5) and not is_better("val_miou", 0.4, 0.5)
    assert is_better("val_loss", 0.4, 0.5) and not is_better("val_loss", 0.6, 0.5)
    assert not is_better("val_miou", float("nan"), None)
    assert is_better("val_miou", 0.1, float("nan"))


# --- the sampler ------------------------------------------------------------------------


def test_sampler_indices_carry_the_epoch_and_shuffle_per_epoch():
    s = EpochSampler(10, seed=1)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(3)
    third = list(s)
    assert sorted(first) == list(range(10))
    assert sorted(i - 30 for i in third) == list(range(10))
    assert [i - 30 for i in third] != first
    s.set_epoch(0)
    assert list(s) == first  # a resumed epoch sees the same order


def test_ddp_ranks_split_each_global_batch_of_the_single_process_order():
    n, batch, world = 12, 4, 2
    single = EpochSampler(n, seed=5)
    single.set_epoch(2)
    order = list(single)
    ranks = [EpochSampler(n, seed=5, rank=r, world=world) for r in range(world)]
    for r in ranks:
        r.set_epoch(2)
    shards = [list(r) for r in ranks]
    per_rank = batch // world
    for b in range(n // batch):
        together = sorted(i for s in shards for i in s[b * per_rank : (b + 1) * per_rank])
        assert together == sorted(order[b * batch : (b + 1) * batch])
