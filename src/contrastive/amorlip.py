"""The AmorLIP baseline's normalizer estimator ("amorlip"; Sun et al. 2025, as NeuCLIP's paper runs it).

Per modality a residual MLP on the detached, L2-normalised embedding predicts log λ(x) ≈ log(ε + g(x)):
  * it is fitted by regression: T_u (`--npn_repetition`) Adam steps (`--amorlip_lr`, 1e-3) per encoder
    step on mean (log λ(x) − sg[target])², target = log of the batch normalizer, optionally mixed in
    linear space with the previous epoch's network's λ (`--amorlip_target_mix` w_max; the weight rises
    on a cosine over `--amorlip_mix_epochs` epochs);
  * an EMA of the online network (β = `--amorlip_ema`, 0.92) supplies the estimates the encoders use:
    a = log λ_EMA(x), so each anchor's negatives are weighted by 1/λ_EMA(x) (AmorLIP's code queries the
    EMA network for the encoder loss too);
  * the online network is re-created (fresh random weights, fresh Adam state) at every epoch start.
    Decision: the EMA network is kept across the re-creation, so the encoders never see a random
    network, and the new network's output bias starts at the batch's mean log-normalizer (re-creation
    therefore waits for the epoch's first batch), so that the EMA is not dragged toward log λ = 0.

Regression on a batch target is biased (E[log ĝ] ≠ log E[ĝ]); NeuCLIP's unified objective is not.
Distributed: gradients of the local rows, one all-reduce per Adam step, identical networks everywhere.
"""
import math

import torch

from .comm import average_over_ranks_
from .estimator_interface import BatchStats, Estimate, NormalizerEstimator
from .features import Features
from .npn import Adam, ResidualMLPNPN, Stopwatch, regression_objective, seeded_generator
from .builtin_entries import AMORLIP_DEFAULTS as DEFAULTS


class AmorLIPEstimator(NormalizerEstimator):

    def __init__(self, embed_dim: int, *, lr: float = DEFAULTS["amorlip_lr"], repetition: int = 10,
                 ema: float = DEFAULTS["amorlip_ema"], target_mix: float = DEFAULTS["amorlip_target_mix"],
                 mix_epochs: int = DEFAULTS["amorlip_mix_epochs"], hidden: int | None = None, seed: int = 0):
        super().__init__()
        hidden = hidden or embed_dim  # AmorLIP's default width factor 1

        def pair():
            return ResidualMLPNPN(embed_dim, hidden), ResidualMLPNPN(embed_dim, hidden)
        self.online_img, self.online_txt = pair()
        self.ema_img, self.ema_txt = pair()
        self.prev_img, self.prev_txt = pair() if target_mix > 0 else (None, None)
        for net in self._frozen_nets():
            net.requires_grad_(False)
        self.adam = Adam(self._online_params(), lr)
        self.repetition, self.ema_beta, self.seed = repetition, ema, seed
        self.target_mix, self.mix_epochs = target_mix, mix_epochs
        self._initialized, self._has_prev = False, False
        self._epoch, self._pending_epoch = -1, 0   # the network's epoch; an epoch waiting for a batch
        self._stopwatch = Stopwatch()

    # ------------------------------------------------------------------------------- the interface

    def on_epoch_start(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._pending_epoch = epoch

    def prepare(self, feats: Features, stats: BatchStats) -> dict:
        if self._pending_epoch is not None:
            self._recreate(self._pending_epoch, stats)
        self._stopwatch.start(feats.all_image.device)
        loss = self._fit(feats, stats)
        self._update_ema()
        self._stopwatch.stop()
        return {"amorlip_loss": loss}

    def estimate(self, feats: Features, stats: BatchStats) -> Estimate:
        return Estimate(*self.predict(feats, stats))

    @torch.no_grad()
    def predict(self, feats: Features, stats: BatchStats):
        if not self._initialized:  # no network before the first prepare: the batch is all we know
            return stats.log_norm_img, stats.log_norm_txt
        img, txt = self._inputs(feats)
        return self.ema_img(img), self.ema_txt(txt)

    def scalars(self) -> dict:
        return {"npn_time_ms": self._stopwatch.elapsed_ms(), "amorlip_target_mix": self._mix_weight()}

    # Python-side bookkeeping rides along in state_dict() as one CPU int64 tensor (-1: no pending epoch).
    def get_extra_state(self) -> torch.Tensor:
        pending = -1 if self._pending_epoch is None else self._pending_epoch
        return torch.tensor([self._initialized, self._has_prev, self._epoch, pending])

    def set_extra_state(self, state: torch.Tensor) -> None:
        initialized, has_prev, self._epoch, pending = state.tolist()
        self._initialized, self._has_prev = bool(initialized), bool(has_prev)
        self._pending_epoch = None if pending < 0 else pending

    # ---------------------------------------------------------------------------------- the steps

    def _fit(self, feats: Features, stats: BatchStats) -> torch.Tensor:
        """T_u Adam steps of the regression on this rank's rows; returns the last (local) loss."""
        rows = feats.local
        img, txt = (x[rows] for x in self._inputs(feats))
        target_img, target_txt = self._targets(img, txt, stats.log_norm_img[rows], stats.log_norm_txt[rows])
        params = self._online_params()
        for _ in range(self.repetition):
            with torch.enable_grad():
                loss = regression_objective(self.online_img(img), target_img) \
                    + regression_objective(self.online_txt(txt), target_txt)
                grads = torch.autograd.grad(loss, params)
            self.adam.step_(params, average_over_ranks_(list(grads)))
        return loss.detach()

    @torch.no_grad()
    def _targets(self, img, txt, log_norm_img, log_norm_txt):
        """log((1−w)·(ε+g) + w·λ_prev(x)): the batch normalizer mixed with the previous network's."""
        w = self._mix_weight()
        if w <= 0 or not self._has_prev:
            return log_norm_img.to(img.dtype), log_norm_txt.to(txt.dtype)

        def mix(log_norm, prev):
            return torch.logaddexp(math.log1p(-w) + log_norm.to(prev.dtype), math.log(w) + prev)
        return mix(log_norm_img, self.prev_img(img)), mix(log_norm_txt, self.prev_txt(txt))

    def _mix_weight(self) -> float:
        if self.target_mix <= 0:
            return 0.0
        progress = min(max(self._epoch, 0) / max(self.mix_epochs, 1), 1.0)
        return self.target_mix * 0.5 * (1 - math.cos(math.pi * progress))

    @torch.no_grad()
    def _update_ema(self) -> None:
        for ema, online in ((self.ema_img, self.online_img), (self.ema_txt, self.online_txt)):
            for e, o in zip(ema.parameters(), online.parameters()):
                e.lerp_(o, 1 - self.ema_beta)

    @torch.no_grad()
    def _recreate(self, epoch: int, stats: BatchStats) -> None:
        if self.prev_img is not None and self._initialized:
            _copy_(self.prev_img, self.ema_img)
            _copy_(self.prev_txt, self.ema_txt)
            self._has_prev = True
        generator = seeded_generator(self.seed, epoch)
        self.online_img.reset_(generator, stats.log_norm_img.mean())
        self.online_txt.reset_(generator, stats.log_norm_txt.mean())
        self.adam.reset_()
        if not self._initialized:
            _copy_(self.ema_img, self.online_img)
            _copy_(self.ema_txt, self.online_txt)
        self._initialized, self._epoch, self._pending_epoch = True, epoch, None

    def _inputs(self, feats: Features):
        dtype = self.online_img.head.weight.dtype
        return feats.all_image.to(dtype), feats.all_text.to(dtype)

    def _online_params(self) -> list[torch.Tensor]:
        return list(self.online_img.parameters()) + list(self.online_txt.parameters())

    def _frozen_nets(self):
        return [n for n in (self.ema_img, self.ema_txt, self.prev_img, self.prev_txt) if n is not None]


def _copy_(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    for d, s in zip(dst.parameters(), src.parameters()):
        d.copy_(s)


def build_amorlip(args, embed_dim: int) -> AmorLIPEstimator:
    def option(name):  # flags a caller's namespace may lack take AmorLIP's defaults
        return getattr(args, name, DEFAULTS[name])
    return AmorLIPEstimator(
        embed_dim, lr=option("amorlip_lr"), repetition=args.npn_repetition, ema=option("amorlip_ema"),
        target_mix=option("amorlip_target_mix"), mix_epochs=option("amorlip_mix_epochs"),
        seed=getattr(args, "seed", 0))
