"""Normalizer-prediction networks (NPNs) and the small optimizers that train them.

An NPN maps an anchor to α ≈ log(ε + g_i), the log of its normalizer over the whole data set.

* `PrototypeNPN` (NeuCLIP, paper eqs. 10–11): m prototypes W_j summarise the *other* modality;
      α(x_i) = log(ε + (1/m) Σ_j exp((cos(e_i, W_j) − s_ii)·λ_i)),
  the data-set normalizer with the n other-modality embeddings replaced by m prototypes.
  The image-side NPN's prototypes summarise text embeddings and vice versa.
* `ResidualMLPNPN` (AmorLIP, and NeuCLIP's "MLP" ablation): a residual MLP on the detached,
  L2-normalised embedding.

Both take the same inputs (anchors, positive similarities s_ii, λ = 1/τ, ε) so estimators can swap them.
Their training state lives in `AdaGrad` / `Adam` modules whose accumulators are buffers, so
`state_dict()` checkpoints the NPN and its optimizer together; every rank applies the same averaged
gradient to the same state and so stays bit-identical without broadcasting weights.
"""
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .core import log_eps_plus_exp


def per_anchor(scale: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """λ as a column broadcastable against [anchors, prototypes]: a scalar stays a scalar."""
    if scale.dim() == 0:
        return scale
    return (scale if rows is None else scale[rows])[:, None]


# ----------------------------------------------------------------------------------------- networks

class PrototypeNPN(nn.Module):
    """α(x_i) = log(ε + mean_j exp((cos(e_i, W_j) − s_ii)·λ_i)), computed as a log-sum-exp.

    W is stored as [m, d]. Only its rows' directions enter α (cosine), so the rows' norm is free: it is
    the parameterisation knob that sets how far one optimizer step turns a prototype (see `reset_`).
    """

    def __init__(self, num_protos: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_protos, dim))

    @property
    def num_protos(self) -> int:
        return self.weight.shape[0]

    def forward(self, anchors, positive_sim, scale, eps):
        cos = anchors @ F.normalize(self.weight, dim=1).T                      # [n, m]
        logits = (cos - positive_sim[:, None]) * scale
        return log_eps_plus_exp(logits.logsumexp(dim=1) - math.log(self.num_protos), eps)

    @torch.no_grad()
    def value_and_grad(self, anchors, positive_sim, scale, eps, log_norm, objective: str, gemm: str = "fp32"):
        """The NPN objective over these anchors and its gradient w.r.t. `weight`, in closed form.

        The inner loop runs this T_u times per encoder step. Autograd through `forward` spends most of its
        time in element-wise passes: a dozen over the [n, m] similarity (softmax backward, log-sum-exp's saved
        tensors) and several over the [m, d] prototypes (normalising them, projecting the gradient), which at
        d = 512 and a small per-rank batch cost as much as the GEMMs. Here the prototypes are never normalised
        (1/|W_j| scales the [n, m] columns instead) and are read by two GEMMs and one scaling only:
            c_ij = e_i·W_j / |W_j|,   z_ij = (c_ij − s_ii)·λ_i,   l_i = logsumexp_j z_ij − log m,
            α_i = log(ε + e^{l_i}),   g_ij = ∂J/∂c_ij = ∂J/∂α_i · e^{l_i − α_i} · softmax(z_i)_j · λ_i,
            ∂J/∂W_j = Σ_i g_ij e_i / |W_j| − (Σ_i g_ij c_ij) W_j / |W_j|².
        Returns (J, [∂J/∂weight]) like `ResidualMLPNPN.value_and_grad`. Autocast is off (fp32 maths) and z
        is shifted by its row max before exp. `gemm` "bf16x3" runs the two GEMMs as split bf16 GEMMs with
        fp32 accumulation (`split_bf16_mm`; on CUDA only, elsewhere fp32).
        """
        mm = gemm_kernel(gemm, anchors.device)
        with torch.autocast(anchors.device.type, enabled=False):
            inv_norms = self.weight.norm(dim=1).reciprocal_()                     # [m]
            cos = mm(anchors, self.weight.T).mul_(inv_norms)                      # [n, m]
            lam = scale if scale.dim() == 0 else scale.reshape(-1, 1)
            z = (cos - positive_sim[:, None]).mul_(lam)
            row_max = z.amax(dim=1, keepdim=True)
            z.sub_(row_max).exp_()                                                # z := e^{z − max}
            row_sum = z.sum(dim=1, keepdim=True)
            lse = (row_max + row_sum.log()).squeeze(1) - math.log(self.num_protos)
            alpha = log_eps_plus_exp(lse, eps)
            value, d_alpha = OBJECTIVE_VALUE_AND_GRAD[objective](alpha, log_norm, scale)
            row_weight = d_alpha * torch.exp(lse - alpha)                         # ∂J/∂l_i
            g = z.mul_((row_weight[:, None] / row_sum) * lam)                     # g_ij
            radial = (g * cos).sum(dim=0)                                         # Σ_i g_ij c_ij
            grad = self.weight * (radial * inv_norms.square()).neg_()[:, None]
            if mm is not torch.mm:
                return value, [grad.add_(mm(g.mul_(inv_norms).T, anchors))]
            # out= rather than addmm_: same in-place kernel, and torch's FLOP counter sees it (the benchmark's).
            return value, [torch.addmm(grad, g.mul_(inv_norms).T, anchors, out=grad)]

    @torch.no_grad()
    def reset_(self, rows: torch.Tensor, norm: float) -> None:
        """Prototypes := the given embeddings' directions, each scaled to length `norm`."""
        self.weight.copy_(F.normalize(rows.to(self.weight.dtype), dim=1) * norm)


def split_bf16(x: torch.Tensor):
    """x ≈ hi + lo with both bf16: hi keeps 8 significant bits, lo the next 8 (16 of fp32's 24)."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def split_bf16_mm(a: torch.Tensor, b: torch.Tensor, mm) -> torch.Tensor:
    """a @ b (fp32) from three bf16 GEMMs: a_hi·b_hi + (a_hi·b_lo + a_lo·b_hi); `mm` multiplies bf16
    matrices into fp32 (accumulating in fp32). Dropping a_lo·b_lo and the bits below lo leaves an error
    ~2^-17 relative per product: ~10-20× fp32's rounding at d = 512 where plain bf16 is ~10^4× (tested),
    for 3× bf16's FLOPs, which tensor cores run ~15× faster than fp32 (no TF32)."""
    a_hi, a_lo = split_bf16(a)
    b_hi, b_lo = split_bf16(b)
    return mm(a_hi, b_hi).add_(mm(a_hi, b_lo).add_(mm(a_lo, b_hi)))


def _bf16_mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b, out_dtype=torch.float32)  # CUDA's bf16 GEMM with an fp32 result


def gemm_kernel(gemm: str, device: torch.device):
    """The inner loop's GEMM: torch.mm (fp32), or the split bf16 product on CUDA (CPUs have no bf16
    GEMM with an fp32 result, and three fp32 GEMMs would only be slower)."""
    if gemm == "fp32" or device.type != "cuda":
        return torch.mm
    if gemm == "bf16x3":
        return lambda a, b: split_bf16_mm(a, b, _bf16_mm_fp32_out)
    raise ValueError(f"unknown NPN GEMM precision {gemm!r}: fp32 or bf16x3")


class ResidualMLPNPN(nn.Module):
    """Linear(d→h) → ReLU → LayerNorm → Linear(h→d) → ReLU → LayerNorm → +input → ReLU → Linear(d→1).

    Input: the detached, L2-normalised embedding; output α (AmorLIP: log λ). The positive similarity and
    temperature are accepted for interface parity with `PrototypeNPN` and ignored.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.norm1 = nn.Linear(dim, hidden), nn.LayerNorm(hidden)
        self.fc2, self.norm2 = nn.Linear(hidden, dim), nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, anchors, positive_sim=None, scale=None, eps=None):
        x = F.normalize(anchors.detach(), dim=1)
        h = self.norm1(F.relu(self.fc1(x)))
        h = self.norm2(F.relu(self.fc2(h)))
        return self.head(F.relu(h + x)).squeeze(1)

    def value_and_grad(self, anchors, positive_sim, scale, eps, log_norm, objective: str, gemm: str = "fp32"):
        """The NPN objective over these anchors and its gradients w.r.t. `parameters()` (autograd; `gemm`
        is accepted for interface parity and ignored)."""
        with torch.enable_grad():
            value = OBJECTIVES[objective](self(anchors), log_norm, scale)
            grads = torch.autograd.grad(value, list(self.parameters()))
        return value.detach(), list(grads)

    @torch.no_grad()
    def reset_(self, generator: torch.Generator, output_bias=0.0) -> None:
        """PyTorch's default Linear/LayerNorm initialisation drawn from `generator`, so that every rank
        (and a resumed run) draws the same network; the head's bias starts at `output_bias` (a float or
        a 0-dim tensor: a device tensor needs no host sync)."""
        for layer in (self.fc1, self.fc2, self.head):
            bound = 1.0 / math.sqrt(layer.in_features)  # = kaiming_uniform(a=√5) for the weight
            _uniform_(layer.weight, bound, generator)
            _uniform_(layer.bias, bound, generator)
        for norm in (self.norm1, self.norm2):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        self.head.bias.fill_(output_bias)


def _uniform_(t: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    # Drawn on the CPU (where the generator lives) and copied, so the device does not matter.
    t.copy_((torch.rand(t.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)


def seeded_generator(*salt: int) -> torch.Generator:
    """A CPU generator determined by integers only (seed, step, ...): identical on every rank."""
    value = 0
    for s in salt:
        value = (value * 1_000_003 + int(s)) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(value)


# --------------------------------------------------------------------------------------- objectives

def unified_objective(alpha, log_norm, scale):
    """NeuCLIP's NPN objective (eq. 12 with the encoders fixed): τ·mean_i[exp(−α_i)(ε+g_i) + α_i].

    Linear in ε+g_i, so plugging in the mini-batch estimate g_i gives an *unbiased* stochastic gradient
    of the data-set objective; its minimiser per anchor is α_i = log(ε+g_i). (AmorLIP's regression onto
    log(ε+g_i) is not linear in g_i: the batch target makes its gradient biased.) exp(−α)(ε+g) is
    formed as exp(log_norm − α) so neither factor overflows.
    """
    terms = torch.exp(log_norm - alpha) + alpha
    tau = 1.0 / (scale.reshape(-1) if scale.dim() else scale)  # per anchor ([n] or [n, 1]) or global
    return (tau * terms).mean()


def regression_objective(alpha, log_norm, scale=None):
    """AmorLIP's separate objective (paper §5.2): mean_i (α_i − log(ε + g_i))²."""
    return (alpha - log_norm).square().mean()


OBJECTIVES = {"unified": unified_objective, "regression": regression_objective}


def _unified_value_and_grad(alpha, log_norm, scale):
    tau = 1.0 / (scale.reshape(-1) if scale.dim() else scale)
    excess = torch.exp(log_norm - alpha)
    n = alpha.shape[0]
    return (tau * (excess + alpha)).mean(), tau * (1 - excess) / n


def _regression_value_and_grad(alpha, log_norm, scale=None):
    residual = alpha - log_norm
    return residual.square().mean(), 2 * residual / alpha.shape[0]


#: (objective value, ∂value/∂α per anchor) in closed form, for `PrototypeNPN.value_and_grad`.
OBJECTIVE_VALUE_AND_GRAD = {"unified": _unified_value_and_grad, "regression": _regression_value_and_grad}


# ------------------------------------------------------------------------------------- optimizers

class _BufferOptimizer(nn.Module):
    """Optimizer whose state tensors are buffers (one per trained tensor), checkpointed by state_dict.

    Updates are in place on the given tensors, under no_grad, with tensor maths only (no host syncs).
    """

    def __init__(self, params: list[torch.Tensor], lr: float, state_names: tuple[str, ...]):
        super().__init__()
        self.lr = lr
        for i, p in enumerate(params):
            for name in state_names:
                self.register_buffer(f"{name}_{i}", torch.zeros_like(p, memory_format=torch.contiguous_format))

    def state(self, name: str, i: int) -> torch.Tensor:
        return getattr(self, f"{name}_{i}")

    @torch.no_grad()
    def reset_(self) -> None:
        for buf in self.buffers():
            buf.zero_()


class AdaGrad(_BufferOptimizer):
    """Duchi et al.'s AdaGrad as in torch.optim.Adagrad (no lr decay, no initial accumulator):
        G ← G + g²,   p ← p − lr·g/(√G + eps).
    Note its first step after a state reset is lr·g/|g| = ±lr per coordinate: a sign step."""

    def __init__(self, params, lr: float, eps: float = 1e-10):
        super().__init__(params, lr, ("sum_sq",))
        self.eps = eps

    @torch.no_grad()
    def step_(self, params, grads) -> None:
        for i, (p, g) in enumerate(zip(params, grads)):
            sum_sq = self.state("sum_sq", i)
            sum_sq.addcmul_(g, g)
            p.addcdiv_(g, sum_sq.sqrt().add_(self.eps), value=-self.lr)


class Adam(_BufferOptimizer):
    """Kingma & Ba's Adam with bias correction; the step count is a tensor buffer so that the
    correction needs no host sync."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr, ("exp_avg", "exp_avg_sq"))
        self.betas, self.eps = betas, eps
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def step_(self, params, grads) -> None:
        b1, b2 = self.betas
        self.steps.add_(1)
        correction1 = 1 - torch.pow(b1, self.steps)
        correction2_sqrt = (1 - torch.pow(b2, self.steps)).sqrt()
        for i, (p, g) in enumerate(zip(params, grads)):
            m, v = self.state("exp_avg", i), self.state("exp_avg_sq", i)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / correction2_sqrt.to(v.dtype)).add_(self.eps)
            p.sub_(self.lr * (m / correction1.to(m.dtype)) / denom)


# ----------------------------------------------------------------------------------------- timing

class Stopwatch:
    """Times a region without a host sync: CUDA events on GPU (read back only when asked),
    perf_counter on CPU (where the work is synchronous anyway)."""

    def __init__(self):
        self._events = None
        self._cpu_ms = float("nan")

    def start(self, device: torch.device) -> None:
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        else:
            self._events, self._t0 = None, time.perf_counter()

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        else:
            self._cpu_ms = (time.perf_counter() - self._t0) * 1e3

    def elapsed_ms(self) -> float:
        if self._events is not None:
            self._events[1].synchronize()  # only at logging time
            return self._events[0].elapsed_time(self._events[1])
        return self._cpu_ms
