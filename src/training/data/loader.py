"""Data pipelines for CLIP training: webdataset shards, CSV files and the synthetic shapes data set.

    data = get_data(args, preprocess_train, preprocess_val, tokenizer, epoch=0)
    info = data["train"]
    info.set_epoch(epoch)
    for images, texts, keys in info.dataloader: ...

images: the preprocess output (float [b, 3, H, W]), or with `--input-pipeline fast` (the default) uint8 crops
[b, H, W, 3] that `DataInfo.images_to_device` normalises on the device (`.fast_images`; with `device`, JPEG
rows it decodes there: `.device_decode`); texts long [b, ctx] (tokenizer output), keys int64 [b]:
a stable id per sample (the .json "key" or numeric __key__ in shards, the 0-based row in a CSV), which
is what per-sample loss state is indexed by. Training batches always hold exactly --batch-size samples.

Resuming mid-epoch: `info.set_epoch(epoch, start_batch=k)` makes the next pass yield batches k, k+1, ...
of that epoch, the same batches and augmentations an uninterrupted run gets: every random choice is a
function of (seed, epoch, rank, worker) or of (seed, epoch, sample) (`training.data.position`), and the
DataLoader's worker seeds come from a generator reseeded per epoch, so creating an iterator never draws
from the global RNG. Map-style data sets skip consumed batches in the sampler; shard pipelines read and
drop them.

Damaged data is skipped, logged and counted inside the DataLoader workers (one count per damaged
sample, or per damaged shard tail). The counts travel as a 4th batch element (skips since that worker's
previous batch), which `DataInfo.dataloader` strips off and adds up into `DataInfo.skipped()`: no
shared memory, and it works with --workers 0. Start-up checks and damage handling: `training.data.checks`;
`DataInfo` and its loader: `training.data.info`.
"""
from __future__ import annotations

import csv
import math
import random
from itertools import islice

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from training.data.checks import (DataConfigError, KeyRangeCheck, SkipLog, SkipUnreadable, UnusableSample,
                                  check_enough_shards, check_images_reachable, check_shards_exist, column_indices,
                                  expand_shard_urls, open_csv, per_sample_state_size, require_train_num_samples,
                                  shard_sample_key, tarfile_to_samples)
from training.data.device_decode import stack_images, train_image_pipeline
from training.data.fast_images import ImagePipeline, decode_file_fully, decode_fully
from training.data.info import DataInfo, SharedEpoch, SkipCountingLoader
from training.data.position import PerSampleRandomness, ResumableSampler, SeededItems, stream_seed
from training.data.workers import ignore_stop_signals, worker_id

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SAMPLE_MEMBERS = frozenset(IMAGE_EXTENSIONS + ("txt", "json"))  # tar members worth keeping in memory
SHUFFLE_BUFFER = 5000  # samples; raw bytes, as the shuffle runs before decoding
SHUFFLE_INITIAL = 1000


# ------------------------------------------------------------------------------------- samples

def tokenize_one(tokenizer, caption: str) -> torch.Tensor:
    return tokenizer([caption])[0]


class ShardSampleDecoder:
    """Raw tar sample (bytes per extension) -> (image, tokens, key); raises UnusableSample to skip."""

    def __init__(self, transform, tokenizer, check_key: KeyRangeCheck,
                 randomness: PerSampleRandomness | None = None, open_image=decode_fully):
        self.transform, self.tokenizer, self.check_key = transform, tokenizer, check_key
        self.randomness, self.open_image = randomness, open_image  # open_image: bytes -> PIL image

    def __call__(self, sample: dict):
        where = f"sample {sample['__key__']!r} of shard {sample['__url__']}"
        key = shard_sample_key(sample, where)
        self.check_key(key, where)
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_ext is None:
            raise UnusableSample(f"{where}: no image (.{', .'.join(IMAGE_EXTENSIONS)})")
        if "txt" not in sample:
            raise UnusableSample(f"{where}: no caption (.txt)")
        try:
            image = self.open_image(sample[image_ext])
            caption = sample["txt"].decode("utf-8")
            # a lazily opened image (fast pipeline) is decoded inside the transform: its errors are the same
            image = self.transform(image) if self.randomness is None else self.randomness(key, self.transform, image)
        except Exception as exn:
            raise UnusableSample(f"{where}: cannot decode: {exn}") from exn
        return image, tokenize_one(self.tokenizer, caption), key


def stack_batch(images, texts, keys, newly_skipped: int):
    return (stack_images(images), torch.stack(texts), torch.tensor(keys, dtype=torch.int64),
            torch.tensor(newly_skipped, dtype=torch.int64))


class CollateWithSkipCount:
    """Batches (image, tokens, key) samples and attaches the skips since this worker's previous batch."""

    def __init__(self, skip_log: SkipLog):
        self.skip_log = skip_log

    def __call__(self, samples):
        images, texts, keys = zip(*samples)
        return stack_batch(images, texts, keys, self.skip_log.take_pending())


def collate_counted_samples(samples):
    """Batches the (image, tokens, key, skipped_before_it) items of SkipUnreadable."""
    images, texts, keys, skipped = zip(*samples)
    return stack_batch(images, texts, keys, sum(skipped))


# ---------------------------------------------------------------------------------- webdataset

def split_by_rank(shards, rank: int, world_size: int):
    # Instead of wds.split_by_node, which asks torch.distributed: this follows args.rank/world_size,
    # so it works before the process group exists and in single-process tests of multi-rank setups.
    return islice(shards, rank, None, world_size)


class EpochShuffledShards(wds.SimpleShardList):
    """The shard list, shuffled with seed + epoch. Identical on every rank and worker, so splitting it
    by rank and then by worker partitions it."""

    def __init__(self, urls: list[str], seed: int, shared_epoch: SharedEpoch, shuffle: bool):
        super().__init__(urls)
        self.base_seed, self.shared_epoch, self.shuffle = seed, shared_epoch, shuffle

    def __iter__(self):
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.base_seed + self.shared_epoch.get()).shuffle(urls)
        return iter([{"url": url} for url in urls])


def shard_weights(pattern: str, factors: str | None) -> list[float] | None:
    """open_clip's --train-data-upsampling-factors 'f1::f2': every shard of the i-th '::' source of
    --train-data is drawn with weight f_i (so a source's share of samples is f_i x its shard count)."""
    if not factors:
        return None
    sources = [part for part in pattern.split("::") if part.strip()]
    values = [float(f) for f in factors.split("::")]
    if len(values) != len(sources):
        raise DataConfigError(f"--train-data-upsampling-factors has {len(values)} factors for {len(sources)} "
                              "'::' sources of --train-data: give one per source")
    return [f for part, f in zip(sources, values) for _ in expand_shard_urls(part, "--train-data")]


class EpochResampledShards(IterableDataset):
    """Shards drawn with replacement, endlessly, from a stream seeded per (epoch, rank, worker).
    (wds.ResampledShards seeds from a per-object counter, which does not reproduce a given epoch.)"""

    def __init__(self, urls: list[str], seed: int, shared_epoch: SharedEpoch, rank: int,
                 weights: list[float] | None = None):
        self.urls, self.seed, self.shared_epoch, self.rank = urls, seed, shared_epoch, rank
        self.weights = weights  # --train-data-upsampling-factors, one per shard; None: uniform

    def __iter__(self):
        rng = random.Random(stream_seed("shards", self.seed, self.shared_epoch.get(), self.rank, worker_id()))
        while True:
            if self.weights is None:
                yield {"url": rng.choice(self.urls)}
            else:
                yield {"url": rng.choices(self.urls, weights=self.weights)[0]}


class EpochSeededShuffle(wds.PipelineStage):
    """wds.shuffle with a buffer seeded per (epoch, rank, worker), so an epoch's order is reproducible.
    The buffer holds at most one worker-epoch of samples: filling more would only delay the first batch
    (with resampling, whose stream never ends, it would read samples the epoch never uses)."""

    def __init__(self, seed: int, shared_epoch: SharedEpoch, rank: int, samples_per_worker: int):
        self.seed, self.shared_epoch, self.rank = seed, shared_epoch, rank
        self.bufsize = min(SHUFFLE_BUFFER, samples_per_worker)

    def run(self, samples):
        rng = random.Random(stream_seed("samples", self.seed, self.shared_epoch.get(), self.rank, worker_id()))
        return wds.shuffle(self.bufsize, min(SHUFFLE_INITIAL, self.bufsize), rng=rng)(samples)


def epoch_length(num_samples: int, batch_size: int, world_size: int, workers: int) -> tuple[int, int]:
    """(batches per rank, samples over all ranks) per epoch, the batch count rounded up to a multiple of
    the workers: with_epoch counts per worker, and every worker must yield the same number."""
    readers = max(1, workers)
    batches_per_worker = math.ceil(math.ceil(num_samples / (batch_size * world_size)) / readers)
    num_batches = batches_per_worker * readers
    return num_batches, num_batches * batch_size * world_size


class WithTrailingSkipCount(IterableDataset):
    """The pipeline's batches, then (None, None, None, n) if samples were skipped after the last batch,
    so that those skips (e.g. all of a worker's shards unreadable) are counted too."""

    def __init__(self, pipeline: wds.DataPipeline, skip_log: SkipLog):
        self.pipeline, self.skip_log = pipeline, skip_log

    def __iter__(self):
        yield from self.pipeline
        if self.skip_log.pending:
            yield None, None, None, torch.tensor(self.skip_log.take_pending())


def shard_pipeline(urls, args, images: ImagePipeline, tokenizer, shared_epoch, is_train, check_key, skip_log,
                   batches_per_worker: int | None):
    if is_train and args.dataset_resampled:
        stages = [EpochResampledShards(urls, args.seed, shared_epoch, args.rank,
                                       shard_weights(args.train_data, getattr(args, "train_data_upsampling_factors", None)))]
    else:
        stages = [EpochShuffledShards(urls, args.seed, shared_epoch, shuffle=is_train),
                  wds.pipelinefilter(split_by_rank)(rank=args.rank, world_size=args.world_size),
                  wds.split_by_worker]
    stages.append(wds.pipelinefilter(tarfile_to_samples)(skip_log=skip_log, keep=SAMPLE_MEMBERS))
    if is_train:
        stages.append(EpochSeededShuffle(args.seed, shared_epoch, args.rank, batches_per_worker * args.batch_size))
    stages += [
        wds.map(ShardSampleDecoder(images.transform, tokenizer, check_key,
                                   PerSampleRandomness(args.seed, shared_epoch) if is_train else None,
                                   images.open_bytes),
                handler=skip_log.handle),
        # training drops the partial last batch of each worker: constant batch shapes for all-gathers
        wds.batched(args.batch_size, collation_fn=CollateWithSkipCount(skip_log), partial=not is_train),
    ]
    return wds.DataPipeline(*stages)


def get_wds_data(args, is_train, images: ImagePipeline, tokenizer, shared_epoch, check_key) -> DataInfo:
    flag = "--train-data" if is_train else "--val-data"
    urls = expand_shard_urls(args.train_data if is_train else args.val_data, flag)
    check_shards_exist(urls, flag)
    if is_train:
        if not args.dataset_resampled:
            check_enough_shards(len(urls), args.workers, args.world_size)
        num_batches, num_samples = epoch_length(require_train_num_samples(args.train_num_samples),
                                                args.batch_size, args.world_size, args.workers)
        batches_per_worker = num_batches // max(1, args.workers)
    else:  # an estimate: validation keeps each worker's partial last batch
        num_samples = args.val_num_samples or None
        num_batches = math.ceil(num_samples / (args.batch_size * args.world_size)) if num_samples else None
        batches_per_worker = None
    skip_log = SkipLog("train" if is_train else "val")
    pipeline = shard_pipeline(urls, args, images, tokenizer, shared_epoch, is_train, check_key, skip_log,
                              batches_per_worker)
    if is_train:  # repeats (or cuts) each worker's stream to its share: all ranks take the same steps
        pipeline = pipeline.with_epoch(batches_per_worker)
    generator = torch.Generator()
    loader = DataLoader(WithTrailingSkipCount(pipeline, skip_log), batch_size=None, num_workers=args.workers,
                        persistent_workers=False, pin_memory=torch.cuda.is_available(), generator=generator,
                        worker_init_fn=ignore_stop_signals)
    return DataInfo(SkipCountingLoader(loader, num_batches, num_samples, exact=is_train), shared_epoch,
                    generator=generator, seed_parts=(args.seed, args.rank), images_to_device=images.to_device)


# ------------------------------------------------------------------------- map-style: CSV, synthetic

class CsvCaptions(Dataset):
    """Rows of a CSV/TSV file (image path + caption column); a row's key is its 0-based row number."""

    def __init__(self, path: str, img_key: str, caption_key: str, separator: str, transform, tokenizer,
                 flag: str = "--train-data", open_image=decode_file_fully):
        self.path, self.transform, self.tokenizer = path, transform, tokenizer
        self.open_image = open_image  # path -> PIL image (decoded, or opened lazily for the fast pipeline)
        with open_csv(path, flag) as f:
            rows = csv.reader(f, delimiter=separator)
            header = next(rows, [])
            columns = column_indices(header, {"--csv-img-key": img_key, "--csv-caption-key": caption_key}, path)
            image_col, caption_col = columns["--csv-img-key"], columns["--csv-caption-key"]
            # short (malformed) rows are kept as empty fields: they are skipped, and counted, when loaded
            self.rows = [(field(row, image_col), field(row, caption_col)) for row in rows]
        check_images_reachable([image for image, _ in self.rows], path)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int):
        image_path, caption = self.rows[idx]
        where = f"{self.path} row {idx} ({image_path!r})"
        if not image_path or not caption:
            raise UnusableSample(f"{where}: empty image path or caption")
        try:
            image = self.open_image(image_path)
            image = self.transform(image)  # a lazily opened image is decoded here: its errors are the same
        except Exception as exn:
            raise UnusableSample(f"{where}: cannot read image: {exn}") from exn
        return image, tokenize_one(self.tokenizer, caption), idx


def field(row: list[str], column: int) -> str:
    return row[column] if column < len(row) else ""


def map_style_data(dataset: Dataset, args, is_train: bool, shared_epoch: SharedEpoch,
                   images: ImagePipeline) -> DataInfo:
    if is_train:
        dataset = SeededItems(dataset, PerSampleRandomness(args.seed, shared_epoch))
    sampler = ResumableSampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=is_train,
                               seed=args.seed, drop_last=is_train)
    sampler.set_epoch(shared_epoch.get())
    # Training drops the partial last batch; validation keeps it (and the sampler pads ranks to equal
    # length by repeating items when the set does not divide evenly).
    generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        collate_fn=collate_counted_samples, drop_last=is_train, persistent_workers=False,
                        pin_memory=torch.cuda.is_available(), generator=generator,
                        worker_init_fn=ignore_stop_signals)
    num_samples = len(loader) * args.batch_size * args.world_size if is_train else len(dataset)
    return DataInfo(SkipCountingLoader(loader, len(loader), num_samples, exact=is_train), shared_epoch, sampler,
                    generator=generator, seed_parts=(args.seed, args.rank), images_to_device=images.to_device)


def get_csv_data(args, is_train, images: ImagePipeline, tokenizer, shared_epoch, check_key) -> DataInfo:
    """The file's rows make the epoch (--train-num-samples is for shards, whose size is unknown)."""
    path = args.train_data if is_train else args.val_data
    rows = CsvCaptions(path, args.csv_img_key, args.csv_caption_key, args.csv_separator, images.transform,
                       tokenizer, "--train-data" if is_train else "--val-data", images.open_file)
    if len(rows):
        check_key(len(rows) - 1, f"the last row of {path}")  # before any worker starts
    return map_style_data(SkipUnreadable(rows, check_key, "train" if is_train else "val"), args, is_train,
                          shared_epoch, images)


def get_synthetic_data(args, images: ImagePipeline, tokenizer, shared_epoch, check_key) -> DataInfo:
    from training.data.synthetic.samples import SyntheticCaptions  # only this dataset type needs it

    dataset = SyntheticCaptions(args.synthetic_num_samples, seed=args.synthetic_seed, transform=images.transform,
                                tokenizer=tokenizer)
    if len(dataset):
        check_key(len(dataset) - 1, "the last synthetic sample")
    return map_style_data(SkipUnreadable(dataset, check_key, "train"), args, True, shared_epoch, images)


# --------------------------------------------------------------------------------------- entry

def resolve_dataset_type(path: str, requested: str, flag: str) -> str:
    if requested not in ("auto", "synthetic"):  # synthetic is training-only: --val-data goes by extension
        return requested
    extension = path.split("::")[0].rsplit(".", 1)[-1].lower()
    if extension == "tar":
        return "webdataset"
    if extension in ("csv", "tsv"):
        return "csv"
    raise DataConfigError(f"cannot tell the dataset type of {flag} {path!r} from its extension "
                          "(.tar: webdataset, .csv/.tsv: csv); pass --dataset-type")


def get_data(args, preprocess_train, preprocess_val, tokenizer, epoch: int = 0) -> dict[str, DataInfo]:
    """{"train": DataInfo, "val": DataInfo}, each present when configured: "train" for --train-data
    or --dataset-type synthetic (the built-in shapes data set), "val" for --val-data.

    Training images go through `--input-pipeline` (training.data.fast_images; "fast" when the flag is
    absent); validation keeps open_clip's preprocess_val on fully decoded images, exactly."""
    data = {}
    if args.dataset_type == "synthetic" or args.train_data is not None:
        check_key = KeyRangeCheck(per_sample_state_size(args.uses_per_sample_state, args.data_size))
        images = train_image_pipeline(getattr(args, "input_pipeline", "fast"), preprocess_train)
        if args.dataset_type == "synthetic":
            data["train"] = get_synthetic_data(args, images, tokenizer, SharedEpoch(epoch), check_key)
        else:
            data["train"] = get_split(args, True, images, tokenizer, SharedEpoch(epoch), check_key)
    if args.val_data:
        # keys of a validation set index no training state: no range check
        data["val"] = get_split(args, False, ImagePipeline(preprocess_val), tokenizer, SharedEpoch(epoch),
                                KeyRangeCheck(None))
    return data


def get_split(args, is_train, images: ImagePipeline, tokenizer, shared_epoch, check_key) -> DataInfo:
    flag = "--train-data" if is_train else "--val-data"
    dataset_type = resolve_dataset_type(args.train_data if is_train else args.val_data, args.dataset_type, flag)
    build = {"webdataset": get_wds_data, "csv": get_csv_data}.get(dataset_type)
    if build is None:
        raise DataConfigError(f"unknown --dataset-type {dataset_type!r}; use webdataset, csv, synthetic or auto")
    return build(args, is_train, images, tokenizer, shared_epoch, check_key)
