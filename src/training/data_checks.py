"""Start-up checks and per-sample error accounting for the data pipelines (`training.data`).

Two kinds of problems, two policies:

* configuration mistakes (missing shards, too few shards for the readers, keys that do not fit the
  per-sample state) raise at once, with the fix in the message: a run on a misconfigured pipeline
  either hangs or quietly trains on the wrong thing;
* damaged samples (corrupt tar members, truncated shards, undecodable images, missing captions) are
  skipped, logged and counted: one bad file among millions must not stop a run, nor go unnoticed.
"""
from __future__ import annotations

import logging
import os
import re

import braceexpand

logger = logging.getLogger("training.data")

_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # "pipe:", "s3://", "https://", ...


class DataConfigError(ValueError):
    """A mistake in the data configuration. Never swallowed by the skip-and-count handlers."""


class UnusableSample(ValueError):
    """A sample that cannot be trained on (no image, no caption, undecodable bytes): skipped and counted."""


class SkipLog:
    """Counts the samples skipped in one process and logs them: the first few in full, then summaries
    at log-spaced counts (8, 16, 32, ...), so a steady trickle of bad data stays visible without
    flooding the log."""

    FULL_REPORTS = 5

    def __init__(self, split: str):
        self.split = split
        self.total = 0
        self.pending = 0  # skipped since the last batch left this process; see take_pending

    def handle(self, exn: Exception) -> bool:
        """webdataset-style handler: True means "skip the sample and go on"."""
        if isinstance(exn, DataConfigError):
            raise exn
        self.total += 1
        self.pending += 1
        if self.total <= self.FULL_REPORTS:
            logger.warning("%s data: skipped an unusable sample (%d so far in this process): %s",
                           self.split, self.total, describe(exn))
        elif self.total & (self.total - 1) == 0:
            logger.warning("%s data: %d unusable samples skipped so far in this process (latest: %s)",
                           self.split, self.total, describe(exn))
        return True

    def take_pending(self) -> int:
        """The count to attach to the next batch: each skip is reported exactly once."""
        count, self.pending = self.pending, 0
        return count


def describe(exn: BaseException, limit: int = 400) -> str:
    # webdataset appends stream objects and urls to exception args, which can get long.
    text = f"{type(exn).__name__}: {exn}"
    return text if len(text) <= limit else text[:limit] + " ..."


# ----------------------------------------------------------------------------- shards

def expand_shard_urls(pattern: str, flag: str) -> list[str]:
    """'a/{00000..00099}.tar::b/{0..9}.tar' -> the list of shard urls, in order."""
    urls = [url for part in pattern.split("::") if part.strip()
            for url in braceexpand.braceexpand(part.strip())]
    if not urls:
        raise DataConfigError(f"{flag} {pattern!r} names no shards; give a path or brace pattern "
                              "such as 'shards/{00000..00099}.tar'")
    return urls


def check_shards_exist(urls: list[str], flag: str) -> None:
    """Local shards only: urls with a scheme (pipe:, s3://, ...) are opened by webdataset as they come."""
    missing = [url for url in urls if not _URL_SCHEME.match(url) and not os.path.isfile(url)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{flag}: {len(missing)} of {len(urls)} expanded shards do not exist "
                                f"(first missing: {shown}); fix the path or the brace range in {flag}")


def check_enough_shards(num_shards: int, workers: int, world_size: int) -> None:
    """Without resampling every (rank, worker) reader needs a shard of its own, else it yields nothing,
    its rank takes fewer steps than the others and DDP waits for it forever."""
    readers = max(1, workers) * world_size
    if num_shards < readers:
        most_workers = num_shards // world_size
        fewer_workers = f"reduce --workers to {most_workers}, " if most_workers >= 1 else ""
        raise DataConfigError(
            f"--train-data has {num_shards} shards but --workers {workers} x world size {world_size} "
            f"= {readers} readers each need at least one, which would hang distributed training; "
            f"{fewer_workers}split the data into more shards, or use --dataset-resampled")


def require_train_num_samples(num_samples: int | None) -> int:
    if not num_samples or num_samples <= 0:
        raise DataConfigError(
            "--train-num-samples is required with webdataset shards: tar shards do not record their size "
            "and every rank must know the epoch length to take the same number of steps; set it to the "
            "number of samples in --train-data (img2dataset's *_stats.json 'successes', summed)")
    return num_samples


# -------------------------------------------------------------------------------- CSV

def column_indices(header: list[str], columns: dict[str, str], path: str) -> dict[str, int]:
    """{flag: column name} -> {flag: column index}, naming every missing column and what is there."""
    missing = [f"{flag} {name!r}" for flag, name in columns.items() if name not in header]
    if missing:
        raise DataConfigError(f"{path}: no column {', '.join(missing)}; the file has columns {header}. "
                              "Pass the right names, or the right --csv-separator if that list looks like "
                              "one merged column")
    return {flag: header.index(name) for flag, name in columns.items()}


def check_images_reachable(paths: list[str], csv_path: str, probe: int = 8) -> None:
    """One unreadable row is a damaged sample; the first rows all missing is a path problem."""
    sample = [p for p in paths[:probe] if p]
    if sample and not any(os.path.isfile(p) for p in sample):
        raise FileNotFoundError(f"{csv_path}: none of the first {len(sample)} image paths exist "
                                f"(e.g. {sample[0]!r}); paths are read relative to the current directory "
                                f"({os.getcwd()}), so run from there or write absolute paths")


# --------------------------------------------------------------------- per-sample state

def per_sample_state_size(uses_per_sample_state: bool, data_size: int | None) -> int | None:
    """The size of the key space the loss's per-sample state covers, or None when there is none."""
    if not uses_per_sample_state:
        return None
    if data_size is None or data_size <= 0:
        raise DataConfigError(f"this loss keeps per-sample state indexed by sample key, but --data_size is "
                              f"{data_size}; set --data_size to max key + 1 (the number of samples when keys "
                              "are 0..N-1)")
    return data_size


class KeyRangeCheck:
    """Rejects a key that cannot index the per-sample state, at the sample where it is seen."""

    def __init__(self, data_size: int | None):
        self.data_size = data_size

    def __call__(self, key: int, where: str) -> None:
        if self.data_size is not None and not 0 <= key < self.data_size:
            raise DataConfigError(
                f"sample key {key} ({where}) does not fit --data_size {self.data_size}: per-sample state "
                f"is indexed by key, so keys must lie in [0, {self.data_size}); set --data_size to "
                "max key + 1")
