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
estimation-error diagnostic; it is the same call for every method, and so are `inverse_temperatures(feats)`
and `eps` (what the diagnostic needs to form the batch normalizers the method's estimates are compared with).
Methods register themselves in `contrastive.registry`.
"""
from dataclasses import dataclass, field

import torch
from torch import nn

from .features import Features, fp32


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
    #: The ε the method adds to every normalizer; None: it adds none of its own (the diagnostic then uses
    #: --fastclip_eps).
    eps: float | None = None

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

    def inverse_temperatures(self, feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """λ = 1/τ of the anchors of `feats` (images, texts), detached fp32: the model's logit scale unless the
        method has its own temperature scheme (a scalar, or one value per anchor)."""
        scale = fp32(feats.logit_scale.reshape(()).detach())
        return scale, scale

    def scalars(self) -> dict:
        """Extra values to log (γ, NPN time, ...)."""
        return {}


#: `feats.extras[STEP_SKIPPED]`, set before `after_encoder_step` when the optimizer decided on the device
#: whether to step: a 0-dim bool tensor, True when the step was skipped (non-finite gradient). A method
#: that updates its own state there keeps the old state where it is True, with tensor ops (no host sync).
#: Absent when the loop decided on the host; then `after_encoder_step` runs only after a real step.
STEP_SKIPPED = "step_skipped"
