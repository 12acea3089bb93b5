"""open_clip's own mini-batch losses as methods: OpenCLIP (InfoNCE) and SigLIP.

open_clip is imported when one of these methods is built, not when `contrastive` is imported: the
package (the estimators, NeuCLIP's NPN, the exact normalizers) is usable without open_clip's import
(~1 GB of modules and seconds of start-up)."""
import math

import torch
from torch import nn

from . import comm
from .features import Features, fp32
from .method_interface import ContrastiveMethod, LossOutput


class OpenClipMethod(ContrastiveMethod):
    def __init__(self, local_loss: bool, gather_with_grad: bool):
        super().__init__()
        from open_clip.loss import ClipLoss  # noqa: PLC0415  (lazy: see the module docstring)
        self.loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad,
                                cache_labels=True, rank=comm.rank(), world_size=comm.world_size())

    def forward(self, feats: Features) -> LossOutput:
        loss = self.loss_fn(fp32(feats.image), fp32(feats.text), fp32(feats.logit_scale))
        # "loss" is the total, as open_clip logs it for every run; here the two are the same number.
        return LossOutput(loss, {"loss": loss.detach(), "contrastive_loss": loss.detach()})


class SigLipMethod(ContrastiveMethod):
    """SigLIP's pairwise sigmoid loss. For an architecture without a bias the bias lives here, not in the
    model, so checkpoints keep exactly the architecture's keys and load in plain open_clip; an
    architecture with its own (open_clip's init_logit_bias configs) trains that one, as open_clip does."""

    uses_logit_bias = True

    def __init__(self, init_bias: float = -10.0, own_bias: bool = True, dist_impl: str | None = None):
        super().__init__()
        self.logit_bias = nn.Parameter(torch.tensor(init_bias)) if own_bias else None
        from open_clip.loss import SigLipLoss  # noqa: PLC0415  (lazy: see the module docstring)
        self.loss_fn = SigLipLoss(rank=comm.rank(), world_size=comm.world_size(), dist_impl=dist_impl)

    def forward(self, feats: Features) -> LossOutput:
        if feats.logit_bias is not None:  # the model's: Features.micro_batch detaches it where it must
            bias = feats.logit_bias
        else:
            bias = self.logit_bias if feats.carries_step_gradient else self.logit_bias.detach()
        loss = self.loss_fn(fp32(feats.image), fp32(feats.text), fp32(feats.logit_scale), bias.float())
        return LossOutput(loss, {"loss": loss.detach(), "contrastive_loss": loss.detach(),
                                 "logit_bias": bias.detach().reshape(())})

    def trainable_parameter_groups(self) -> list[dict]:
        if self.logit_bias is None:
            return []
        return [{"params": [self.logit_bias], "weight_decay": 0.0, "name": "siglip_bias"}]


def build_openclip(args, model):
    return OpenClipMethod(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad)


def build_siglip(args, model):
    # SigLIP's initialisation (and open_clip's with --siglip): t = log 10, b = −10.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    return SigLipMethod(init_bias=-10.0, own_bias=getattr(model, "logit_bias", None) is None,
                        dist_impl=getattr(args, "loss_dist_impl", None))

