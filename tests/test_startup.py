"""A new user's first runs: run names, resume refusals, settings that would train nothing, one-line user
errors, --help without torch, quiet logs, the thread policy and the progress bar (the real main([...]))."""
import logging
import os
import re
import subprocess
import sys
import warnings
from datetime import datetime
from pathlib import Path

import pytest
import torch

from training.data.synthetic.shards import write_shards
from training.main import main
from training.params import default_run_name, parse_args
from training.observers import StepResult, notify
from training.progress import ProgressBar
from training.startup.threads import choose_threads, default_workers
from training.errors import UserError

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--model", "neuclip-tiny", "--synthetic-num-samples", "64", "--batch-size", "16", "--epochs", "1",
        "--warmup", "1", "--precision", "fp32", "--workers", "0", "--zeroshot-frequency", "0",
        "--val-frequency", "0", "--report-to", ""]


def run(tmp_path, *flags, name="run"):
    named = ["--name", name] if name else []
    return main(["--logs", str(tmp_path), *named, *TINY, *flags])


def subprocess_env(**extra):
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}


# ----------------------------------------------------------------------------------------- run names

def test_default_run_name_is_timestamped_like_open_clip(monkeypatch):
    """Bug: the default name was built from the flags alone, so the README's two examples shared one
    folder and the second resumed (or crashed on) the first."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    args = parse_args(["--fastclip", "--npn"])
    args.precision = "fp32"
    a = default_run_name(args, now=datetime(2026, 1, 2, 3, 4, 5))
    b = default_run_name(args, now=datetime(2026, 1, 2, 3, 4, 6))
    assert a == f"2026_01_02-03_04_05-npn-model_neuclip-tiny-lr_0.0005-b_64-j_{args.workers}-p_fp32"
    assert a != b


def test_default_run_name_under_slurm_is_the_job_id(monkeypatch):
    """Bug this guards: a timestamped default would send a requeued slurm job to a new folder, from
    scratch, instead of resuming its own."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    args = parse_args([])
    args.precision = "fp32"
    assert default_run_name(args).startswith("slurm_4242-openclip-model_neuclip-tiny-")
    assert default_run_name(args, now=datetime(2020, 1, 1)) == default_run_name(args)


def test_two_runs_without_name_get_two_folders(tmp_path, single_torch_thread):
    """Bug: a second run without --name silently resumed the first one's folder."""
    first = run(tmp_path, name=None)
    second = run(tmp_path, "--lr", "1e-3", name=None)
    folders = sorted(os.listdir(tmp_path))
    assert len(folders) == 2 and all(re.match(r"\d{4}_\d\d_\d\d-\d\d_\d\d_\d\d-openclip-", f) for f in folders)
    assert first["step"] == second["step"] == 4  # the second trained from scratch, it did not resume


def test_resume_with_flags_that_do_not_fit_is_one_line_naming_the_flag(tmp_path, single_torch_thread):
    """Bug: resuming with another --npn_num_protos died in a 112-line size-mismatch traceback."""
    run(tmp_path, "--fastclip", "--npn", "--npn_num_protos", "64", name="same")
    with pytest.raises(UserError) as caught:
        run(tmp_path, "--fastclip", "--npn", "--npn_num_protos", "32", "--epochs", "2", name="same")
    message = str(caught.value)
    assert "\n" not in message and "--name" in message
    assert "--npn_num_protos 64" in message and "--npn_num_protos 32" in message


# ------------------------------------------------------------------------- settings that train nothing

def test_batch_larger_than_data_is_refused_before_the_run_folder(tmp_path):
    """Bug: 0 steps per epoch, then the random model was evaluated and saved as epoch_1.pt, exit 0."""
    with pytest.raises(UserError, match=r"0 steps per epoch: --synthetic-num-samples 64 .* = 128"):
        run(tmp_path, "--batch-size", "128")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes32")
    write_shards(str(out), 32, seed=0, samples_per_shard=8)
    return out


def test_more_samples_than_the_shards_hold_is_refused(tmp_path, shard_folder):
    """Bug: SAMPLES=20000 over a 10 000-sample folder trained on repeats while every number said 20000."""
    with pytest.raises(UserError, match=r"--train-num-samples 64 but \S*info.json says the shards hold 32"):
        run(tmp_path, "--train-data", str(shard_folder / "{00000..00003}.tar"), "--train-num-samples", "64")


def test_fewer_samples_than_the_shards_hold_is_named(tmp_path, shard_folder, caplog, single_torch_thread):
    """Bug: no word when --train-num-samples differs from the data folder's size."""
    with caplog.at_level(logging.WARNING):
        run(tmp_path, "--train-data", str(shard_folder / "{00000..00003}.tar"), "--train-num-samples", "16")
    assert any("--train-num-samples 16 is less than the 32 samples" in r.getMessage() for r in caplog.records)


def test_shards_smaller_than_a_batch_are_refused(tmp_path, shard_folder):
    """Bug: with shards the epoch length rounds up to one batch, which no reader can fill: a crash
    after start-up instead of a refusal."""
    with pytest.raises(UserError, match="0 steps per epoch: --train-num-samples 8"):
        run(tmp_path, "--train-data", str(shard_folder / "00000.tar"), "--train-num-samples", "8")


def test_warmup_longer_than_the_run_warns_once(tmp_path, caplog, single_torch_thread):
    """Bug: --warmup 10000 on a short run kept the lr near 0 (zero-shot at chance) without a word."""
    with caplog.at_level(logging.WARNING):
        run(tmp_path, "--warmup", "100")
    lines = [r.getMessage() for r in caplog.records if "--warmup 100 >= the run's 4 steps" in r.getMessage()]
    assert len(lines) == 1 and "peak is 2e-05" in lines[0]


def test_lr_zero_and_a_finished_run_say_that_nothing_trains(tmp_path, caplog, single_torch_thread):
    """Bug: --lr 0, and relaunching a finished run, exited 0 having trained nothing, without a word."""
    with caplog.at_level(logging.WARNING):
        run(tmp_path, "--lr", "0", name="lr0")
        again = run(tmp_path, "--lr", "0", name="lr0")
    messages = [r.getMessage() for r in caplog.records]
    assert any("--lr 0: the model's weights will not change" in m for m in messages)
    assert again["history"] == [] and any("nothing to train: the checkpoint is at epoch 1" in m for m in messages)


def test_stop_epochs_zero_says_nothing_trains(tmp_path, caplog, single_torch_thread):
    """Bug: --stop_epochs 0 trained nothing and exited 0 without a word."""
    with caplog.at_level(logging.WARNING):
        summary = run(tmp_path, "--stop_epochs", "0")
    assert summary["step"] == 0
    assert any("nothing to train: --stop_epochs 0 stops at or before epoch 0" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------- command-line errors

def test_user_error_on_the_command_line_is_one_line_exit_2(tmp_path):
    """Bug: user errors came out as full tracebacks, repeated by every rank."""
    done = subprocess.run([sys.executable, "-m", "training.main", "--logs", str(tmp_path), *TINY,
                           "--batch-size", "128"], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: 0 steps")


def test_flag_errors_are_one_line_and_silent_off_rank_0():
    """Bug: argparse printed its 70-line usage before the error, on every rank."""
    base = [sys.executable, "-m", "training.main", "--batch-size", "many"]
    rank0 = subprocess.run(base, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    rank1 = subprocess.run(base, capture_output=True, text=True, env=subprocess_env(RANK="1"), timeout=120)
    assert rank0.returncode == rank1.returncode == 2
    assert len(rank0.stderr.strip().splitlines()) == 1 and "--batch-size" in rank0.stderr
    assert rank1.stderr == rank1.stdout == ""


def test_help_and_package_import_do_not_import_torch():
    """Bug: --help imported torch and open_clip first (about a minute under load), and importing the
    package imported open_clip; the model configs must still register once open_clip is imported."""
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['training.main', '--help']\n"
        "try:\n    runpy.run_module('training.main', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('HELP_TORCH', 'torch' in sys.modules, 'open_clip' in sys.modules)\n"
        "import open_clip\n"
        "print('REGISTERED', 'neuclip-tiny' in open_clip.list_models())\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: training.main" in done.stdout
    assert "HELP_TORCH False False" in done.stdout and "REGISTERED True" in done.stdout


# ------------------------------------------------------------------------------------------ quiet logs

def test_third_party_info_and_harmless_warnings_are_quiet_unless_verbose(tmp_path, capsys, single_torch_thread):
    """Bug: every start printed ~10 open_clip INFO lines, 'Model initialized randomly' and the DataLoader
    worker-count warning."""
    too_many = str((os.cpu_count() or 1) + 1)  # above torch's suggested maximum: the DataLoader warns
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(tmp_path, "--workers", too_many, *(["--verbose"] if verbose else []), name=f"v{verbose}")
        out = capsys.readouterr().out + (tmp_path / f"v{verbose}" / "out.log").read_text()
        worker_warnings = [w for w in caught if "worker process" in str(w.message)]
        assert ("Model initialized randomly" in out) is verbose
        assert ("Loaded built-in neuclip-tiny model config" in out) is verbose
        assert bool(worker_warnings) is verbose
        assert "Train Epoch: 0" in out and "torch thread" in out  # the trainer's own lines stay


def test_all_gather_deprecation_is_quiet_unless_verbose():
    """Bug: torch's all_gather_into_tensor FutureWarning printed at every distributed step."""
    from training.startup import quiet
    for verbose in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet.install(verbose, handlers=[])
            with pytest.raises(Exception):  # no process group: the deprecation warns, then the call fails
                torch.distributed.all_gather_into_tensor(torch.zeros(2), torch.zeros(1))
        assert any("all_gather_into_tensor" in str(w.message) for w in caught) is verbose


# ------------------------------------------------------------------------------ threads and progress

@pytest.mark.parametrize("cores, ranks, workers, expected", [
    (2, 1, 1, 1),     # the shared 2-core machine: 1 thread ran ~6.5x faster than 2 under contention
    (16, 1, 4, 12), (16, 4, 3, 1), (1, 1, 0, 1), (64, 8, 4, 4),
    (2, 1, 0, 1),     # --workers 0: the training process loads the data itself
    (16, 1, 0, 15), (16, 4, 0, 3),
])
def test_thread_policy_leaves_a_core_per_worker(cores, ranks, workers, expected):
    """Bug: the trainer left torch at one thread per machine core, oversubscribing workers and ranks; and
    --workers 0 kept every core for torch although the training process then loads the data itself: on 2
    busy cores (load 6) 16 steps of `main.py --workers 0 --synthetic-num-samples 1024 --batch-size 64
    --fastclip --multiply_tau --npn --npn_num_protos 64` took 55-76 s with --threads 2, 29-30 s with 1."""
    assert choose_threads(cores=cores, ranks_on_node=ranks, workers=workers).threads == expected


def test_thread_policy_overrides_and_worker_default():
    """Bug: --workers 4 on 2 cores (DataLoader warnings, contention); no way to pick the threads."""
    assert choose_threads(cores=16, ranks_on_node=1, workers=4, requested=3).threads == 3
    assert choose_threads(cores=16, ranks_on_node=1, workers=4, omp_num_threads="2").why == "OMP_NUM_THREADS"
    assert choose_threads(cores=16, ranks_on_node=1, workers=4, requested=5, omp_num_threads="2").threads == 5
    assert [default_workers(c, r) for c, r in ((1, 1), (2, 1), (16, 1), (8, 4))] == [0, 1, 4, 1]


def test_thread_policy_applies_to_the_run_and_is_restored(tmp_path, monkeypatch):
    """Bug: the chosen thread count leaked into the calling process after main() returned."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    run(tmp_path, "--threads", "1")
    assert torch.get_num_threads() == before
    assert "1 torch thread (set by --threads)" in (tmp_path / "run" / "out.log").read_text()


def test_progress_bar_only_when_asked(tmp_path, capsys, single_torch_thread):
    """Bug: no progress or ETA for minutes between log lines; and a bar must not litter logs and tests."""
    run(tmp_path, "--epochs", "2", "--progress", name="bar")
    err = capsys.readouterr().err
    assert "8/8" in err and "step/s" in err and "samples/s" in err
    run(tmp_path, name="nobar")
    assert "step/s" not in capsys.readouterr().err


def test_progress_bar_beside_the_control_keeps_the_stop_decision():
    """Bug this guards: the progress bar, an observer beside the loop's control object, must not swallow a
    preemption stop (the loop's `notify` must pass on the control's True whatever the bar answers), and
    must move to the reported step with the samples/s of its own clock."""
    class Bar:
        n, initial, format_dict = 0, 0, {"elapsed": 1.5}
        def update(self, k): self.n += k
        def set_postfix_str(self, text, refresh=False): self.postfix = text

    class Control:
        def after_step(self, result): return result.step == 3

    bar = Bar()
    observers = [ProgressBar(bar, samples_per_step=16), Control()]
    assert [notify(observers, StepResult(s, 0, s, 5)) for s in (1, 2, 3)] == [False, False, True]
    assert bar.n == 3 and bar.postfix == "32 samples/s"  # 3 steps x 16 / 1.5 s
