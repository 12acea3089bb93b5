"""The checkpoint wing: one checkpoint for everything that has state.

A checkpoint is open_clip's layout — `epoch`, `name`, `state_dict` (exactly the model's keys, so
`open_clip.create_model_and_transforms(arch, pretrained=path)` loads it strictly), `optimizer`,
`scaler` — plus top-level keys for the rest: the method's state (per-sample arrays, NPN and its
AdaGrad accumulators, temperatures), the step counter and the loop's fault counters, the data position
(epoch + batches of it consumed) and every rank's RNG states. Only tensors and Python primitives are
stored: open_clip loads with `weights_only=True`.

Files: `epoch_N.pt` / `epoch_latest.pt` at epoch ends (open_clip's --save-frequency, --save-most-recent),
and `iter_{step}.pt` mid-run (--save-every-n-steps, --save-every-n-minutes, preemption), of which the last
--keep-last-k are kept. Each is written to a temporary name, fsynced and renamed, so a crash never leaves
a half-written file under a real name. Resuming picks the checkpoint with the highest step that loads
and has every required key, after checking its zip CRCs; a damaged newer one is skipped with a warning
naming it and renamed to NAME.corrupt, while one that could not be read right now (EIO, out of memory)
is retried and then left untouched (`training.checkpoint.integrity`). When checkpoints exist and none can
be used, the run stops and says so (--resume-fresh starts over on purpose): never a silent fresh start.
A state with non-finite parameters is never written, and a new file is read back (CRCs) before
retention deletes older ones. Checkpoints from beyond the step a run resumes at (an explicit --resume of an older file)
are renamed to NAME.superseded, so that a later automatic resume does not jump back to them.

Each part of the state writes and restores itself (`state_dict` / `load_state_dict`: the model, the
optimizer, the method, training.train_state.TrainState); the modules here each say one thing:

* manager: when to write, which checkpoint to resume from, retention, restoring the parts;
* files: the atomic write and the checked read of one file; integrity: damaged versus unreadable;
* rng: every rank's random streams; position: the data position and its mapping to another global batch;
* resume_checks: what a resumed run may not change; resume: a run's resume, from --resume to the step.
"""
from training.checkpoint.files import CHECKPOINT_NAME, REQUIRED_KEYS, atomic_save, read_checkpoint
from training.checkpoint.manager import FORMAT_VERSION, CheckpointManager, NoUsableCheckpoint
from training.checkpoint.position import map_position, position_state
from training.checkpoint.rng import rng_state, set_rng_state

__all__ = ["CHECKPOINT_NAME", "FORMAT_VERSION", "REQUIRED_KEYS", "CheckpointManager", "NoUsableCheckpoint",
           "atomic_save", "map_position", "position_state", "read_checkpoint", "rng_state", "set_rng_state"]
