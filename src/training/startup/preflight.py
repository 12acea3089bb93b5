"""The start-up checks that need neither the model nor a data loader, run before the run folder exists:
a start refused for a typo leaves no empty run folder behind, and says so in one line (exit status 2,
training.errors) instead of the traceback of whichever library tripped over it first.

Checked here: the model name (with the closest known names), the training and validation data (CSV:
the file, its columns, its first image paths, enough rows for one batch; shards: that they exist, that
--train-num-samples is given, enough of them for the readers), --imagenet-val, a --resume file that is not
there, and that --logs can hold run folders. What only the data loader or the checkpoint can tell (a key beyond --data_size deep in a
shard, a checkpoint of another shape) is checked where it is found.
"""
from __future__ import annotations

import difflib
import os

from training.batching import global_batch
from training.data.checks import (DataConfigError, MissingData, check_csv, check_enough_shards, check_shards_exist,
                                  expand_shard_urls, require_train_num_samples)
from training.errors import MissingResume, UserError


def check_before_run_folder(args) -> None:
    check_model_name(args.model)
    if args.train_data is not None and args.dataset_type != "synthetic":
        check_data(args, args.train_data, is_train=True)
    if args.val_data:
        check_data(args, args.val_data, is_train=False)
    if args.imagenet_val and not os.path.isdir(args.imagenet_val):
        raise MissingData(f"--imagenet-val {args.imagenet_val}: no such folder; give an ImageFolder "
                          "(one subfolder of images per class) or leave the flag out")
    resume = getattr(args, "resume", None)
    if resume not in (None, "latest") and not os.path.isfile(resume):
        raise MissingResume(f"--resume {resume}: no such checkpoint file; give a checkpoint (a run folder's "
                            "checkpoints/epoch_N.pt or iter_N.pt) or --resume latest")
    check_logs_folder(args.logs)


def check_model_name(name: str) -> None:
    """open_clip's own error is a traceback ending in every known name (7 KB); the closest few help more."""
    import open_clip  # noqa: PLC0415  (the trainer has imported it already; this module stays light)
    if name.startswith(("hf-hub:", "local-dir:")) or open_clip.get_model_config(name) is not None:
        return
    known = open_clip.list_models()
    by_lower = {k.lower(): k for k in known}
    close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=4, cutoff=0.6)]
    hint = f"closest: {', '.join(close)}" if close else f"{len(known)} known, e.g. {', '.join(known[:3])}"
    raise UserError(f"--model {name}: no such model ({hint}); `python -c \"import open_clip; "
                    "print(open_clip.list_models())\"` lists them all, hf-hub:ORG/REPO loads one from the Hub")


def data_type(args, path: str, flag: str) -> str:
    from training.data.loader import resolve_dataset_type  # noqa: PLC0415  (imports torch's DataLoader)
    return resolve_dataset_type(path, args.dataset_type, flag)


def check_data(args, path: str, is_train: bool) -> None:
    flag = "--train-data" if is_train else "--val-data"
    kind = data_type(args, path, flag)
    if kind == "csv":
        rows = check_csv(path, args.csv_img_key, args.csv_caption_key, args.csv_separator, flag)
        batch = global_batch(args)
        if is_train and rows < batch:
            raise DataConfigError(f"0 steps per epoch: {flag} {path} has {rows} rows, less than one global "
                                  f"batch ({batch}); lower --batch-size or use more data")
    elif kind == "webdataset":
        urls = expand_shard_urls(path, flag)
        check_shards_exist(urls, flag)
        if is_train:
            require_train_num_samples(args.train_num_samples)
            if not args.dataset_resampled:
                check_enough_shards(len(urls), args.workers, args.world_size)


def check_logs_folder(logs: str) -> None:
    """--logs is created here if missing (the parent of run folders, not a run folder)."""
    try:
        os.makedirs(logs, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--logs {logs}: cannot create it ({exc.strerror or exc}); pass --logs FOLDER "
                        "somewhere you can write") from exc
    if not os.access(logs, os.W_OK | os.X_OK):
        raise UserError(f"--logs {logs}: not writable; pass --logs FOLDER somewhere you can write")
