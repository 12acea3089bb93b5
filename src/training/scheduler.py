"""Learning-rate schedules of the main optimizer, and the moving average's γ per epoch.

Parameter groups follow one of two schedules, set every step by `LRScheduler.step`:
  * the temperature group (group["name"] == "temperature": the model's logit_scale) follows
    --lr_tau_scheduler from --lr_tau, with FastCLIP's meaning of each choice;
  * every other group follows --lr-scheduler from its own base lr (the `initial_lr` that
    build_optimizer records: --lr for the encoders), with open_clip's meaning.

Steps count optimizer steps; total = steps_per_epoch × --epochs.
  cosine          linear warm-up base·(step + 1)/--warmup for step < --warmup, then
                  lr_min + (base − lr_min)·(1 + cos(π·(step − warmup)/(total − warmup)))/2,
                  with lr_min = --lr_min (the floor; 0 gives open_clip's and FastCLIP's schedule)
  const           base; after the warm-up for --lr-scheduler (open_clip), without one for
                  --lr_tau_scheduler (FastCLIP sets its warm-up to 0 for const)
  const-cooldown  warm-up, base, then a linear decay to --lr-cooldown-end over the last
                  --epochs-cooldown epochs
  step_thresh     (--lr_tau_scheduler only) base, or base/3 while τ ≤ 0.03; re-checked every step,
                  so the lr returns to base when τ rises above 0.03 again; no warm-up (FastCLIP).
                  Given τ as a device tensor (the loop does so when the optimizer takes a tensor lr)
                  the lr is a 0-dim device tensor: choosing it needs no host sync.
"""
import math
from dataclasses import dataclass

import torch

from contrastive.moving_average import moving_average_gamma

TEMPERATURE_GROUP = "temperature"


def gamma_at_epoch(args, epoch: int) -> float:
    """γ of FastCLIP's moving average in `epoch` (--gamma, --gamma_schedule, --gamma_decay_epochs)."""
    return moving_average_gamma(epoch, args.gamma, args.gamma_schedule, args.gamma_decay_epochs)


def warmup_lr(base: float, warmup: int, step: int) -> float:
    return base * (step + 1) / warmup


@dataclass(frozen=True)
class Cosine:
    warmup: int
    total: int
    floor: float = 0.0
    needs_tau = False

    def __call__(self, base: float, step: int, tau: float | None = None) -> float:
        if step < self.warmup:
            return warmup_lr(base, self.warmup, step)
        # Past the last step the schedule stays at its floor rather than rising again.
        progress = min((step - self.warmup) / max(self.total - self.warmup, 1), 1.0)
        return self.floor + (base - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Constant:
    warmup: int
    needs_tau = False

    def __call__(self, base: float, step: int, tau: float | None = None) -> float:
        return warmup_lr(base, self.warmup, step) if step < self.warmup else base


@dataclass(frozen=True)
class ConstantCooldown:
    warmup: int
    total: int
    cooldown_steps: int
    end: float = 0.0
    power: float = 1.0  # open_clip's --lr-cooldown-power: (1 - progress) ** power
    needs_tau = False

    def __call__(self, base: float, step: int, tau: float | None = None) -> float:
        if step < self.warmup:
            return warmup_lr(base, self.warmup, step)
        start = self.total - self.cooldown_steps
        if step < start:
            return base
        remaining = 1.0 - min((step - start) / max(self.total - start, 1), 1.0)
        return self.end + (base - self.end) * remaining ** self.power


@dataclass(frozen=True)
class StepThreshold:
    """FastCLIP's step_thresh: a smaller temperature lr while the temperature is small."""
    threshold: float = 0.03
    ratio: float = 1.0 / 3.0
    needs_tau = True

    def __call__(self, base: float, step: int, tau: float | None = None) -> float:
        if tau is None:
            raise ValueError("--lr_tau_scheduler step_thresh needs the current temperature: "
                             "pass tau to LRScheduler.step")
        if isinstance(tau, torch.Tensor):  # τ on the device: the lr stays there too (no host sync)
            return torch.where(tau <= self.threshold, base * self.ratio, base).to(torch.float32)
        return base * self.ratio if tau <= self.threshold else base


def build_schedule(name: str, args, steps_per_epoch: int, warm_up: bool):
    """The schedule `name`; `warm_up` False drops the warm-up (FastCLIP's const / step_thresh)."""
    total = steps_per_epoch * args.epochs
    warmup = args.warmup if warm_up else 0
    if name == "cosine":
        return Cosine(warmup, total, args.lr_min)
    if name == "const":
        return Constant(warmup)
    if name == "const-cooldown":
        if args.epochs_cooldown is None:
            raise ValueError("the const-cooldown schedule needs --epochs-cooldown")
        return ConstantCooldown(warmup, total, steps_per_epoch * args.epochs_cooldown, args.lr_cooldown_end,
                                getattr(args, "lr_cooldown_power", 1.0))
    if name == "step_thresh":
        return StepThreshold()
    raise ValueError(f"unknown learning-rate schedule {name!r}")


#: Which --lr_tau_scheduler choices keep the warm-up (FastCLIP passes warmup 0 to const and step_thresh).
_TEMPERATURE_WARMS_UP = {"cosine": True, "const": False, "const-cooldown": True, "step_thresh": False}


class LRScheduler:
    """Sets every parameter group's lr for a step; returns the lrs to log."""

    def __init__(self, optimizer, args, steps_per_epoch: int):
        if args.lr_scheduler == "step_thresh":
            raise ValueError("step_thresh is a temperature schedule: use it with --lr_tau_scheduler")
        self.optimizer = optimizer
        self.main = build_schedule(args.lr_scheduler, args, steps_per_epoch, warm_up=True)
        self.temperature = build_schedule(args.lr_tau_scheduler, args, steps_per_epoch,
                                          warm_up=_TEMPERATURE_WARMS_UP[args.lr_tau_scheduler])
        self.base_lrs = [group.get("initial_lr", args.lr_tau if _is_temperature(group) else args.lr)
                         for group in optimizer.param_groups]

    @property
    def needs_tau(self) -> bool:
        """Whether `step` needs τ (the loop reads it from the model only then)."""
        return self.temperature.needs_tau and any(_is_temperature(g) for g in self.optimizer.param_groups)

    def step(self, step: int, tau: float | None = None) -> dict:
        lrs = {}
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            is_temperature = _is_temperature(group)
            schedule = self.temperature if is_temperature else self.main
            group["lr"] = schedule(base, step, tau)
            lrs.setdefault("lr_tau" if is_temperature else "lr", group["lr"])
        return lrs


def _is_temperature(group: dict) -> bool:
    return group.get("name") == TEMPERATURE_GROUP
