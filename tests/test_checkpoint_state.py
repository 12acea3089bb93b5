"""The checkpoint wing through its own interface: the file layout every checkpoint has had (so that older
checkpoints resume and other readers keep working), the training state's part of it (Stateful), and a
resume from --resume to the position, step and weights the checkpoint holds."""
import os
from types import SimpleNamespace

import torch
from torch import nn

from training.checkpoint import CheckpointManager, read_checkpoint
from training.checkpoint.resume import resume
from training.train_state import TrainState

#: The checkpoint's top-level keys, in the order every checkpoint so far was written with them (README:
#: open_clip's keys plus this project's; tests/test_main.py loads them into open_clip).
LAYOUT = ["format_version", "epoch", "name", "state_dict", "optimizer", "scaler", "method", "method_name", "step",
          "train_state", "data_position", "size_flags", "world_size", "batch_size", "rng"]


def run_args(**kw):
    return SimpleNamespace(**{"name": "wing", "method": "gcl", "estimator": "moving_average", "npn_num_protos": 8,
                              "model": "linear", "world_size": 1, "batch_size": 4, "accum_freq": 2, "workers": 0,
                              "device": "cpu", "keep_last_k": 2, "resume": None, "dataset_type": "synthetic",
                              "train_data": None, **kw})


def manager(directory, args, seed):
    torch.manual_seed(seed)
    model, method = nn.Linear(3, 2), nn.Linear(2, 1)
    optimizer = torch.optim.SGD([*model.parameters(), *method.parameters()], lr=0.1)
    return CheckpointManager(str(directory), args, True, model=model, optimizer=optimizer, scaler=None,
                             method=method)


def state_with_a_queued_skip(step=5):
    state = TrainState(step=step)
    state.pending.append((step - 1, torch.tensor(True)))  # a device-side skip not yet read back
    return state


def test_a_checkpoint_keeps_its_layout(tmp_path):
    """Catches a checkpoint key renamed, dropped or nested differently (`step`, `train_state`,
    `data_position`, ...: older checkpoints would no longer resume and the DataComp fork would not read new
    ones), a non-finite skip still queued on the device left out of the counters written, and a data position
    whose global batch forgets --accum-freq (4 x 1 rank x 2 micro-batches = 8 samples a step)."""
    ckpt = manager(tmp_path, run_args(), seed=0).state(epoch=1, train_state=state_with_a_queued_skip(),
                                                       position={"epoch": 1, "batch": 2})
    assert list(ckpt) == LAYOUT
    assert ckpt["step"] == 5
    assert ckpt["train_state"] == {"skipped_nonfinite": 1, "consecutive_nonfinite": 1}
    assert ckpt["data_position"] == {"epoch": 1, "batch": 2, "global_batch": 8, "readers": 1}


def test_train_state_loads_the_entries_older_checkpoints_hold():
    """Catches TrainState.load_state_dict reading another key or nesting than the checkpoints written before
    it was Stateful (step at the top, counters under train_state): a resumed run would restart its schedules
    at step 0 or forget its non-finite counters. An open_clip checkpoint has neither: step 0."""
    old = {"epoch": 1, "step": 12, "train_state": {"skipped_nonfinite": 3, "consecutive_nonfinite": 2},
           "state_dict": {}}
    state = TrainState()
    state.load_state_dict(old)
    assert (state.step, state.skipped_nonfinite, state.consecutive_nonfinite) == (12, 3, 2)
    assert state.state_dict() == {"step": 12, "train_state": {"skipped_nonfinite": 3, "consecutive_nonfinite": 2}}
    fresh = TrainState()
    fresh.load_state_dict({"epoch": 4, "state_dict": {}})
    assert (fresh.step, fresh.skipped_nonfinite) == (0, 0)


def test_resume_restores_what_the_checkpoint_holds(tmp_path):
    """Catches a resume that restores the weights but not the training state (the step, hence every
    schedule, back at 0) or not the data position (the epoch replayed from its start); and one that resumes
    from an older checkpoint than the newest. Written by one manager, resumed by another whose model starts
    from other weights, as a relaunched process does."""
    args = run_args()
    writer = manager(tmp_path, args, seed=0)
    writer.save_iter(TrainState(step=3), {"epoch": 0, "batch": 3})
    writer.save_iter(state_with_a_queued_skip(step=6), {"epoch": 1, "batch": 2})
    assert sorted(os.listdir(tmp_path)) == ["iter_3.pt", "iter_6.pt"]

    reader, state = manager(tmp_path, run_args(resume="latest"), seed=1), TrainState()
    assert not torch.equal(reader.model.weight, writer.model.weight)
    start = resume(reader, state, reader.args, steps_per_epoch=4, run_dir=str(tmp_path), device="cpu",
                   changed_flags=lambda: [])
    assert start == (1, 2)
    assert (state.step, state.skipped_nonfinite, state.consecutive_nonfinite) == (6, 1, 1)
    assert torch.equal(reader.model.weight, writer.model.weight)
    assert read_checkpoint(str(tmp_path / "iter_6.pt"))["step"] == 6


def test_no_checkpoint_yet_starts_at_the_beginning(tmp_path):
    """Catches a fresh run (an empty run folder, --resume latest) that fails or starts elsewhere than epoch 0,
    batch 0, step 0."""
    state = TrainState()
    start = resume(manager(tmp_path, run_args(resume="latest"), seed=0), state, run_args(resume="latest"),
                   steps_per_epoch=4, run_dir=str(tmp_path), device="cpu", changed_flags=lambda: [])
    assert start == (0, 0) and state.step == 0
