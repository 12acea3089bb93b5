"""Temperature schemes of the global contrastive family: where τ comes from and how it is learnt.

Every scheme answers two questions for the gathered anchors of a step:
  * `inverse_temperatures(feats)`: λ = 1/τ in each anchor's exponent (with gradient when autograd
    learns τ), and
  * `loss_factors(feats)`: T, the factor in front of each anchor's loss: the objective is
        Σ_modality 1/N Σ_i T_i·(ℓ_i + ρ_T),   ℓ_i ≈ log(ε + g_i)
    with T = 1, ρ_T = 0 for the plain GCL (FastCLIP v0/v1) and T = τ (or τ_i), ρ_T = ρ for the robust
    losses (v3: RGCL-g, one global τ; v2: RGCL, one τ per sample and modality).

`GlobalTemperature` reads τ from the model's `logit_scale` (log 1/τ), learnt by the main optimizer;
the loop clamps it to [0, ln 100] after every step, as open_clip does.

`IndividualTemperatures` (v2) keeps τ_i for every sample key and modality in float32 host tables with
their own Adam state (m, v and a step count per entry, all buffers so checkpoints carry them) and
updates them by hand after each encoder step, in [0.01, 1], with lr = --lr_tau (constant: the
reference applies no schedule to it) and --beta1/--beta2/--eps. Each rank updates the anchors it owns
and all-gathers the new values with their keys, so every rank's tables stay identical.

Against the reference FastCLIP v2 code: its τ gradient is the one used here,
    ∂/∂τ_i [τ_i·log(ε + g_i) + ρτ_i] ≈ a_i + ρ − exp(−a_i)/(N−1) Σ_{j≠i} e^{z_ij} z_ij,
    z_ij = (s_ij − s_ii)/τ_i, a_i the estimate of log(ε + g_i) (there log(u_i + ε)),
clamped to ±5 as there. It differs in: Adam divides by √v̂ (the reference divides by v̂), bias
correction counts each sample's own updates (the reference uses the epoch number, with β = 0 in epoch 0),
the same (pre-update) τ_i serves both the anchor and negative sides of a step, and the encoder gradient
carries the factor τ_i of the objective (the reference drops it). Its log-sum-exp "bounds" are not
needed: normalizers are formed in the log domain here.
"""
import math

import torch
from torch import nn

from . import comm
from .method_interface import STEP_SKIPPED
from .table import PerSampleTable
from .features import Features, fp32

TAU_MIN, TAU_MAX = 0.01, 1.0
#: The reference clamps each per-sample τ gradient to ±5 before Adam.
TAU_GRAD_CLAMP = 5.0
#: Caps exp() in the τ-sensitivity when a stale estimate a_i sits far below the batch's normalizer.
_MAX_LOG_RATIO = 60.0


class GlobalTemperature(nn.Module):
    """One τ for all anchors: the model's logit_scale (FastCLIP v0, v1, v3)."""

    uses_per_sample_state = False
    learns_per_sample = False

    def __init__(self, logit_scale: nn.Parameter, tau_init: float, learnable: bool, robust: bool,
                 rho: float):
        super().__init__()
        init_logit_scale(logit_scale, tau_init, learnable)
        self.robust = robust
        self.rho = rho if robust else 0.0

    def inverse_temperatures(self, feats: Features):
        scale = fp32(feats.logit_scale).reshape(())
        return scale, scale

    def loss_factors(self, feats: Features):
        if self.robust:
            tau = 1.0 / fp32(feats.logit_scale).reshape(())
            return tau, tau
        one = torch.ones((), dtype=feats.all_image.dtype, device=feats.all_image.device)
        return one, one

    def scalars(self) -> dict:
        return {}


#: Per sample and modality: τ, Adam's two moments and its step count (bias correction).
_QUANTITIES = ("tau", "adam_m", "adam_v", "adam_steps")
_INDIVIDUAL_COLUMNS = {f"{q}_{side}": (torch.int32 if q == "adam_steps" else torch.float32, 0.0)
                       for side in ("img", "txt") for q in _QUANTITIES}


class IndividualTemperatures(nn.Module):
    """τ_i per sample key and modality with a hand-written per-sample Adam (FastCLIP v2)."""

    uses_per_sample_state = True
    QUANTITIES = _QUANTITIES
    COLUMNS = _INDIVIDUAL_COLUMNS

    def __init__(self, data_size: int, tau_init: float, learnable: bool, rho: float, lr: float,
                 betas: tuple[float, float], eps: float, state_dtype: torch.dtype = torch.float32):
        super().__init__()
        tau_init = min(max(tau_init, TAU_MIN), TAU_MAX)
        columns = {name: (torch.int32 if name.startswith("adam_steps") else state_dtype,
                          tau_init if name.startswith("tau") else 0.0) for name in self.COLUMNS}
        self.table = PerSampleTable(data_size, columns, owner="--temperature_scheme individual_*")
        self.learns_per_sample = learnable
        self.rho, self.lr, self.betas, self.eps = rho, lr, betas, eps

    def taus(self, feats: Features):
        """τ of the gathered image and text anchors, [N] each."""
        keys = self.table.host_keys(feats.all_keys)
        return (self.table.read("tau_img", keys, feats.all_image),
                self.table.read("tau_txt", keys, feats.all_image))

    def inverse_temperatures(self, feats: Features):
        tau_img, tau_txt = self.taus(feats)
        return 1.0 / tau_img, 1.0 / tau_txt

    def loss_factors(self, feats: Features):
        return self.taus(feats)

    @torch.no_grad()
    def update(self, feats: Features, grad_img: torch.Tensor, grad_txt: torch.Tensor) -> None:
        """One Adam step for this rank's anchors (gradients [b], the local slice), then share them."""
        keys = self.table.host_keys(feats.keys)
        skipped = feats.extras.get(STEP_SKIPPED)  # the encoders' step was skipped: keep the old state
        columns = []
        for side, grad in (("img", grad_img), ("txt", grad_txt)):
            state = [self.table.read(f"{q}_{side}", keys, grad) for q in self.QUANTITIES]
            new = adam_step(*state, grad, self.lr, self.betas, self.eps)
            columns += new if skipped is None else [torch.where(skipped, o, n) for o, n in zip(state, new)]
        # float64 holds the float32 state and the int32 step counts exactly: one collective for all.
        gathered = comm.all_gather_no_grad(torch.stack(columns, dim=1).double())
        names = [f"{q}_{side}" for side in ("img", "txt") for q in self.QUANTITIES]
        self.table.write(self.table.host_keys(feats.all_keys),
                         **{name: gathered[:, i] for i, name in enumerate(names)})

    def scalars(self) -> dict:
        return {"lr_tau_individual": self.lr} if self.learns_per_sample else {}


def adam_step(tau, m, v, steps, grad, lr: float, betas: tuple[float, float], eps: float):
    """Adam on each entry independently, with its own step count for the bias correction; τ is kept
    in [TAU_MIN, TAU_MAX]. Returns the new (τ, m, v, steps)."""
    beta1, beta2 = betas
    steps = steps + 1
    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * grad * grad
    m_hat = m / (1.0 - beta1 ** steps)
    v_hat = v / (1.0 - beta2 ** steps)
    tau = (tau - lr * m_hat / (v_hat.sqrt() + eps)).clamp(TAU_MIN, TAU_MAX)
    return tau, m, v, steps


def per_sample_tau_gradient(sim_rows: torch.Tensor, positive_offset: int, scale: torch.Tensor,
                            a: torch.Tensor, value: torch.Tensor, rho: float) -> torch.Tensor:
    """∂/∂τ_i of τ_i·(ℓ_i + ρ) for the anchors in `sim_rows` (row i's positive in column i + offset).

    ℓ_i = `value` depends on τ_i through ε + g_i, estimated by exp(a_i), so
        ∂/∂τ_i = ℓ_i + ρ + τ_i·exp(−a_i)·∂g_i/∂τ_i,
        τ_i·∂g_i/∂τ_i = −1/(N−1) Σ_{j≠i} e^{z_ij}·z_ij,   z_ij = (s_ij − s_ii)·λ_i,
    the same for the log objective (ℓ = a) and the unified one (ℓ = exp(−a)(ε+g) + a − 1).
    The sum is taken relative to each row's largest z (it overflows fp32 at small τ otherwise).
    Clamped to ±TAU_GRAD_CLAMP, as the reference does.
    """
    with torch.no_grad():
        rows, n = sim_rows.shape
        index = torch.arange(rows, device=sim_rows.device)
        positive = sim_rows[index, index + positive_offset]
        z = (sim_rows - positive[:, None]) * scale[:, None]
        is_positive = torch.zeros_like(z, dtype=torch.bool)
        is_positive[index, index + positive_offset] = True
        z_max = z.masked_fill(is_positive, -math.inf).max(dim=1).values
        weights = (z - z_max[:, None]).exp().masked_fill(is_positive, 0.0)
        weighted_sum = (weights * z.masked_fill(is_positive, 0.0)).sum(dim=1)
        log_ratio = (z_max - a - math.log(n - 1)).clamp(max=_MAX_LOG_RATIO)
        sensitivity = -log_ratio.exp() * weighted_sum
        return (value + rho + sensitivity).clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)


# ------------------------------------------------------------------------------------------- build

#: --temperature_scheme → (per-sample?, learnable?)
SCHEMES = {"global_learnable": (False, True), "global_constant": (False, False),
           "individual_learnable": (True, True), "individual_constant": (True, False)}


def init_logit_scale(logit_scale: nn.Parameter, tau: float, learnable: bool) -> None:
    with torch.no_grad():
        logit_scale.fill_(math.log(1.0 / tau))
    logit_scale.requires_grad_(learnable)


def per_sample_temperature_bytes(scheme: str) -> int:
    per_sample, _ = SCHEMES[scheme]
    return PerSampleTable.bytes_per_sample(IndividualTemperatures.COLUMNS) if per_sample else 0


def build_temperature(args, logit_scale: nn.Parameter, state_dtype: torch.dtype = torch.float32):
    """The scheme --temperature_scheme names. The model's logit_scale starts at log(1/--temperature)
    and is trained by the main optimizer only under global_learnable."""
    if args.temperature_scheme not in SCHEMES:
        raise ValueError(f"unknown --temperature_scheme {args.temperature_scheme!r}; "
                         f"known: {', '.join(SCHEMES)}")
    per_sample, learnable = SCHEMES[args.temperature_scheme]
    if not per_sample:
        return GlobalTemperature(logit_scale, args.temperature, learnable, robust=args.multiply_tau,
                                 rho=args.rho)
    # The model's own temperature is unused by v2; it stays at the initial value for evaluation.
    init_logit_scale(logit_scale, args.temperature, learnable=False)
    return IndividualTemperatures(args.data_size, args.temperature, learnable, args.rho, args.lr_tau,
                                  (args.beta1, args.beta2), args.eps, state_dtype)
