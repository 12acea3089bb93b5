"""What an open_clip user does out of habit, against this trainer: the size flags, --report-to values,
the built-in evaluation staying off the user's data, a signal during evaluation, open_clip's logged names.
open_clip's own end-to-end tests run against the trainer in tests/test_open_clip_training_simple.py."""
import pytest

import training  # noqa: F401  (registers neuclip-tiny)
from training.main import main
from training.startup.user_errors import UserError


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
