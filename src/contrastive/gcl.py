"""The global contrastive loss family ("gcl"): FastCLIP v0–v3, and NeuCLIP / AmorLIP by estimator.

Objective, per modality m ∈ {image, text} over the data set, with ℓ_i ≈ log(ε + g_i) (see core.py):
    Σ_m 1/N Σ_i T_i·(ℓ_i + ρ_T)
  v0  --temperature_scheme global_learnable            GCL:    T = 1, ρ_T = 0; τ learnt through g
  v1  global_constant                                   GCL with τ fixed
  v3  global_learnable --multiply_tau                   RGCL-g: T = τ, ρ_T = ρ, i.e. τ·Σ_m mean log(ε+g) + 2ρτ
      (global_constant --multiply_tau: the same with τ fixed)
  v2  individual_learnable                              RGCL:   T = τ_i per sample and modality, ρ_T = ρ
      individual_constant                               the same with the τ_i fixed
(temperature.py holds the schemes: λ = 1/τ in the exponent, T in front).

Each step: the gathered similarity is formed once; `core.batch_log_normalizers` gives log(ε + g_i(B))
for every gathered anchor (`BatchStats`, shared with the estimator); the estimator returns detached
estimates a_i for all N anchors; each rank backpropagates
    core.data_term(a − log T)  +  Σ_m 1/N Σ_i T_i·(ℓ_i + ρ_T).
The first part's DDP-averaged gradient is Σ_m 1/N Σ_i T_i·exp(−a_i)·∇g_i: the encoders' gradient (T is
detached there: shifting a by log T scales each anchor's weight by T) and τ's gradient through the
exponent. The second part has the same value on every rank, so DDP's average leaves its gradient, the
∂T/∂τ·(ℓ + ρ) part of a learnt global τ, unscaled. Its value is the logged "loss". For v2 the τ_i
carry no autograd gradient: `temperature.per_sample_tau_gradient` computes theirs from the same
quantities and `after_encoder_step` applies the per-sample Adam step.

Objective selection (the contract with estimators): an estimator's `objective` attribute, read once
when the method is built (absent: "log"):
  "log":     ℓ_i = a_i. FastCLIP's loss: the estimate stands in for log(ε + g_i).
  "unified": ℓ_i = exp(−a_i)·(ε + g_i(B)) + a_i − 1. NeuCLIP's eq. 12,
             τ·Σ_m 1/N Σ_i [exp(−a_i)(ε + g_i) + a_i] + 2τ(ρ − 1), with τ kept in the outer factor.
             At a_i = log(ε + g_i) both give the same value and the same encoder and τ gradients.
Any other value fails when the method is built.

Temperature gradient (--tau_grad):
  reference (the trainer's default): FastCLIP's code, which differentiates λ on the negative side of
      the data term too, so the data term's share of a learnt global τ's gradient counts twice:
          ∇τ_reference = ∇τ_exact + T·∂D/∂τ = 2·∇τ_exact − ∂T/∂τ·Σ_m (mean ℓ + ρ_T).
      The published ρ values are tuned to this: for one ρ, exact settles τ elsewhere
      (scripts/tau_grad_study.py). Encoder gradients are the same; v2 is unaffected.
  exact: the objective's gradient. λ is differentiated once, on the anchor side of the data term
      (core.data_term's negative side detaches it).

Against the reference's values: its RGCL-g loss is half of ours (it averages the two modalities and
adds ρτ), which only rescales gradients for Adam, and it takes log(u) without ε.
"""
from dataclasses import dataclass

import torch
from torch import nn

from . import core, registry
from .estimator_interface import BatchStats, NormalizerEstimator
from .features import Features, fp32
from .method_interface import ContrastiveMethod, LossOutput
from .per_sample_memory import check_memory
from .temperature import build_temperature, per_sample_tau_gradient

_BATCH_CACHE_KEY = "gcl.batch"
_ESTIMATE_CACHE_KEY = "gcl.estimate"


def log_objective(a: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """ℓ_i = a_i: the estimate is the log-normalizer."""
    return a


def unified_objective(a: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """ℓ_i = exp(−a_i)(ε + g_i) + a_i − 1 (NeuCLIP eq. 12), formed in the log domain."""
    return torch.exp(log_norm - a) + a - 1.0


#: ℓ_i as a function of the estimate, by an estimator's `objective` attribute (npn.OBJECTIVES are the NPN's
#: own training objectives, another thing).
PER_ANCHOR_TERMS = {"log": log_objective, "unified": unified_objective}


def objective_of(estimator: NormalizerEstimator) -> str:
    name = getattr(estimator, "objective", "log")
    if name not in PER_ANCHOR_TERMS:
        raise ValueError(f"{type(estimator).__name__}.objective = {name!r}; the gcl method knows "
                         f"{', '.join(PER_ANCHOR_TERMS)}")
    return name


def finite_estimates(a: torch.Tensor, batch_value: torch.Tensor) -> torch.Tensor:
    """Detached estimates with any non-finite entry replaced by the batch's own value: one bad
    estimate must not turn a whole step's gradient into NaN."""
    a = a.detach()
    return torch.where(torch.isfinite(a), a, batch_value)


def embed_dim(model: nn.Module) -> int:
    """The joint embedding width of an open_clip model (CLIP or CustomTextCLIP)."""
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return projection.shape[1]
    if isinstance(projection, nn.Linear):
        return projection.out_features
    return model.visual.output_dim


@dataclass
class _Batch:
    sim: torch.Tensor        # [N, N] detached, rows images, columns texts
    stats: BatchStats


class GlobalContrastiveMethod(ContrastiveMethod):
    def __init__(self, estimator: NormalizerEstimator, temperature: nn.Module, eps: float,
                 differentiate_tau_twice: bool = False):
        super().__init__()
        self.estimator, self.temperature = estimator, temperature
        self.eps, self.differentiate_tau_twice = eps, differentiate_tau_twice
        self.objective = objective_of(estimator)
        self._objective_values = PER_ANCHOR_TERMS[self.objective]
        self.uses_per_sample_state = estimator.uses_per_sample_state or temperature.uses_per_sample_state
        self._pending_tau_gradients = None

    @classmethod
    def from_args(cls, args, model: nn.Module) -> "GlobalContrastiveMethod":
        check_memory(args)  # before any per-sample table is allocated
        temperature = build_temperature(args, model.logit_scale)
        estimator = registry.build_estimator(args.estimator, args, embed_dim(model))
        return cls(estimator, temperature, args.fastclip_eps, args.tau_grad == "reference")

    # ---------------------------------------------------------------------------- loop interface

    def on_epoch_start(self, epoch: int) -> None:
        self.estimator.on_epoch_start(epoch)

    def before_encoder_step(self, feats: Features) -> dict:
        return self.estimator.prepare(feats, self._batch(feats).stats)

    def forward(self, feats: Features) -> LossOutput:
        batch = self._batch(feats)
        stats = batch.stats
        estimate = self._estimate(feats, stats)
        a_img = finite_estimates(estimate.a_img, stats.log_norm_img)
        a_txt = finite_estimates(estimate.a_txt, stats.log_norm_txt)
        values_img = self._objective_values(a_img, stats.log_norm_img)
        values_txt = self._objective_values(a_txt, stats.log_norm_txt)

        scale_img, scale_txt = self.temperature.inverse_temperatures(feats)
        factor_img, factor_txt = self.temperature.loss_factors(feats)
        rho = self.temperature.rho
        data, _ = core.data_term(feats, a_img - factor_img.detach().log(), a_txt - factor_txt.detach().log(),
                                 scale_img, scale_txt, self.eps, self.differentiate_tau_twice,
                                 log_normalizers=(stats.log_norm_img, stats.log_norm_txt))
        objective = (factor_img * (values_img + rho)).mean() + (factor_txt * (values_txt + rho)).mean()
        loss = data + objective
        if estimate.extra_loss is not None and feats.carries_step_gradient:
            loss = loss + estimate.extra_loss
        if self.temperature.learns_per_sample:
            self._pending_tau_gradients = self._tau_gradients(feats, batch, (a_img, a_txt),
                                                              (values_img, values_txt))
        return LossOutput(loss, self._terms(stats, a_img, a_txt, objective, estimate.extra_loss))

    def after_encoder_step(self, feats: Features) -> None:
        if self._pending_tau_gradients is not None:
            self.temperature.update(feats, *self._pending_tau_gradients)
            self._pending_tau_gradients = None

    def trainable_parameter_groups(self) -> list[dict]:
        return self.estimator.trainable_parameter_groups()

    def log_normalizers(self, feats: Features):
        # Fresh statistics: the diagnostic may run after the step changed τ.
        return self.estimator.predict(feats, self._batch(feats, use_cache=False).stats)

    def inverse_temperatures(self, feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
        # The scheme's λ: FastCLIP-v2's per-sample τ_i are looked up by key.
        scale_img, scale_txt = self.temperature.inverse_temperatures(feats)
        return fp32(scale_img.detach()), fp32(scale_txt.detach())

    def scalars(self) -> dict:
        return {**self.estimator.scalars(), **self.temperature.scalars()}

    # ---------------------------------------------------------------------------------- helpers

    def _batch(self, feats: Features, use_cache: bool = True) -> _Batch:
        """Similarity and batch log-normalizers at the current (detached) temperatures, computed once
        per step: `before_encoder_step` and `forward` see the same features and temperatures."""
        if use_cache and _BATCH_CACHE_KEY in feats.extras:
            return feats.extras[_BATCH_CACHE_KEY]
        sim = core.similarity(feats)
        scale_img, scale_txt = (s.detach() for s in self.temperature.inverse_temperatures(feats))
        log_norm_img, log_norm_txt = core.batch_log_normalizers(sim, scale_img, scale_txt, self.eps)
        batch = _Batch(sim, BatchStats(log_norm_img, log_norm_txt, scale_img, scale_txt, self.eps))
        if use_cache:
            feats.extras[_BATCH_CACHE_KEY] = batch
        return batch

    def _estimate(self, feats: Features, stats: BatchStats):
        """The estimator's estimate, once per step: it may update state (the moving average), and
        gradient accumulation calls `forward` once per micro-batch with the same step's features."""
        if _ESTIMATE_CACHE_KEY not in feats.extras:
            feats.extras[_ESTIMATE_CACHE_KEY] = self.estimator.estimate(feats, stats)
        return feats.extras[_ESTIMATE_CACHE_KEY]

    def _tau_gradients(self, feats: Features, batch: _Batch, a, values):
        """Per-sample τ gradients of this rank's anchors (image rows, text columns of the similarity)."""
        loc = feats.local
        sides = ((batch.sim[loc], batch.stats.scale_img, a[0], values[0]),
                 (batch.sim.T[loc], batch.stats.scale_txt, a[1], values[1]))
        return tuple(per_sample_tau_gradient(rows, loc.start, scale[loc], a_side[loc], value[loc],
                                             self.temperature.rho)
                     for rows, scale, a_side, value in sides)

    @torch.no_grad()
    def _terms(self, stats: BatchStats, a_img, a_txt, objective, extra_loss) -> dict:
        terms = {"loss": objective.detach(),
                 "data_img": (stats.log_norm_img - a_img).exp().mean(),
                 "data_txt": (stats.log_norm_txt - a_txt).exp().mean(),
                 "tau": 0.5 * ((1.0 / stats.scale_img).mean() + (1.0 / stats.scale_txt).mean())}
        if extra_loss is not None:
            terms["estimator_loss"] = extra_loss.detach()
        return terms


def build_gcl(args, model: nn.Module) -> GlobalContrastiveMethod:
    return GlobalContrastiveMethod.from_args(args, model)
