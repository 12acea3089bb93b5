"""The data position in a checkpoint: how far into which epoch the run was, in steps of the global batch
that wrote it, and how a run with another global batch finds the same place again.

Stored as `data_position` = {epoch, batch (steps of that epoch consumed), global_batch (samples per
step), readers (data workers per rank, which split shards)}. What a resumed pass then skips is
training.data.position's business (ResumableSampler).
"""
import logging

from training.batching import global_batch
from training.checkpoint.resume_checks import check_position_transfer

log = logging.getLogger(__name__)


def position_state(position: dict, args) -> dict:
    """The checkpoint's `data_position` for `position` ({epoch, batch}) reached by this run."""
    return {**position, "global_batch": global_batch(args), "readers": max(1, args.workers)}


def map_position(ckpt: dict, args, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch) to resume at. The position is stored in steps of the writer's global batch; with
    another global batch (batch size × world size × accum-freq) it is converted through the samples
    consumed."""
    position = ckpt.get("data_position") or {}
    check_position_transfer(ckpt, args)  # shards: another split over readers changes the epoch
    epoch, batch = int(position.get("epoch", ckpt.get("epoch", 0))), int(position.get("batch", 0))
    new_global = global_batch(args)
    old_global = int(position.get("global_batch", new_global))
    if batch and old_global != new_global:
        samples = batch * old_global
        batch = samples // new_global
        log.warning("the checkpoint was written with a global batch of %d, this run has %d: resuming epoch %d "
                    "at batch %d (%d of the %d samples already consumed; the position maps exactly for CSV and "
                    "synthetic data, approximately for shards, whose split over ranks differs)",
                    old_global, new_global, epoch, batch, batch * new_global, samples)
    if batch >= steps_per_epoch:
        epoch, batch = epoch + 1, 0
    return epoch, batch
