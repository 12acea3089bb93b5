"""Settings that would train nothing (or not what was asked), caught at start-up in one line each.

Refused (UserError): a run that would take no step per epoch (a batch larger than the data), and
shards whose info.json (training.data.synthetic writes one) holds fewer samples than
--train-num-samples asks per epoch: webdataset repeats the stream to fill the epoch, so the run would
train on copies and every per-epoch number would be mislabelled.

Warned (one WARNING line, and the run goes on):
- --warmup >= the run's total steps: the learning rate never reaches --lr (the peak it reaches is named).
  open_clip accepts this and the run does update the model, just too little, which a short
  fine-tune or a learning-rate probe may want; a refusal would break open_clip command parity.
- fewer --train-num-samples than info.json holds: normal for open_clip (an epoch is then a checkpoint
  interval), but named in case it is the SAMPLES-mismatch mistake.
- --lr 0: the encoders do not change (the normalizer estimators still do; a diagnostic may want that).
- a run that will take no step: a resumed run that is already complete (it exits 0, as a requeued job
  should), or --stop_epochs at or before the start (with --resume PATH: set a folder back without training).
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

from training.batching import global_batch
from training.errors import UserError

log = logging.getLogger("training")


def info_json_samples(pattern: str | None) -> tuple[int, str] | None:
    """(samples, description) from the info.json next to the shards, when --train-data names exactly the
    shards of folders that have one (else None: nothing to compare with)."""
    if not pattern:
        return None
    from training.data.checks import expand_shard_urls  # noqa: PLC0415  (imports braceexpand, webdataset)
    by_folder = defaultdict(int)
    for url in expand_shard_urls(pattern, "--train-data"):
        by_folder[os.path.dirname(url) or "."] += 1
    total, folders = 0, []
    for folder, shards in by_folder.items():
        path = os.path.join(folder, "info.json")
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
            samples, expected_shards = int(info["num_samples"]), int(info["num_shards"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if shards != expected_shards:  # a subset of the folder's shards: its size is not known
            return None
        total += samples
        folders.append(path)
    return total, " + ".join(folders)


def check_data_size(args) -> None:
    """Before the data loader is built: --train-num-samples against the data and the batch."""
    if args.dataset_type == "synthetic":
        samples, source = args.synthetic_num_samples, "--synthetic-num-samples"
    elif args.train_num_samples is not None and args.dataset_type in ("auto", "webdataset") \
            and not str(args.train_data).endswith((".csv", ".tsv")):
        samples, source = args.train_num_samples, "--train-num-samples"
        found = info_json_samples(args.train_data)
        if found is not None:
            in_data, where = found
            if args.train_num_samples > in_data:
                raise UserError(
                    f"--train-num-samples {args.train_num_samples} but {where} says the shards hold {in_data} "
                    f"samples: each epoch would repeat samples; pass --train-num-samples {in_data}, or write "
                    f"a data set of {args.train_num_samples} samples into another folder")
            if args.train_num_samples < in_data:
                log.warning("--train-num-samples %d is less than the %d samples %s lists: each epoch reads "
                            "part of the data", args.train_num_samples, in_data, where)
    else:
        return  # CSV: its length is known only once read; check_steps catches an empty epoch
    if samples < global_batch(args):
        raise_no_steps(args, f"{source} {samples}")


def raise_no_steps(args, data: str) -> None:
    batch = global_batch(args)
    parts = f"--batch-size {args.batch_size}" + (f" x {args.world_size} ranks" if args.world_size > 1 else "") \
        + (f" x --accum-freq {args.accum_freq}" if args.accum_freq > 1 else "")
    raise UserError(f"0 steps per epoch: {data} is less than one global batch ({parts} = {batch}); "
                    f"lower --batch-size or use more data")


def check_steps(args, steps_per_epoch: int | None, start_epoch: int = 0) -> None:
    """After the data loader is built (its epoch length is known); rank 0 logs the warnings."""
    if not steps_per_epoch:
        raise_no_steps(args, "the training data")
    total = steps_per_epoch * args.epochs
    if not args.is_master:
        return
    if args.warmup >= total:
        log.warning("--warmup %d >= the run's %d steps (%d epochs x %d steps): the learning rate never reaches "
                    "--lr %g, its peak is %.3g; pass --warmup %d (10%% of the steps) or fewer",
                    args.warmup, total, args.epochs, steps_per_epoch, args.lr, args.lr * total / max(args.warmup, 1),
                    max(1, total // 10))
    if args.lr == 0:
        log.warning("--lr 0: the model's weights will not change")


def warn_if_complete(args, start_epoch: int, last_epoch: int) -> None:
    """A run that will take no step says so. Not refused: `--stop_epochs 0` with `--resume PATH` is how a
    run folder is set back to an older checkpoint without training, and a requeued finished job must exit 0."""
    if not args.is_master or start_epoch < last_epoch:
        return
    if args.stop_epochs >= 0 and args.stop_epochs <= start_epoch:
        log.warning("nothing to train: --stop_epochs %d stops at or before epoch %d, where this run starts; "
                    "pass a later epoch, or -1 (off)", args.stop_epochs, start_epoch)
    else:
        log.warning("nothing to train: the checkpoint is at epoch %d and the run stops at epoch %d; pass a "
                    "larger --epochs to continue it, or a new --name to start another run", start_epoch,
                    last_epoch)
