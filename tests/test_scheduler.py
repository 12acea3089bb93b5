"""Learning-rate schedules: open_clip's for the encoders, FastCLIP's for the temperature."""
import math
from types import SimpleNamespace

import pytest
import torch

from training.scheduler import LRScheduler

LR, LR_TAU, LR_MIN, WARMUP, EPOCHS, STEPS_PER_EPOCH = 1e-3, 1e-4, 1e-5, 10, 10, 10
TOTAL = EPOCHS * STEPS_PER_EPOCH


def make_args(**overrides):
    args = dict(lr=LR, lr_tau=LR_TAU, lr_min=LR_MIN, warmup=WARMUP, epochs=EPOCHS, lr_scheduler="cosine",
                lr_tau_scheduler="cosine", epochs_cooldown=None, lr_cooldown_end=0.0)
    args.update(overrides)
    return SimpleNamespace(**args)


def make_optimizer(with_temperature=True):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "name": "decay", "lr": LR, "initial_lr": LR},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "name": "no_decay", "lr": LR, "initial_lr": LR}]
    if with_temperature:
        groups.append({"params": [torch.nn.Parameter(torch.zeros(()))], "name": "temperature",
                       "lr": LR_TAU, "initial_lr": LR_TAU})
    return torch.optim.AdamW(groups, lr=LR)


def lrs_at(scheduler, step, tau=None):
    lrs = scheduler.step(step, tau)
    groups = scheduler.optimizer.param_groups
    assert groups[0]["lr"] == groups[1]["lr"] == lrs["lr"]
    if len(groups) > 2:
        assert groups[2]["lr"] == lrs["lr_tau"]
    return lrs


def cosine(base, step):
    progress = (step - WARMUP) / (TOTAL - WARMUP)
    return LR_MIN + (base - LR_MIN) * 0.5 * (1 + math.cos(math.pi * progress))


def test_cosine_for_both_with_the_same_warmup():
    scheduler = LRScheduler(make_optimizer(), make_args(), STEPS_PER_EPOCH)
    assert lrs_at(scheduler, 0) == pytest.approx({"lr": LR / WARMUP, "lr_tau": LR_TAU / WARMUP})
    assert lrs_at(scheduler, WARMUP - 1) == pytest.approx({"lr": LR, "lr_tau": LR_TAU})  # warm-up end
    assert lrs_at(scheduler, WARMUP) == pytest.approx({"lr": LR, "lr_tau": LR_TAU})
    mid = (WARMUP + TOTAL) // 2
    assert lrs_at(scheduler, mid) == pytest.approx({"lr": (LR + LR_MIN) / 2, "lr_tau": (LR_TAU + LR_MIN) / 2})
    assert lrs_at(scheduler, 70) == pytest.approx({"lr": cosine(LR, 70), "lr_tau": cosine(LR_TAU, 70)})
    assert lrs_at(scheduler, TOTAL) == pytest.approx({"lr": LR_MIN, "lr_tau": LR_MIN})  # end: the floor
    assert lrs_at(scheduler, TOTAL + 5)["lr"] == pytest.approx(LR_MIN)
    assert not scheduler.needs_tau


def test_const_warms_up_the_encoders_but_not_the_temperature():
    scheduler = LRScheduler(make_optimizer(), make_args(lr_scheduler="const", lr_tau_scheduler="const"),
                            STEPS_PER_EPOCH)
    assert lrs_at(scheduler, 0) == pytest.approx({"lr": LR / WARMUP, "lr_tau": LR_TAU})
    assert lrs_at(scheduler, 4) == pytest.approx({"lr": 5 * LR / WARMUP, "lr_tau": LR_TAU})
    assert lrs_at(scheduler, 50) == pytest.approx({"lr": LR, "lr_tau": LR_TAU})
    assert lrs_at(scheduler, TOTAL - 1) == pytest.approx({"lr": LR, "lr_tau": LR_TAU})


def test_const_cooldown():
    args = make_args(lr_scheduler="const-cooldown", lr_tau_scheduler="const-cooldown", epochs_cooldown=2,
                     lr_cooldown_end=1e-6)
    scheduler = LRScheduler(make_optimizer(), args, STEPS_PER_EPOCH)
    assert lrs_at(scheduler, 0)["lr_tau"] == pytest.approx(LR_TAU / WARMUP)
    assert lrs_at(scheduler, 79) == pytest.approx({"lr": LR, "lr_tau": LR_TAU})  # cooldown starts at 80
    assert lrs_at(scheduler, 90) == pytest.approx({"lr": (LR + 1e-6) / 2, "lr_tau": (LR_TAU + 1e-6) / 2})
    assert lrs_at(scheduler, TOTAL) == pytest.approx({"lr": 1e-6, "lr_tau": 1e-6})
    with pytest.raises(ValueError, match="--epochs-cooldown"):
        LRScheduler(make_optimizer(), make_args(lr_scheduler="const-cooldown"), STEPS_PER_EPOCH)


def test_step_thresh_follows_tau_both_ways_every_step():
    scheduler = LRScheduler(make_optimizer(), make_args(lr_tau_scheduler="step_thresh"), STEPS_PER_EPOCH)
    assert scheduler.needs_tau
    assert lrs_at(scheduler, 0, tau=0.07) == pytest.approx({"lr": LR / WARMUP, "lr_tau": LR_TAU})  # no warm-up
    assert lrs_at(scheduler, 20, tau=0.031)["lr_tau"] == pytest.approx(LR_TAU)
    assert lrs_at(scheduler, 21, tau=0.03)["lr_tau"] == pytest.approx(LR_TAU / 3)
    assert lrs_at(scheduler, 22, tau=0.02)["lr_tau"] == pytest.approx(LR_TAU / 3)
    assert lrs_at(scheduler, 23, tau=0.04)["lr_tau"] == pytest.approx(LR_TAU)  # not sticky
    assert lrs_at(scheduler, 23, tau=0.04)["lr"] == pytest.approx(cosine(LR, 23))
    with pytest.raises(ValueError, match="temperature"):
        scheduler.step(24, None)


def test_without_a_temperature_group_tau_is_not_needed():
    scheduler = LRScheduler(make_optimizer(with_temperature=False), make_args(lr_tau_scheduler="step_thresh"),
                            STEPS_PER_EPOCH)
    assert not scheduler.needs_tau
    assert scheduler.step(WARMUP) == pytest.approx({"lr": LR})


def test_step_thresh_is_not_an_encoder_schedule():
    with pytest.raises(ValueError, match="--lr_tau_scheduler"):
        LRScheduler(make_optimizer(), make_args(lr_scheduler="step_thresh"), STEPS_PER_EPOCH)
