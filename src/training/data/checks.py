"""Everything about bad input to the data pipelines of `training.data.loader`.

Two kinds of problems, two policies:

* configuration mistakes (missing shards, too few shards for the readers, keys that do not fit the
  per-sample state, missing CSV columns) raise at once, with the fix in the message: a run on a
  misconfigured pipeline either hangs or quietly trains on the wrong thing;
* damaged data (corrupt or truncated shards, undecodable images, missing captions) is skipped, logged
  and counted: one bad file among millions must not stop a run, nor go unnoticed.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import tarfile

import braceexpand
from torch.utils.data import Dataset
from webdataset.tariterators import base_plus_ext, url_opener

from training.errors import UserError

logger = logging.getLogger("training.data")

_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+:")  # "pipe:", "s3://", "https://", ...


class DataConfigError(UserError):
    """A mistake in the data configuration. Never swallowed by the skip-and-count handlers."""


class MissingData(DataConfigError, FileNotFoundError):
    """A data path that does not exist (a FileNotFoundError too, as it was before)."""


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
            logger.warning("%s data: skipped unusable data (%d skips so far in this process): %s",
                           self.split, self.total, describe(exn))
        elif self.total & (self.total - 1) == 0:
            logger.warning("%s data: %d skips of unusable data so far in this process (latest: %s)",
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


# ------------------------------------------------------------------------------ start-up checks

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
        raise MissingData(f"{flag}: {len(missing)} of {len(urls)} expanded shards do not exist "
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
        raise MissingData(f"{csv_path}: none of the first {len(sample)} image paths exist "
                                f"(e.g. {sample[0]!r}); paths are read relative to the current directory "
                                f"({os.getcwd()}), so run from there or write absolute paths")


def open_csv(path: str, flag: str):
    """The CSV opened for reading; a missing, unreadable or non-file path is the user's mistake."""
    if not os.path.exists(path):
        raise MissingData(f"{flag} {path}: no such file (paths are relative to {os.getcwd()})")
    if not os.path.isfile(path):
        raise DataConfigError(f"{flag} {path}: not a file; give a CSV/TSV file with one row per image")
    try:
        return open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc


def check_csv(path: str, img_key: str, caption_key: str, separator: str, flag: str, probe: int = 8) -> int:
    """Start-up check of a CSV/TSV data file without loading it: the header names both columns and the
    first rows' images exist. Returns the number of rows, counted as lines (a caption with a line break
    inside quotes counts twice: never fewer than the rows)."""
    with open_csv(path, flag) as f:
        try:
            rows = csv.reader(f, delimiter=separator)
            header = next(rows, None)
            if header is None:
                raise DataConfigError(f"{flag} {path}: the file is empty; it needs a header row naming "
                                      f"--csv-img-key {img_key!r} and --csv-caption-key {caption_key!r}")
            columns = column_indices(header, {"--csv-img-key": img_key, "--csv-caption-key": caption_key},
                                     f"{flag} {path}")
            first = [row[columns["--csv-img-key"]] for _, row in zip(range(probe), rows)
                     if len(row) > columns["--csv-img-key"]]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataConfigError(f"{flag} {path}: not a UTF-8 CSV/TSV file ({exc})") from exc
    check_images_reachable(first, f"{flag} {path}")
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines, last = lines + block.count(b"\n"), block[-1:]
    return lines + (last != b"\n") - 1  # minus the header


# ---------------------------------------------------------------------------------- sample keys

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

def as_key(value, where: str) -> int:
    # img2dataset writes keys as zero-padded digit strings ("000012345")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise DataConfigError(f"{where}: sample key {value!r} is not an integer; add a .json with an integer "
                          "'key' field to every sample (img2dataset writes one), or name samples by number")


def shard_sample_key(sample: dict, where: str) -> int:
    """The .json member's "key" (img2dataset layout), else the sample's numeric name in the tar."""
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as exn:
            raise UnusableSample(f"{where}: unreadable .json: {exn}") from exn
        if isinstance(meta, dict) and "key" in meta:
            return as_key(meta["key"], where)
    return as_key(sample["__key__"], where)


# ------------------------------------------------------------------------------- damaged shards

class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped reading headers: it ends iteration quietly on a damaged or missing
    header just as on the end-of-archive marker, so a shard cut at a 512-byte boundary looks complete."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as exn:
            archive.last_header_error = exn
            raise


def iter_tar_members(fileobj):
    """(name, bytes) of every regular file of a tar stream; raises on damage, including a missing end."""
    with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndRecordingTarInfo) as archive:
        for info in archive:
            if info.isreg():
                yield info.name, archive.extractfile(info).read()
            archive.members = []  # stream mode keeps every header otherwise: memory would grow per shard
        end = getattr(archive, "last_header_error", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            raise tarfile.ReadError(f"archive ends without its end-of-archive marker ({end}): truncated or damaged")


def read_tar_members(streams, skip_log: SkipLog):
    """Opened shards -> tar members; a read error skips (and counts, once) the rest of that shard."""
    for source in streams:
        url, stream = source["url"], source["stream"]
        try:
            for name, data in iter_tar_members(stream):
                yield {"fname": name, "data": data, "__url__": url}
        except Exception as exn:
            skip_log.handle(UnusableSample(f"shard {url} is damaged, skipping the rest of it: {describe(exn)}"))
        finally:
            stream.close()
        yield {}  # end-of-shard marker, as webdataset's tar_file_expander yields it


def group_by_keys(files, handler, keep: frozenset[str]):
    """Groups a shard's members into samples by file-name prefix.

    Tolerates webdataset's end-of-shard marker (an empty dict, which some versions of this function
    choke on with KeyError: 'fname'), and starts a new sample when the shard changes, so the tail of a
    truncated shard is never merged into the next shard's first sample.
    """
    current = None
    for member in files:
        if "fname" not in member:
            if current is not None:
                yield current
            current = None
            continue
        prefix, suffix = base_plus_ext(member["fname"])
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"] or member["__url__"] != current["__url__"]:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": member["__url__"]}
        if suffix in current:
            if handler(UnusableSample(f"{member['__url__']}: duplicate member {member['fname']}")):
                continue
            return
        if suffix in keep:
            current[suffix] = member["data"]
    if current is not None:
        yield current


def tarfile_to_samples(shards, skip_log: SkipLog, keep: frozenset[str]):
    """{"url": ...} dicts -> samples holding the `keep` members; damaged shards and members are skipped
    and counted."""
    streams = url_opener(shards, handler=skip_log.handle)
    return group_by_keys(read_tar_members(streams, skip_log), skip_log.handle, keep)


# --------------------------------------------------------- damaged items of map-style data sets

class SkipUnreadable(Dataset):
    """Wraps a map-style dataset of (image, tokens, key) items. An item that fails to load is logged,
    counted and replaced by another, pseudo-randomly chosen item, so batches stay full (constant shapes
    matter for DDP all-gathers); that replacement is seen twice in the epoch. Yields
    (image, tokens, key, items_skipped_before_it)."""

    MAX_ATTEMPTS = 16

    def __init__(self, dataset: Dataset, check_key: KeyRangeCheck, split: str):
        self.dataset, self.check_key, self.skip_log = dataset, check_key, SkipLog(split)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        for attempt in range(self.MAX_ATTEMPTS):
            try:
                image, tokens, key = self.dataset[idx]
            except DataConfigError:
                raise
            except Exception as exn:
                self.skip_log.handle(exn)
                # str seeds are hashed: replacement picks look random, yet repeat run to run
                idx = random.Random(f"replacement/{idx}/{attempt}").randrange(len(self.dataset))
                continue
            self.check_key(key, f"item {idx}")
            return image, tokens, key, attempt
        raise DataConfigError(f"{self.MAX_ATTEMPTS} items in a row could not be loaded (see the warnings "
                              "above); the data set looks broken rather than damaged: check its paths")
