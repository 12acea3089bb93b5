"""The small interface between the training loop and every training method.

The loop computes features, wraps them in `Features`, and calls, per step:
    method.before_encoder_step(feats)   # e.g. NeuCLIP's inner NPN loop (features detached inside)
    out = method(feats)                 # LossOutput: .loss to backward, .terms to log
    ... backward, optimizer step ...
    method.after_encoder_step(feats)    # e.g. per-sample temperature updates
and `method.on_epoch_start(epoch)` once per epoch. Parameters the main optimizer should train
(e.g. SigLIP's bias) come from `trainable_parameter_groups()`; state the method updates itself
(moving averages, NPN weights and their AdaGrad accumulators, per-sample temperatures) lives in
buffers / parameters so `state_dict()` carries all of it into checkpoints.
`log_normalizers(...)` exposes the method's current estimate of each anchor's log-normalizer for the
estimation-error diagnostic; it is the same call for every method.
"""
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .features import Features


@dataclass
class LossOutput:
    loss: torch.Tensor                      # the rank's surrogate: backward() on it
    terms: dict = field(default_factory=dict)  # detached scalar tensors, for logging only


class ContrastiveMethod(nn.Module):
    #: True when the method keeps per-sample state indexed by key (needs --data_size).
    uses_per_sample_state: bool = False
    #: True when the loss uses `Features.logit_bias` (the model's own bias, where it has one); otherwise
    #: the trainer freezes that bias, which would get no gradient (and break DDP's unused-parameter check).
    uses_logit_bias: bool = False

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def before_encoder_step(self, feats: Features) -> dict:
        return {}

    def forward(self, feats: Features) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def after_encoder_step(self, feats: Features) -> None:
        pass

    def trainable_parameter_groups(self) -> list[dict]:
        """Extra optimizer groups for the main optimizer (each a dict with 'params' and options)."""
        return []

    def log_normalizers(self, feats: Features):
        """The method's estimates a_i ≈ log(ε + g(i, S)) for the gathered anchors, or None."""
        return None

    def scalars(self) -> dict:
        """Extra values to log (γ, NPN time, ...)."""
        return {}


#: `feats.extras[STEP_SKIPPED]`, set before `after_encoder_step` when the optimizer decided on the device
#: whether to step: a 0-dim bool tensor, True when the step was skipped (non-finite gradient). A method
#: that updates its own state there keeps the old state where it is True, with tensor ops (no host sync).
#: Absent when the loop decided on the host; then `after_encoder_step` runs only after a real step.
STEP_SKIPPED = "step_skipped"

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    def deco(builder):
        _REGISTRY[name] = builder
        return builder
    return deco


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def build_method(name: str, args, model: nn.Module) -> ContrastiveMethod:
    """Build a method by its registry name; `args` are the parsed training flags."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    return _REGISTRY[name](args, model)
