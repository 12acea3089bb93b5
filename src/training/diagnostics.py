"""Normalizer estimation error: how far each method's estimate of log(ε + g(i, S)) is from the truth.

NeuCLIP (Wei, Lin & Yang, ICLR 2026) §5.2 "Estimation Error of Normalizers", Figures 2c and 4: the mean
squared error between the logarithms of the predicted and the true normalizers, along training.

What is measured, with the current encoders and temperatures:

* Reference set S_ref (`reference_set`): the first R training samples by key (R = --est-err-samples), fixed
  for the whole run. It comes from the training set because per-sample estimators (FastCLIP's u) exist only
  for training keys. Images go through the evaluation transform (no augmentation).
* Truth (`true_log_normalizers`): t_i = log(ε + g(i, S_ref)), g(i, S_ref) = 1/(R−1) Σ_{j≠i} exp((s_ij − s_ii)·λ_i)
  for every image anchor (rows of s) and text anchor (columns), in fp32, tile by tile with a running
  log-sum-exp: memory O(block²) whatever R, so R = 10⁵ fits on a CPU. S_ref stands in for the whole training
  set S; g(i, S_ref) is itself an average over R − 1 negatives, whose sampling error is about N/R times a
  global batch's (N = global batch size): keep R ≫ N.
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

    PYTHONPATH=src python -m training.diagnostics --train_output_dir logs/NAME [--epoch N | --iter N]
        [--samples R] [--chunk_size N] [--train_data PATTERN] [--device cpu] [--precision fp32]

writes eval_results/{epoch_N|iter_N}_estimation_error.json and prints the errors.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from contrastive import Features, build_method, core
from contrastive.features import fp32

from .distributed import unwrap
from .evaluation import EvalSettings, encode_images, encode_texts, eval_mode

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
        from .data import CsvCaptions  # noqa: PLC0415  (only this data type needs it)
        samples = _map_style_samples(CsvCaptions(args.train_data, args.csv_img_key, args.csv_caption_key,
                                                 args.csv_separator, preprocess_val, tokenizer))
    else:
        from .synthetic import SyntheticCaptions  # noqa: PLC0415
        samples = _map_style_samples(SyntheticCaptions(args.synthetic_num_samples, seed=args.synthetic_seed,
                                                       transform=preprocess_val, tokenizer=tokenizer))
    images, tokens, keys, seen = [], [], set(), 0
    for image, text, key in samples:
        if key in seen_keys(keys):
            continue  # a key repeated in the data (joined shard lists): it names one per-sample state
        keys.add(key)
        images.append(image)
        tokens.append(text)
        seen += 1
        if seen == size:
            break
    if seen < 2:
        raise ValueError(f"the training data yielded {seen} usable sample(s): the estimation error needs 2")
    if seen < size:
        log.warning("estimation error: the training data has only %d usable samples; the reference set "
                    "holds them all (--est-err-samples %d)", seen, size)
    order_keys = torch.tensor(list(keys), dtype=torch.int64)  # insertion order = images' order
    order = torch.argsort(order_keys)
    reference = ReferenceSet(torch.stack(images)[order], torch.stack(tokens)[order], order_keys[order])
    if reference.images.nbytes > LARGE_REFERENCE_BYTES:
        log.warning("estimation error: the reference set's images take %.1f GiB of host memory; lower "
                    "--est-err-samples if that is too much", reference.images.nbytes / 2**30)
    return reference


def seen_keys(keys: set) -> set:
    return keys


def training_data_kind(args) -> str:
    """"synthetic", "webdataset" or "csv": what the training set is."""
    if args.dataset_type == "synthetic" or args.train_data is None:
        return "synthetic"
    from .data import resolve_dataset_type  # noqa: PLC0415
    return resolve_dataset_type(args.train_data, args.dataset_type, "--train-data")


def _map_style_samples(dataset) -> Iterator[tuple]:
    """(image, tokens, key) in index order; unusable items are logged and skipped."""
    from .data_checks import SkipLog, UnusableSample  # noqa: PLC0415
    skip_log = SkipLog("reference")
    for index in range(len(dataset)):
        try:
            yield dataset[index]
        except UnusableSample as exn:
            skip_log.handle(exn)


def _shard_samples(args, preprocess_val, tokenizer) -> Iterator[tuple]:
    """(image, tokens, key) of --train-data's shards, in their listed order (no shuffling, one process)."""
    from .data import SAMPLE_MEMBERS, ShardSampleDecoder  # noqa: PLC0415
    from .data_checks import KeyRangeCheck, SkipLog, UnusableSample, expand_shard_urls, tarfile_to_samples  # noqa: PLC0415
    skip_log = SkipLog("reference")
    decode = ShardSampleDecoder(preprocess_val, tokenizer, KeyRangeCheck(None))
    urls = expand_shard_urls(args.train_data, "--train-data")
    for sample in tarfile_to_samples(({"url": url} for url in urls), skip_log, SAMPLE_MEMBERS):
        try:
            yield decode(sample)
        except UnusableSample as exn:
            skip_log.handle(exn)
