"""Start-up checks of flags and data that would otherwise fail (or silently mistrain) mid-run."""
from __future__ import annotations

import os
import re
import tarfile

from webdataset.tariterators import base_plus_ext

from training.batching import global_batch
from training.data.checks import (DataConfigError, KeyRangeCheck, UnusableSample, expand_shard_urls,
                                  per_sample_state_size, shard_sample_key)
from training.checkpoint.resume_checks import reads_shards
from training.errors import UserError


def check_global_batch(args) -> None:
    """Every loss here contrasts a pair against the other pairs of the global batch: with one sample there
    is no negative (OpenCLIP's loss is 0, FastCLIP/NeuCLIP take log(B - 1) = log 0). Under --accum-freq k
    the losses contrast the whole step's k micro-batches (training.batching), so k >= 2 has negatives."""
    batch = global_batch(args)
    if batch < 2:
        raise UserError(f"--batch-size {args.batch_size} on {args.world_size} process(es) is a global batch of "
                         f"{batch}: contrastive losses need at least one negative pair; use --batch-size 2 "
                         "or more")


SCAN_SAMPLES = 1000  # per part of --train-data: enough to see a key layout, cheap on any file system


def first_shard_keys(url: str, limit: int = SCAN_SAMPLES) -> list[tuple[int, str]]:
    """(key, where) of the first `limit` samples of a local shard, reading only the tar headers and the
    small .json members (image bytes are seeked over). Damaged shards give what could be read: the data
    pipeline skips and counts them later."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(url) as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, ext = base_plus_ext(info.name)
                if prefix is None:
                    continue
                if prefix not in samples and len(samples) >= limit:
                    break
                sample = samples.setdefault(prefix, {"__key__": prefix})
                if ext and ext.lower() == "json":
                    sample["json"] = tar.extractfile(info).read()
    except (OSError, tarfile.TarError):
        pass
    keys = []
    for prefix, sample in samples.items():
        where = f"sample {prefix!r} of shard {url}"
        try:
            keys.append((shard_sample_key(sample, where), where))
        except UnusableSample:  # an unreadable .json: that sample is skipped and counted in training
            continue
    return keys


def check_shard_keys(args) -> None:
    """At start-up rather than mid-epoch: sample keys that are not integers or do not fit --data_size, and
    keys shared by two data sets joined with `::` (two samples would share one per-sample u/τ slot).
    Reads the first samples of each part's first local shard: a collision found there is certain; keys
    further in are still checked as they are read."""
    if not reads_shards(args):
        return
    parts = [part.strip() for part in args.train_data.split("::") if part.strip()]
    check = KeyRangeCheck(per_sample_state_size(args.uses_per_sample_state, args.data_size)
                          if args.uses_per_sample_state else None)
    seen: dict[int, tuple[int, str]] = {}
    for number, part in enumerate(parts, 1):
        urls = expand_shard_urls(part, "--train-data")
        first = urls[0]
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", first) or not os.path.isfile(first):
            continue  # remote, or missing (reported with the other missing shards)
        for key, where in first_shard_keys(first):
            check(key, where)
            other = seen.get(key)
            if other is not None and other[0] != number and args.uses_per_sample_state:
                raise DataConfigError(
                    f"--train-data parts {other[0]} and {number} (joined with '::') both hold sample key {key} "
                    f"({other[1]}; {where}): per-sample state is indexed by key, so two samples would share one "
                    "slot; make the keys of the data sets disjoint (e.g. add an offset to one set's .json "
                    "'key' fields) and set --data_size to the largest key + 1")
            seen.setdefault(key, (number, where))
