"""Evaluation metrics on embeddings: zero-shot accuracy, per-image candidate choice, retrieval recall and
ranks, the CLIP loss.

Metric functions take embeddings (normalised inside) and return Python floats computed with torch
(open_clip's and clip-benchmark's `accuracy` call `float()` on a 1-element array, which numpy ≥ 2.4
rejects). Ties count against the model: an answer is right at k only when fewer than k wrong
answers score *at least as high* as the best right one, so a model that scores everything alike
gets no credit. In retrieval, pairs whose captions tokenise identically (the built-in split repeats
about a fifth of its captions; web data repeats some too) count as matching each other: a model
cannot tell them apart, so retrieving either is right.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)
# The CLIP loss grows with the number of negatives, so it is taken over chunks of a fixed size,
# independent of --batch-size and of the loader: comparable across runs and evaluators.
LOSS_BATCH_SIZE = 256

def _fraction(hits: torch.Tensor) -> float:
    return hits.sum().item() / hits.numel() if hits.numel() else float("nan")


def wrong_at_least_as_high(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per row: how many wrong columns score at least as high as the row's best right column.
    NaN scores the lowest, so a diverged model scores nothing rather than everything."""
    scores = scores.float().nan_to_num(nan=float("-inf"))
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~positives).sum(dim=1)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: fraction of rows whose label is among the k best columns} (ties count against)."""
    positives = F.one_hot(labels.long().to(scores.device), scores.shape[1]).bool()
    ahead = wrong_at_least_as_high(scores, positives)
    return {k: _fraction(ahead < k) for k in ks}


def class_embeddings(template_embeddings: torch.Tensor) -> torch.Tensor:
    """[classes, templates, d] -> [classes, d]: the mean of the normalised template embeddings,
    renormalised (open_clip's zero-shot classifier)."""
    return F.normalize(F.normalize(template_embeddings.float(), dim=-1).mean(dim=1), dim=-1)


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{"top1", and "top5" when there are more than 5 classes (with 5 or fewer it is always 1)}."""
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T
    ks = (1, 5) if class_emb.shape[0] > 5 else (1,)
    return {f"top{k}": acc for k, acc in topk_accuracy(logits, labels, ks).items()}


def candidate_accuracy(image_emb: torch.Tensor, candidate_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Image n against its own candidates candidate_emb[n] ([N, K, d]); labels index the right one."""
    scores = torch.einsum("nd,nkd->nk", F.normalize(image_emb.float(), dim=-1),
                          F.normalize(candidate_emb.float(), dim=-1))
    return topk_accuracy(scores, labels, (1,))[1]


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, groups: torch.Tensor | None = None,
                     ks: Sequence[int] = RECALL_KS, chunk: int = 4096) -> dict[str, float]:
    """Recall@k both ways for pairs (image i, text i). `groups[i]`: an id per pair; pairs with the same
    id (identical captions) match each other too. Computed in row chunks: memory O(chunk x N)."""
    n = image_emb.shape[0]
    if text_emb.shape[0] != n:
        raise ValueError(f"{n} images but {text_emb.shape[0]} texts: retrieval needs one text per image")
    groups = (torch.arange(n) if groups is None else groups).to(image_emb.device)
    images, texts = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    out = {}
    for direction, queries, keys in (("image_to_text", images, texts), ("text_to_image", texts, images)):
        ahead = torch.cat([wrong_at_least_as_high(queries[s:s + chunk] @ keys.T,
                                                  groups[s:s + chunk, None] == groups[None, :])
                           for s in range(0, n, chunk)])
        out |= {f"{direction}_R@{k}": _fraction(ahead < k) for k in ks}
        out |= rank_summary(ahead, direction)
    return out


def rank_summary(ahead: torch.Tensor, direction: str) -> dict[str, float]:
    """open_clip's mean and median rank (1 = first); its median is numpy's (the mean of the two middle
    values), floored. Ties count against the model, as everywhere here."""
    if not ahead.numel():
        return {f"{direction}_mean_rank": float("nan"), f"{direction}_median_rank": float("nan")}
    ranks = ahead.double()
    return {f"{direction}_mean_rank": ranks.mean().item() + 1,
            f"{direction}_median_rank": torch.quantile(ranks, 0.5).floor().item() + 1}


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float,
              batch_size: int | None = LOSS_BATCH_SIZE) -> float:
    """open_clip's validation loss: the symmetric InfoNCE of each chunk of `batch_size` consecutive
    pairs (the whole set when None), averaged with chunk sizes as weights."""
    images, texts = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    n = images.shape[0]
    step = batch_size or max(n, 1)
    total = torch.zeros((), device=images.device)
    for s in range(0, n, step):
        logits = logit_scale * images[s:s + step] @ texts[s:s + step].T
        target = torch.arange(logits.shape[0], device=logits.device)
        total += (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2 * logits.shape[0]
    return (total / max(n, 1)).item()


def caption_groups(tokens: torch.Tensor) -> torch.Tensor:
    """An id per row; rows with identical tokens (the model sees the same text) share it."""
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def pair_metrics(image_emb, text_emb, tokens, logit_scale: float) -> dict[str, float]:
    return {**retrieval_recall(image_emb, text_emb, caption_groups(tokens)),
            "clip_loss": clip_loss(image_emb, text_emb, logit_scale)}
