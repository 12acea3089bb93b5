"""What may change between a checkpoint and the run that resumes from it, and one clear line for what may not.

May change: --data_size upwards (the per-sample tables grow, `contrastive.table`), the world size and
batch size (the position is mapped through the samples consumed, `checkpoint.map_position`), and most
other flags (warned about by main). May not:

* the sizes of the method's learned state: --npn_num_protos (the NPN's prototypes and their AdaGrad
  accumulators), and anything else whose tensors no longer fit (reported from the size mismatch);
* the split of shards over readers (--workers x world size) in the middle of an epoch: each reader
  streams its own shards with its own shuffle, so the position "k batches in" means other samples under
  another split. The rest of that epoch would repeat some samples and never show others. At an epoch
  boundary any split is fine.
"""
from __future__ import annotations

import re

from contrastive import registry

from training.errors import UserError

#: Stored in each checkpoint, compared on load; then every registry entry's resume-fixed flags (npn_num_protos).
SIZE_FLAGS = ("model", "estimator")


def size_flags(args) -> dict:
    return {name: str(getattr(args, name, None)) for name in SIZE_FLAGS + tuple(registry.resume_fixed_flags())}


def check_size_flags(path: str, ckpt: dict, args) -> None:
    """Refuse a checkpoint whose method state another value of a resume-fixed flag would not fit (same
    method; an estimator's flags only when both sides use it): e.g. an NPN with another number of prototypes."""
    stored = ckpt.get("size_flags") or {}
    if ckpt.get("method_name", getattr(args, "method", None)) != getattr(args, "method", None):
        return  # another method: only the model weights are restored
    changed = registry.changed_resume_fixed_flag(stored, args)
    if changed:
        flag, old, new, why = changed
        raise UserError(f"{path} was written with --{flag} {old}, this run has --{flag} {new}: {why}; relaunch "
                        f"with --{flag} {old}, or start a new run (another --name, or --resume-fresh)")


_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape (\S+(?: \S+)*?) from checkpoint, "
                       r"the shape in current model is (\S+(?: \S+)*?)\.")


def method_state_mismatch(path: str, exc: BaseException) -> str:
    """One line for a method state_dict that does not load: the first mismatching tensor, and the fix."""
    text = str(exc)
    match = _MISMATCH.search(text)
    if match:
        what = f"{match.group(1)} is {match.group(2)} in the checkpoint, {match.group(3)} here"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        what = (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0] if lines else
                type(exc).__name__)[:300]
    return (f"{path}: the method state does not fit this run ({what}); it was written with other method "
            "flags (--npn_num_protos, --estimator, --temperature_scheme, --data_size, ...): relaunch with the "
            "flags of the run folder's params.txt, or start a new run (another --name, or --resume-fresh)")


def reads_shards(args) -> bool:
    if getattr(args, "dataset_type", "synthetic") == "synthetic" or not getattr(args, "train_data", None):
        return False
    if args.dataset_type == "webdataset":
        return True
    return args.dataset_type == "auto" and args.train_data.split("::")[0].rsplit(".", 1)[-1].lower() == "tar"


def check_position_transfer(ckpt: dict, args) -> None:
    """Mid-epoch on shards: refuse another --workers or world size (see the module docstring)."""
    position = ckpt.get("data_position") or {}
    batch, old_readers = int(position.get("batch", 0)), position.get("readers")
    if not batch or old_readers is None or not reads_shards(args):
        return
    old_world, new_readers = int(ckpt.get("world_size", args.world_size)), max(1, args.workers)
    if (int(old_readers), old_world) == (new_readers, args.world_size):
        return
    raise UserError(
        f"the checkpoint stopped mid-epoch (epoch {position.get('epoch')}, batch {batch}) of a shard run read by "
        f"--workers {old_readers} x {old_world} process(es); this run has --workers {args.workers} x "
        f"{args.world_size}: shards are split over readers, so the rest of the epoch would repeat some samples "
        f"and skip others. Finish this epoch with --workers {old_readers} on {old_world} process(es) (an "
        "epoch-end checkpoint resumes with any split), or pass --resume-fresh")
