"""What an open_clip user does out of habit, against this trainer: the size flags, --report-to values,
the built-in evaluation staying off the user's data, a signal during evaluation, open_clip's logged names.
open_clip's own end-to-end tests run against the trainer in tests/test_open_clip_training_simple.py."""
import json
import os
import signal

import pytest

import training  # noqa: F401  (registers neuclip-tiny)
from training.data.synthetic.shards import write_shards
from training.eval import evaluation
from training.main import main
from training.params import parse_args
from training.preemption import Preempted
from training.errors import UserError
from training.startup.cli import run_cli


def tiny_flags(tmp_path, name, *extra):
    return ["--logs", str(tmp_path), "--name", name, "--model", "neuclip-tiny", "--workers", "0",
            "--precision", "fp32", "--warmup", "1", "--lr", "1e-3", "--report-to", "", *extra]


def test_train_num_samples_sizes_the_synthetic_data_set(tmp_path, single_torch_thread):
    """Bug: --train-num-samples was ignored for --dataset-type synthetic (the set kept its 20000 samples,
    5000 steps at batch 4); open_clip's synthetic data set has exactly --train-num-samples samples."""
    summary = main(tiny_flags(tmp_path, "n16", "--dataset-type", "synthetic", "--train-num-samples", "16",
                              "--batch-size", "4", "--epochs", "1", "--zeroshot-frequency", "0",
                              "--val-frequency", "0"))
    assert summary["step"] == 16 // 4


def test_two_different_synthetic_sizes_are_refused(tmp_path):
    """Bug: --train-num-samples and --synthetic-num-samples disagreeing, one of them silently ignored."""
    with pytest.raises(UserError, match="both size the synthetic data set"):
        main(tiny_flags(tmp_path, "both", "--train-num-samples", "16", "--synthetic-num-samples", "32",
                        "--batch-size", "4", "--epochs", "1"))


@pytest.fixture
def small_builtin(monkeypatch):
    """Smaller built-in evaluation sets: the test needs their presence, not their precision."""
    monkeypatch.setattr(evaluation, "BUILTIN_N_PER_TASK", 16)
    monkeypatch.setattr(evaluation, "BUILTIN_RETRIEVAL_N", 32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shards(str(out), 32, seed=0, samples_per_shard=8)
    return str(out / "{00000..00003}.tar")


def results_lines(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "checkpoints", "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_builtin_evaluation_stays_off_the_users_data_unless_asked(tmp_path, shards, small_builtin,
                                                                   single_torch_thread):
    """Bug: the built-in shapes evaluation ran after every epoch of every run, on the user's own shards too
    (numbers that mean nothing there, minutes on rank 0 while the other ranks wait); open_clip evaluates
    only what it is given. --builtin-eval still asks for it."""
    flags = ["--train-data", shards, "--train-num-samples", "32", "--batch-size", "16", "--epochs", "1"]
    plain = main(tiny_flags(tmp_path, "users_data", *flags))
    assert not any(k.startswith("builtin/") for k in plain["results"])
    assert results_lines(plain["run_dir"]) == []  # nothing was due: no line
    assert not evaluation.evaluation_missing(plain["run_dir"], 1, parse_args(tiny_flags(tmp_path, "x", *flags)))
    asked = main(tiny_flags(tmp_path, "asked", *flags, "--builtin-eval"))
    assert "builtin/mean_top1" in asked["results"] and results_lines(asked["run_dir"])[0]["epoch"] == 1
    on_builtin = main(tiny_flags(tmp_path, "builtin", "--train-num-samples", "32", "--batch-size", "16",
                                 "--epochs", "1"))
    assert "builtin/mean_top1" in on_builtin["results"]


def test_signal_during_evaluation_stops_within_a_batch_and_relaunch_makes_it_up(tmp_path, monkeypatch,
                                                                                  single_torch_thread):
    """Bug: a SIGTERM arriving during the evaluation was acted on only after the whole evaluation (minutes
    with a large model), and after the last epoch not at all (the run ended 'Done'): under slurm the job was
    killed before its checkpoint-and-requeue. Now the evaluation checks the stop flag between batches, the run
    exits with status 75, and the relaunch makes the missing evaluation up."""
    monkeypatch.setattr(evaluation, "BUILTIN_N_PER_TASK", 64)
    batches = []
    original = evaluation.tensor_batches

    def signalled_batches(images, batch_size):
        for batch in original(images, batch_size):
            batches.append(len(batch))
            if len(batches) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives during the evaluation's first batch
            yield batch

    monkeypatch.setattr(evaluation, "tensor_batches", signalled_batches)
    flags = tiny_flags(tmp_path, "sig", "--train-num-samples", "32", "--batch-size", "8", "--epochs", "1")
    with pytest.raises(Preempted):
        main(flags)
    assert len(batches) <= 2  # 6 tasks x 64 images at batch 8 would be 48 batches
    assert results_lines(tmp_path / "sig") == []
    monkeypatch.setattr(evaluation, "tensor_batches", original)
    summary = main(flags)  # the same command: resumes, evaluates epoch 1, trains nothing more
    assert summary["step"] == 32 // 8
    assert [line["epoch"] for line in results_lines(tmp_path / "sig")] == [1]


@pytest.mark.parametrize("report_to, tensorboard, wandb", [("all", True, True), ("none", False, False),
                                                            ("wandb,tensorboard", True, True)])
def test_report_to_takes_open_clips_values(tmp_path, monkeypatch, report_to, tensorboard, wandb):
    """Bug: --report-to all and --report-to none (open_clip's values) were refused at start-up. 'all' must
    report to both TensorBoard and wandb, 'none' to neither."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = tiny_flags(tmp_path, "r", "--train-num-samples", "16", "--batch-size", "8", "--epochs", "1",
                       "--zeroshot-frequency", "0", "--val-frequency", "0")
    main(flags + ["--report-to", report_to])  # the last --report-to counts
    assert (tmp_path / "r" / "tensorboard").exists() == tensorboard
    assert (tmp_path / "r" / "wandb").exists() == wandb


def test_remote_sync_failing_at_start_up_is_one_line_exit_2(tmp_path, capsys):
    """Bug: a --remote-sync target that cannot be written ended the run in a traceback (exit 1); open_clip
    users expect the start-up check's one line. Here the target lies under a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    flags = tiny_flags(tmp_path, "rs", "--train-num-samples", "16", "--batch-size", "8", "--epochs", "1",
                       "--zeroshot-frequency", "0", "--val-frequency", "0", "--remote-sync", str(blocker / "runs"),
                       "--remote-sync-protocol", "fsspec")
    with pytest.raises(SystemExit) as exc:
        run_cli(main, flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: --remote-sync ") and "first sync failed" in err[0]


def tensorboard_steps(run_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_logged_steps_and_names_are_open_clips(tmp_path, shards, monkeypatch, single_torch_thread):
    """Bugs: logged train steps started at 1 (open_clip: 0, and it logs each epoch's first batch, every n-th
    and the last); wandb rows lacked open_clip's x-axis keys `step` (train) and `epoch` (val), logged at
    wandb step = the training step and the step count at the epoch's end; validation lacked open_clip's
    mean and median ranks. The project's own keys (train/step, eval/...) must stay."""
    from test_open_clip_flags import wandb_history
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = main(tiny_flags(tmp_path, "steps", "--train-num-samples", "16", "--batch-size", "4", "--epochs", "2",
                              "--log-every-n-steps", "2", "--val-data", shards, "--val-num-samples", "32",
                              "--zeroshot-frequency", "0", "--report-to", "tensorboard,wandb"))
    run_dir = tmp_path / "steps"
    expected = [0, 2, 3, 4, 6, 7]  # open_clip: step = 4 * epoch + i, logged at i = 0, 2 and the last, 3
    assert tensorboard_steps(run_dir, "train/loss") == expected
    assert tensorboard_steps(run_dir, "val/image_to_text_mean_rank") == [1, 2]  # x: the epoch
    rows = wandb_history(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == expected and [r["train/step"] for r in train] == expected
    assert [r["_step"] for r in train] == expected
    val = [r for r in rows if "val/clip_val_loss" in r]
    assert [(r["epoch"], r["_step"]) for r in val] == [(1, 4), (2, 8)]
    result = summary["results"]
    for direction in ("image_to_text", "text_to_image"):
        mean, median = result[f"val/{direction}_mean_rank"], result[f"val/{direction}_median_rank"]
        assert 1 <= median <= 32 and 1 <= mean <= 32 and median == int(median)
        assert all(f"val/{direction}_{name}" in val[-1] for name in ("mean_rank", "median_rank", "R@1"))


def test_mean_and_median_ranks_match_open_clip_train():
    """Bug: the ranks computed otherwise than open_clip's (0-based, torch's lower median instead of numpy's
    mean of the two middle values, or unfloored). Reference: open_clip_train's own get_clip_metrics, on an
    even number of pairs without ties (where counting ties against the model changes nothing)."""
    import torch
    from open_clip_train.train import get_clip_metrics
    from training.eval.metrics import retrieval_recall
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(64, 16, dtype=torch.float64), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.9 * torch.randn(64, 16, dtype=torch.float64), dim=-1)
    theirs = get_clip_metrics(images, texts, 1.0)
    ours = retrieval_recall(images, texts)
    for direction in ("image_to_text", "text_to_image"):
        for name in ("mean_rank", "median_rank", "R@1", "R@5"):
            assert ours[f"{direction}_{name}"] == pytest.approx(float(theirs[f"{direction}_{name}"])), name
    assert theirs["image_to_text_mean_rank"] > 2  # not a degenerate case: the ranks vary
