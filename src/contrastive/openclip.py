"""open_clip's own mini-batch losses as methods: OpenCLIP (InfoNCE) and SigLIP."""
import math

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from . import comm
from .base import ContrastiveMethod, LossOutput, register
from .features import Features, fp32


class OpenClipMethod(ContrastiveMethod):
    def __init__(self, local_loss: bool, gather_with_grad: bool):
        super().__init__()
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad,
                                cache_labels=True, rank=comm.rank(), world_size=comm.world_size())

    def forward(self, feats: Features) -> LossOutput:
        loss = self.loss_fn(fp32(feats.image), fp32(feats.text), fp32(feats.logit_scale))
        return LossOutput(loss, {"contrastive_loss": loss.detach()})


class SigLipMethod(ContrastiveMethod):
    """SigLIP's pairwise sigmoid loss. The bias lives here, not in the model, so checkpoints keep
    exactly the architecture's keys and load in plain open_clip."""

    def __init__(self, init_bias: float = -10.0):
        super().__init__()
        self.logit_bias = nn.Parameter(torch.tensor(init_bias))
        self.loss_fn = SigLipLoss(rank=comm.rank(), world_size=comm.world_size())

    def forward(self, feats: Features) -> LossOutput:
        bias = self.logit_bias if feats.carries_step_gradient else self.logit_bias.detach()
        loss = self.loss_fn(fp32(feats.image), fp32(feats.text), fp32(feats.logit_scale), bias.float())
        return LossOutput(loss, {"contrastive_loss": loss.detach(),
                                 "logit_bias": self.logit_bias.detach()})

    def trainable_parameter_groups(self) -> list[dict]:
        return [{"params": [self.logit_bias], "weight_decay": 0.0, "name": "siglip_bias"}]


@register("openclip")
def _build_openclip(args, model):
    return OpenClipMethod(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad)


@register("siglip")
def _build_siglip(args, model):
    # SigLIP's initialisation (and open_clip's with --siglip): t = log 10, b = −10.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    return SigLipMethod(init_bias=-10.0)

