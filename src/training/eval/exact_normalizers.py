"""The exact log-normalizer of a sample of anchors against a whole data set: the truth of the estimation error
when n is too large for every anchor (training.eval.estimation_error computes all n against all n).

Used by the data-to-batch-ratio benchmark (training.bench.regime) at n up to 10⁶, and by anyone who wants
log(ε + g(i, S)) for a few anchors of a large embedded set."""
from __future__ import annotations

import math

import torch

from contrastive import core
from contrastive.features import fp32

#: Column tile: a tile is k × BLOCK fp32 values for k anchors (16 MiB at k = 1024).
BLOCK = 4096


def anchor_log_normalizers(image: torch.Tensor, text: torch.Tensor, anchors: torch.Tensor, scale_img: torch.Tensor,
                           scale_txt: torch.Tensor, eps: float, block: int = BLOCK
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """log(ε + g(i, S)) over the whole set S of n pairs (image_j, text_j), for the anchors i ∈ `anchors` only
    (a [k] index into 0..n−1): image anchor i against all n texts, text anchor i against all n images, each
    skipping its own pair. The truth of a sample of anchors when n is too large for every anchor (n = 10⁶:
    k · n work instead of n²), in fp32 without gradient, columns in tiles of `block` (memory O(k · block)).

    `scale_*`: λ = 1/τ, a scalar or one value per anchor ([k]). Rows of `image` and `text` are L2-normalised.
    With `anchors` = 0..n−1 it equals `training.eval.estimation_error.true_log_normalizers`."""
    with torch.no_grad():
        image, text = fp32(image.detach()), fp32(text.detach())
        anchors = anchors.to(device=image.device, dtype=torch.int64)
        return (_anchor_log_normalizers(image, text, anchors, fp32(scale_img.detach()), eps, block),
                _anchor_log_normalizers(text, image, anchors, fp32(scale_txt.detach()), eps, block))


def _anchor_log_normalizers(rows: torch.Tensor, columns: torch.Tensor, anchors: torch.Tensor, scale: torch.Tensor,
                            eps: float, block: int) -> torch.Tensor:
    """Anchor k: log(ε + 1/(n−1) Σ_{j≠i_k} exp((r_{i_k}·c_j − r_{i_k}·c_{i_k})·λ_k)), i_k = anchors[k]."""
    n = rows.shape[0]
    if n < 2:
        raise ValueError(f"log-normalizers need at least 2 pairs, got {n}")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) >= n):
        raise ValueError(f"anchor indices must lie in 0..{n - 1}")
    a = rows[anchors]
    positive = (a * columns[anchors]).sum(-1)
    lam = scale if scale.dim() == 0 else scale[:, None]
    scaled, offset = a * lam, -(positive[:, None] * lam)  # (a·c − a·c_i)·λ = (λa)·c − λ(a·c_i): one GEMM per tile
    running = torch.full((a.shape[0],), -math.inf, dtype=a.dtype, device=a.device)
    for c0 in range(0, n, block):
        c1 = min(c0 + block, n)
        logits = torch.addmm(offset, scaled, columns[c0:c1].T)
        own = ((anchors >= c0) & (anchors < c1)).nonzero().squeeze(1)  # anchors whose own pair is in this tile
        logits[own, anchors[own] - c0] = -math.inf
        running = torch.logaddexp(running, logits.logsumexp(dim=1))
    return core.log_eps_plus_exp(running - math.log(n - 1), eps)
