"""Normalizer estimators: the one thing the global-contrastive-loss methods differ in.

An estimator supplies, for every anchor of the gathered batch, a detached estimate a_i of the
log-normalizer log(ε + g(i, S)) over the whole data set S. The loss core turns it into weights
exp(−a_i) on each anchor's negatives. Estimators own their state (moving averages by sample key,
NPN weights and AdaGrad accumulators, ...) as buffers/parameters so `state_dict()` checkpoints it.
Estimators register themselves in `contrastive.registry` (kind ESTIMATOR).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .features import Features


@dataclass
class BatchStats:
    """What the method computes once per step and shares with its estimator (all detached, [N])."""
    log_norm_img: torch.Tensor   # log(ε + g_i) over the gathered batch, image anchors
    log_norm_txt: torch.Tensor   # same for text anchors
    scale_img: torch.Tensor      # λ = 1/τ per image anchor (scalar or [N]), detached
    scale_txt: torch.Tensor
    eps: float


@dataclass
class Estimate:
    a_img: torch.Tensor                        # [N] detached log-normalizer estimates
    a_txt: torch.Tensor
    extra_loss: Optional[torch.Tensor] = None  # added to the encoder loss (simultaneous-update ablation)


class NormalizerEstimator(nn.Module):
    #: keeps per-sample state indexed by key (needs --data_size)
    uses_per_sample_state: bool = False

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def prepare(self, feats: Features, stats: BatchStats) -> dict:
        """Before the encoder step (NeuCLIP's inner NPN loop). Returns scalars to log."""
        return {}

    def estimate(self, feats: Features, stats: BatchStats) -> Estimate:
        """Estimates used for this encoder step; may update state (the moving average)."""
        raise NotImplementedError

    def predict(self, feats: Features, stats: BatchStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Current estimates without changing any state (the estimation-error diagnostic)."""
        raise NotImplementedError

    def trainable_parameter_groups(self) -> list[dict]:
        return []

    def scalars(self) -> dict:
        return {}
