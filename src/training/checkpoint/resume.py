"""A run's resume: from --resume (or the run folder's newest checkpoint) to the epoch, batch and step it
continues at, with the model, optimizer, method, RNG and training state restored. Every failure is one
line naming the fix (training.errors) or the file."""
import logging

from training.checkpoint.manager import CheckpointManager
from training.checkpoint.position import map_position
from training.errors import MissingResume, ResumeMismatch, UserError
from training.params import build_parser
from training.train_state import TrainState

log = logging.getLogger(__name__)


def resume(checkpoints: CheckpointManager, train_state: TrainState, args, steps_per_epoch: int, run_dir: str,
           device, changed_flags) -> tuple[int, int]:
    """Restore the run from the checkpoint --resume names; returns the (epoch, batch) to start at, (0, 0)
    when there is none. `changed_flags()`: the flags that differ from the run folder's params.txt, named
    when the checkpoint does not fit."""
    try:
        resume_path, ckpt = checkpoints.resolve(args.resume)
    except FileNotFoundError as exc:
        raise MissingResume(str(exc)) from exc
    if not resume_path:
        if args.resume:
            log.info("--resume %s: no checkpoint yet in %s, starting fresh", args.resume, run_dir)
        return 0, 0
    try:
        ckpt = checkpoints.load(resume_path, ckpt, device)
    except UserError:  # already one line naming the flag (training.checkpoint.resume_checks)
        raise
    except (RuntimeError, ValueError, KeyError) as exc:  # a tensor of another shape: a flag that sizes it changed
        raise ResumeMismatch.of(resume_path, exc, changed_flags(), build_parser()) from exc
    train_state.load_state_dict(ckpt)
    start_epoch, start_batch = map_position(ckpt, args, steps_per_epoch)
    log.info("Resumed from %s at epoch %d, batch %d, step %d", resume_path, start_epoch, start_batch,
             train_state.step)
    return start_epoch, start_batch
