"""Normalizer estimation error: how far each method's estimate of log(ε + g(i, S)) is from the truth.

NeuCLIP (Wei, Lin & Yang, ICLR 2026) §5.2 "Estimation Error of Normalizers", Figures 2c and 4: the mean
squared error between the logarithms of the predicted and the true normalizers, along training.

What is measured, with the current encoders and temperatures:

* Reference set S_ref (`reference_set`): the first R training samples by key (R = --est-err-samples), fixed
  for the whole run. It comes from the training set because per-sample estimators (FastCLIP's u) exist only
  for training keys. Images go through the evaluation transform (no augmentation).
* Truth (`true_log_normalizers`): t_i = log(ε + g(i, S_ref)), g(i, S_ref) = 1/(R−1) Σ_{j≠i} exp((s_ij − s_ii)·λ_i)
  for every image anchor (rows of s) and text anchor (columns), in fp32, tile by tile with a running
  log-sum-exp: memory O(block²) whatever R, so R = 10⁵ fits on a CPU. (For a sample of anchors against a much larger set,
  n up to 10⁶: `training.eval.exact_normalizers.anchor_log_normalizers`.) S_ref stands in for the whole training
  set S: g(i, S_ref) is itself an average over R − 1 negatives, whose variance is about N/R times that of a
  global batch's average (N = global batch size), so keep R ≫ N.
* Estimate (`method_log_normalizers`): a_i from `method.log_normalizers(feats)`, the same call for every
  method, where `feats` holds one global batch of S_ref. S_ref, in a fixed random order (the same for every
  run), is cut into chunks of the training global batch size N: a mini-batch estimate depends on the batch an
  anchor is in, and this is what every method sees in training. When N does not divide R, the last chunk is
  the last N samples of that order (overlapping the one before) and scores only its new anchors, so every
  anchor is estimated once, always from a batch of N. Estimators keyed by sample (FastCLIP's moving average)
  or by embedding (NeuCLIP's and AmorLIP's networks) give the same a_i in any chunk.
  Methods without an estimate of their own (`log_normalizers` returns None: OpenCLIP's ClipLoss, SigLIP) are
  scored with the mini-batch estimate log(ε + g(i, B)) from `core.batch_log_normalizers` on the same chunks:
  OpenCLIP's InfoNCE normalises each anchor by exactly its mini-batch sum, so that is OpenCLIP's estimator.
* Result: est_err/image = mean_i (a_i − t_i)² over image anchors, est_err/text likewise, est_err/mean their
  mean; est_bias/{image,text} = mean_i (a_i − t_i) separates a systematic offset (the mini-batch estimate's
  Jensen gap E[log ĝ] < log E[ĝ], stale moving averages) from noise.
  λ_i comes from the method's temperature scheme when it has one (FastCLIP-v2's per-sample τ_i), else from the
  model's logit_scale; ε is the method's (--fastclip_eps for methods without one).

Distributed: nothing here enters a collective (chunks are `Features.precomputed`, a world-size-1 view), so it
runs on rank 0 alone; `log_estimation_error` and `EstimationErrorMonitor` do nothing on the other ranks, which
wait at their next collective while rank 0 measures.

In training (the loop, after each optimizer step and `state.step += 1`):

    diagnostics = EstimationErrorMonitor.from_args(args, preprocess_val, tokenizer, device, tb, run_dir)  # main
    diagnostics.after_step(raw_model, method, step=state.step, epoch=epoch + (i + 1) / steps_this_epoch,
                           epoch_end=last)                                                              # loop

Standalone, on a run folder's checkpoint (rebuilds the method from params.txt and restores its state):

    PYTHONPATH=src python -m training.eval.diagnostics --train_output_dir logs/NAME [--epoch N | --iter N]
        [--samples R] [--chunk_size N] [--train_data PATTERN] [--device cpu] [--precision fp32]

writes eval_results/{epoch_N|iter_N}_estimation_error.json and prints the errors.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from contrastive import Features, core
from contrastive.features import fp32

from training.batching import global_batch
from training.data.loader import SAMPLE_MEMBERS, CsvCaptions, ShardSampleDecoder, resolve_dataset_type
from training.data.checks import KeyRangeCheck, SkipLog, UnusableSample, expand_shard_urls, tarfile_to_samples
from training.distributed import unwrap
from training.eval.evaluation import EvalSettings, encode_images, encode_texts, eval_mode
from training.data.synthetic.samples import SyntheticCaptions

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 2048
#: Tile side of the true log-normalizers: a tile is BLOCK² fp32 values (64 MiB at 4096).
BLOCK = 4096
#: The order in which the reference set is cut into global batches: one seed for every run, so that
#: runs of different methods and seeds are scored on the same batches.
CHUNK_SEED = 0
#: Images beyond this many bytes make the reference set worth a warning (it stays in host memory).
LARGE_REFERENCE_BYTES = 4 * 2**30
METRIC_KEYS = ("est_err/image", "est_err/text", "est_err/mean")


# ------------------------------------------------------------------------------------- reference set

@dataclass
class ReferenceSet:
    """The fixed samples the estimation error is measured on, sorted by key."""
    images: torch.Tensor  # [R, 3, H, W]: the evaluation transform's output
    tokens: torch.Tensor  # [R, context]
    keys: torch.Tensor    # [R] int64, ascending, distinct

    def __post_init__(self):
        if not self.images.shape[0] == self.tokens.shape[0] == self.keys.shape[0]:
            raise ValueError(f"reference set: {self.images.shape[0]} images, {self.tokens.shape[0]} texts, "
                             f"{self.keys.shape[0]} keys")

    def __len__(self) -> int:
        return self.keys.shape[0]


def reference_set(args, preprocess_val, tokenizer, size: int | None = None) -> ReferenceSet:
    """The first `size` (default --est-err-samples) usable training samples by key: keys 0..R−1 of the built-in
    synthetic set, the first rows of a CSV, or the first samples of the first shards in --train-data's order
    (sorted by key afterwards). Fewer when the training set is smaller (with a warning)."""
    size = args.est_err_samples if size is None else size
    if size < 2:
        raise ValueError(f"--est-err-samples {size}: the estimation error needs at least 2 reference samples")
    kind = training_data_kind(args)
    if kind == "webdataset":
        samples = _shard_samples(args, preprocess_val, tokenizer)
    elif kind == "csv":
        samples = _map_style_samples(CsvCaptions(args.train_data, args.csv_img_key, args.csv_caption_key,
                                                 args.csv_separator, preprocess_val, tokenizer))
    else:
        samples = _map_style_samples(SyntheticCaptions(args.synthetic_num_samples, seed=args.synthetic_seed,
                                                       transform=preprocess_val, tokenizer=tokenizer))
    images, tokens, keys = [], [], {}
    for image, text, key in samples:
        if key in keys:
            continue  # a key repeated in the data (joined shard lists) names one per-sample state: first wins
        keys[key] = len(images)
        images.append(image)
        tokens.append(text)
        if len(images) == size:
            break
    if len(images) < 2:
        raise ValueError(f"the training data yielded {len(images)} usable sample(s); the estimation error "
                         "needs at least 2")
    if len(images) < size:
        log.warning("estimation error: the training data has only %d usable samples; the reference set "
                    "holds them all (--est-err-samples %d)", len(images), size)
    by_key = sorted(keys.items())  # (key, position)
    reference = ReferenceSet(torch.stack([images[i] for _, i in by_key]), torch.stack([tokens[i] for _, i in by_key]),
                             torch.tensor([key for key, _ in by_key], dtype=torch.int64))
    if reference.images.nbytes > LARGE_REFERENCE_BYTES:
        log.warning("estimation error: the reference set's images take %.1f GiB of host memory; lower "
                    "--est-err-samples if that is too much", reference.images.nbytes / 2**30)
    return reference


def training_data_kind(args) -> str:
    """"synthetic", "webdataset" or "csv": what the training set is."""
    if args.dataset_type == "synthetic" or args.train_data is None:
        return "synthetic"
    return resolve_dataset_type(args.train_data, args.dataset_type, "--train-data")


def _map_style_samples(dataset) -> Iterator[tuple]:
    """(image, tokens, key) in index order; unusable items are logged and skipped."""
    skip_log = SkipLog("reference")
    for index in range(len(dataset)):
        try:
            yield dataset[index]
        except UnusableSample as exn:
            skip_log.handle(exn)


def _shard_samples(args, preprocess_val, tokenizer) -> Iterator[tuple]:
    """(image, tokens, key) of --train-data's shards, in their listed order (no shuffling, one process)."""
    skip_log = SkipLog("reference")
    decode = ShardSampleDecoder(preprocess_val, tokenizer, KeyRangeCheck(None))
    urls = expand_shard_urls(args.train_data, "--train-data")
    for sample in tarfile_to_samples(({"url": url} for url in urls), skip_log, SAMPLE_MEMBERS):
        try:
            yield decode(sample)
        except UnusableSample as exn:
            skip_log.handle(exn)


# ----------------------------------------------------------------------------------------- the maths

def true_log_normalizers(image: torch.Tensor, text: torch.Tensor, scale_img: torch.Tensor,
                         scale_txt: torch.Tensor, eps: float, block: int = BLOCK
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """log(ε + g(i, S)) over the whole set S of pairs (image_i, text_i), for every image anchor (against all
    texts) and text anchor (against all images): `core.batch_log_normalizers` of the full similarity matrix,
    computed tile by tile (block × block) with a running log-sum-exp, in fp32 without gradient.

    `scale_*`: λ = 1/τ, a scalar or one value per anchor. Rows of `image` and `text` are L2-normalised.
    """
    with torch.no_grad():
        image, text = fp32(image.detach()), fp32(text.detach())
        return (_log_normalizers(image, text, fp32(scale_img.detach()), eps, block),
                _log_normalizers(text, image, fp32(scale_txt.detach()), eps, block))


def _log_normalizers(anchors: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor, eps: float,
                     block: int) -> torch.Tensor:
    """Row i: log(ε + 1/(n−1) Σ_{j≠i} exp((a_i·c_j − a_i·c_i)·λ_i)), tile by tile."""
    n = anchors.shape[0]
    if n < 2:
        raise ValueError(f"log-normalizers need at least 2 pairs, got {n}")
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    positive = (anchors * columns).sum(-1)
    log_g = torch.empty(n, dtype=anchors.dtype, device=anchors.device)
    for r0 in range(0, n, block):
        rows = slice(r0, min(r0 + block, n))
        lam = scale if scale.dim() == 0 else scale[rows, None]
        running = torch.full((rows.stop - r0,), -math.inf, dtype=anchors.dtype, device=anchors.device)
        for c0 in range(0, n, block):
            logits = (anchors[rows] @ columns[c0:c0 + block].T - positive[rows, None]) * lam
            # row i's positive is column r0 + i, i.e. column r0 + i − c0 of this tile (absent if outside)
            running = torch.logaddexp(running, core._logsumexp_without_positive(logits, r0 - c0))
        log_g[rows] = running
    return core.log_eps_plus_exp(log_g - math.log(n - 1), eps)


def reference_chunks(n: int, batch_size: int, seed: int = CHUNK_SEED) -> list[tuple[torch.Tensor, slice]]:
    """The reference set cut into global batches: [(rows, scored)], `rows` the batch's indices (a fixed random
    order of 0..n−1, cut into pieces of `batch_size`), `scored` the positions within it whose anchors take their
    estimate from this batch. When `batch_size` does not divide n, the last batch is the last `batch_size`
    indices of the order and scores only those no earlier batch held; with batch_size ≥ n there is one batch.
    Every index is scored exactly once, always in a batch of min(batch_size, n)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if batch_size >= n:
        return [(order, slice(None))]
    chunks = []
    for start in range(0, n, batch_size):
        stop = start + batch_size
        if stop <= n:
            chunks.append((order[start:stop], slice(None)))
        else:
            chunks.append((order[n - batch_size:], slice(stop - n, None)))
    return chunks


def anchor_inverse_temperatures(method, feats: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """λ = 1/τ of the anchors of `feats` (images, texts), detached fp32, as the method says
    (`ContrastiveMethod.inverse_temperatures`: FastCLIP-v2's per-sample τ_i by key, else the logit scale)."""
    scale_img, scale_txt = method.inverse_temperatures(feats)
    return fp32(scale_img.detach()), fp32(scale_txt.detach())


def method_eps(method, args) -> float:
    """The ε the method adds to every normalizer (`ContrastiveMethod.eps`; --fastclip_eps for methods without one)."""
    return float(args.fastclip_eps if method.eps is None else method.eps)


@torch.no_grad()
def method_log_normalizers(method, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                           keys: torch.Tensor, batch_size: int, eps: float, *, step: int = 0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's estimates a_i of every reference anchor's log-normalizer ([n] each, fp32), one
    `method.log_normalizers` call per global batch of `reference_chunks`; the mini-batch estimate for methods
    that return None. No state of the method changes."""
    n = image.shape[0]
    estimates = torch.empty(2, n, dtype=torch.float32, device=image.device)
    for rows, scored in reference_chunks(n, batch_size):
        rows = rows.to(image.device)
        feats = Features.precomputed(image[rows], text[rows], logit_scale, keys[rows], step=step)
        estimate = method.log_normalizers(feats)
        if estimate is None:  # OpenCLIP, SigLIP: the mini-batch normalizers of this batch
            scale_img, scale_txt = anchor_inverse_temperatures(method, feats)
            estimate = core.batch_log_normalizers(core.similarity(feats), scale_img, scale_txt, eps)
        for side, a in enumerate(estimate):
            estimates[side, rows[scored]] = fp32(a.detach()).reshape(-1)[scored].to(estimates.device)
    return estimates[0], estimates[1]


def error_metrics(est_img: torch.Tensor, est_txt: torch.Tensor, truth_img: torch.Tensor,
                  truth_txt: torch.Tensor) -> dict[str, float]:
    """est_err/{image,text,mean}: mean squared error of the logs; est_bias/{image,text}: mean error."""
    diff_img = est_img.double() - truth_img.double()
    diff_txt = est_txt.double() - truth_txt.double()
    err_img, err_txt = diff_img.square().mean().item(), diff_txt.square().mean().item()
    return {"est_err/image": err_img, "est_err/text": err_txt, "est_err/mean": 0.5 * (err_img + err_txt),
            "est_bias/image": diff_img.mean().item(), "est_bias/text": diff_txt.mean().item()}


@torch.no_grad()
def encode_reference(model, reference: ReferenceSet, settings: EvalSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised fp32 embeddings of the reference images and texts, in eval mode."""
    with eval_mode(model):
        batches = (reference.images[s:s + settings.batch_size]
                   for s in range(0, len(reference), settings.batch_size))
        return encode_images(model, batches, settings), encode_texts(model, reference.tokens, settings)


def estimation_error(model, method, reference: ReferenceSet, args, device, *, step: int = 0,
                     batch_size: int | None = None) -> dict[str, float]:
    """est_err/{image,text,mean} (and est_bias/{image,text}) of `method` with `model`'s current encoders on
    `reference`, its anchors' mini-batch-dependent estimates taken on batches of `batch_size` (default: the
    training global batch, --batch-size × world size). Collective-free; changes no state."""
    raw = unwrap(model)
    device = torch.device(device)
    settings = EvalSettings(device, args.precision, args.batch_size)
    image, text = encode_reference(raw, reference, settings)
    logit_scale = raw.logit_scale.detach().float().exp()
    keys = reference.keys.to(device)
    eps = method_eps(method, args)
    scale_img, scale_txt = anchor_inverse_temperatures(
        method, Features.precomputed(image, text, logit_scale, keys, step=step))
    truth_img, truth_txt = true_log_normalizers(image, text, scale_img, scale_txt, eps)
    est_img, est_txt = method_log_normalizers(method, image, text, logit_scale, keys,
                                              batch_size or global_batch(args), eps, step=step)
    return error_metrics(est_img, est_txt, truth_img, truth_txt)


# ----------------------------------------------------------------------------------------- in training

def log_estimation_error(model, method, reference: ReferenceSet | None, args, device, *, step: int,
                         epoch: float, tb=None, run_dir: str | None = None) -> dict:
    """Measure now and report: out.log, TensorBoard diag/est_err/... at `step`, and a line of
    checkpoints/results.jsonl {"step", "epoch" (epochs completed, fractional mid-epoch), "samples_seen",
    metrics, "est_err_samples" (R), "est_err_batch" (N)}. Rank 0 only (it needs no other rank): returns {} and
    does nothing on other ranks or when `reference` is None."""
    if reference is None or not getattr(args, "is_master", True):
        return {}
    start = time.perf_counter()
    chunk = global_batch(args)
    metrics = estimation_error(model, method, reference, args, device, step=step, batch_size=chunk)
    log.info("Estimation error at step %d (epoch %.2f; %d reference samples, batches of %d, %.1f s): %s",
             step, epoch, len(reference), chunk, time.perf_counter() - start,
             " ".join(f"{k}: {v:.5g}" for k, v in metrics.items()))
    if tb is not None:
        tb.scalars("diag", metrics, step)
    record = {"step": step, "epoch": epoch, "samples_seen": step * chunk, **metrics,
              "est_err_samples": len(reference), "est_err_batch": chunk}
    if run_dir is not None:
        append_result(run_dir, record)
    return record


def append_result(run_dir: str, record: dict) -> None:
    """One JSON line in run_dir/checkpoints/results.jsonl (where evaluation.evaluate writes its lines)."""
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    with open(os.path.join(run_dir, "checkpoints", "results.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class EstimationErrorMonitor:
    """What the training loop calls after every step: measures every --est-err-every steps and at the end of
    every epoch, on rank 0 (it alone builds the reference set); a no-op when --est-err-every is 0 and on the
    other ranks."""

    def __init__(self, every: int, reference: ReferenceSet | None, args, device, tb=None,
                 run_dir: str | None = None):
        if every < 0:
            raise ValueError(f"--est-err-every {every}: give a number of steps, or 0 for off")
        self.every, self.reference, self.args, self.device = every, reference, args, device
        self.tb, self.run_dir = tb, run_dir

    @classmethod
    def from_args(cls, args, preprocess_val, tokenizer, device, tb=None, run_dir: str | None = None
                  ) -> "EstimationErrorMonitor":
        """Checks the flags (every rank) and builds the reference set (rank 0, when on) before training."""
        every = getattr(args, "est_err_every", 0)
        samples = getattr(args, "est_err_samples", DEFAULT_SAMPLES)
        if every and samples < 2:
            raise ValueError(f"--est-err-samples {samples}: the estimation error needs at least 2 samples")
        reference = None
        if every > 0 and getattr(args, "is_master", True):
            start = time.perf_counter()
            reference = reference_set(args, preprocess_val, tokenizer, samples)
            log.info("Estimation error every %d steps and at epoch ends on %d reference samples (keys %d..%d), "
                     "batches of %d (built in %.1f s)", every, len(reference), int(reference.keys[0]),
                     int(reference.keys[-1]), global_batch(args), time.perf_counter() - start)
            if len(reference) <= global_batch(args):
                log.warning("estimation error: %d reference samples do not exceed the global batch (%d): the "
                            "truth is then no better than one batch; raise --est-err-samples",
                            len(reference), global_batch(args))
        return cls(every, reference, args, device, tb, run_dir)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def due(self, step: int, epoch_end: bool = False) -> bool:
        return self.enabled and (epoch_end or step % self.every == 0)

    def after_step(self, model, method, *, step: int, epoch: float, epoch_end: bool = False) -> dict:
        """`step`: optimizer steps done; `epoch`: epochs completed (fractional); `epoch_end`: the epoch's last
        step. Returns the logged record, or {} when not due or not rank 0."""
        if not self.due(step, epoch_end):
            return {}
        return log_estimation_error(model, method, self.reference, self.args, self.device, step=step,
                                    epoch=epoch, tb=self.tb, run_dir=self.run_dir)
