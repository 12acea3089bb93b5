"""The global contrastive loss core, shared by every method that estimates normalizers.

For an image anchor i of the global batch B (|B| = N) the normalizer is
    ε + g_i,   g_i = 1/(N−1) Σ_{j≠i} exp((s_ij − s_ii)·λ_i),   s = cosine similarity, λ_i = 1/τ_i,
and symmetrically for text anchors (columns of s). Methods differ only in the detached estimate
a_i ≈ log(ε + g_i) they supply. The data term whose gradient drives the encoders is
    D(a) = 1/N Σ_i exp(−a_i)(ε + g_i),
whose gradient is Σ_i ∇g_i / (N·exp(a_i)): each anchor's negatives weighted by the reciprocal of its
estimated normalizer (FastCLIP: 1/u_i; NeuCLIP: exp(−α_i)). At a_i = log(ε + g_i) it equals the
gradient of the global contrastive loss 1/N Σ_i log(ε + g_i).

Distributed without gathering features with gradient: rank r builds
  * an anchor-side part: its own anchors against all gathered columns (gradient into its anchors and
    their positives, and into λ), and
  * a negative-side part: all gathered anchors (detached) against its own columns (gradient into its
    features as negatives; λ detached so the temperature is differentiated once).
Summed over ranks these give exactly ∇D. DDP averages gradients over W ranks, so the rank's loss is
scaled by W.
"""
import math

import torch

from . import comm
from .features import Features, fp32


def similarity(feats: Features) -> torch.Tensor:
    """Detached N×N cosine similarities of the gathered batch (rows: images, columns: texts)."""
    return feats.all_image @ feats.all_text.T


def _logsumexp_without_positive(logits: torch.Tensor, positive_offset: int) -> torch.Tensor:
    """Row-wise log Σ_{j≠pos(i)} exp(logits_ij), where row i's positive sits in column i + offset
    (offset −k for a block of columns that starts at global row k; a positive outside the block is
    simply absent). A log-sum-exp, because exp((s_ij − s_ii)/τ) overflows fp32 for small τ."""
    rows, cols = logits.shape
    pos_col = torch.arange(rows, device=logits.device) + positive_offset
    has_pos = (pos_col >= 0) & (pos_col < cols)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[has_pos.nonzero().squeeze(1), pos_col[has_pos]] = True
    return logits.masked_fill(mask, float("-inf")).logsumexp(dim=1)


def batch_log_normalizers(sim: torch.Tensor, scale_img: torch.Tensor, scale_txt: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log(ε + g_i) for every image anchor (rows) and text anchor (columns) of the gathered batch.

    `scale_*` is λ = 1/τ, a scalar or one value per anchor. Computed in fp32 without gradient.
    """
    with torch.no_grad():
        sim = fp32(sim)
        n = sim.shape[0]
        pos = sim.diagonal()
        log_g_img = _logsumexp_without_positive((sim - pos[:, None]) * _col(scale_img), 0) - _log(n - 1)
        log_g_txt = _logsumexp_without_positive((sim.T - pos[:, None]) * _col(scale_txt), 0) - _log(n - 1)
        return log_eps_plus_exp(log_g_img, eps), log_eps_plus_exp(log_g_txt, eps)


def data_term(feats: Features, a_img: torch.Tensor, a_txt: torch.Tensor, scale_img: torch.Tensor,
              scale_txt: torch.Tensor, eps: float, differentiate_tau_twice: bool = False,
              log_normalizers: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Per-rank surrogate whose DDP-averaged gradient is ∇[D_img(a_img) + D_txt(a_txt)].

    a_img, a_txt: [N] detached log-normalizer estimates for all anchors of the gathered batch.
    scale_img, scale_txt: λ = 1/τ for image and text anchors: a scalar (with gradient when learnt)
    or one value per gathered anchor [N].
    differentiate_tau_twice: also differentiate λ in the negative-side part, as the reference FastCLIP
    code does (its published ρ values are tuned to that; the trainer's --tau_grad reference, its
    default). False gives the objective's own gradient (--tau_grad exact).
    log_normalizers: `batch_log_normalizers` for these scales when the caller already has them (spares
    an N×N product that only the logged values need).

    Returns (surrogate, (D_img, D_txt)) where D_* are the detached values of the data terms over the
    global batch, for logging.
    """
    world = comm.world_size()
    loc = feats.local
    img, txt = fp32(feats.image), fp32(feats.text)
    all_img, all_txt = feats.all_image, feats.all_text
    n = all_img.shape[0]
    a_img, a_txt = fp32(a_img.detach()), fp32(a_txt.detach())
    log_n1 = _log(n - 1)

    def side(anchors, positives, all_anchors, all_columns, own_columns, scale, a):
        scale_all = _per_anchor(scale, n)
        # Anchor side: own anchors against every column (the own positive carries gradient).
        # Each anchor's term exp(−a_i)·g_i is formed as exp(log g_i − a_i): at small τ both g_i and
        # exp(a_i) overflow fp32 while their ratio is ordinary (exp(−a)·g would give 0·inf = NaN).
        pos = (anchors * positives).sum(-1, keepdim=True)
        logits = (anchors @ all_columns.T - pos) * scale_all[loc, None]
        log_g_own = _logsumexp_without_positive(logits, loc.start) - log_n1
        anchor_part = (log_g_own - a[loc]).exp().sum()
        # Negative side: every anchor (detached) against own columns, skipping each anchor's positive.
        all_pos = (all_anchors * all_columns).sum(-1, keepdim=True)
        neg_scale = scale_all if differentiate_tau_twice else scale_all.detach()
        neg_logits = (all_anchors @ own_columns.T - all_pos) * neg_scale[:, None]
        log_g_neg = _logsumexp_without_positive(neg_logits, -loc.start) - log_n1
        negative_part = (log_g_neg - a).exp().sum()
        return (anchor_part + negative_part) * world / n

    surrogate = side(img, txt, all_img, all_txt, txt, scale_img, a_img) \
        + side(txt, img, all_txt, all_img, img, scale_txt, a_txt)
    with torch.no_grad():
        if log_normalizers is None:
            log_normalizers = batch_log_normalizers(all_img @ all_txt.T, scale_img.detach(),
                                                    scale_txt.detach(), eps)
        log_n_img, log_n_txt = log_normalizers
        d_img = (fp32(log_n_img) - a_img).exp().mean()
        d_txt = (fp32(log_n_txt) - a_txt).exp().mean()
    return surrogate, (d_img, d_txt)


def _per_anchor(scale: torch.Tensor, n: int) -> torch.Tensor:
    scale = fp32(scale)
    return scale.expand(n) if scale.dim() == 0 else scale


def _col(scale: torch.Tensor) -> torch.Tensor:
    scale = fp32(scale)
    return scale if scale.dim() == 0 else scale[:, None]


def _log(x: float) -> float:
    return math.log(x)


def log_eps_plus_exp(log_g: torch.Tensor, eps: float) -> torch.Tensor:
    """log(ε + exp(log_g)) without forming exp(log_g) (it overflows fp32 for small τ). The one place this is
    written: the batch normalizers, the NPN's α and the exact normalizers all add ε this way."""
    if eps <= 0:
        return log_g
    return torch.logaddexp(log_g, torch.full_like(log_g, math.log(eps)))
