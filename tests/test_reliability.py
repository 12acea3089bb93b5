"""Reliability at scale: kill -9 and resume, preemption signals, damaged checkpoints, faulty ranks, bad input.

Runs are tiny (neuclip-tiny, 64 synthetic samples, batch 8: 8 steps per epoch, 2 epochs), on one thread. A run that must
die is a real subprocess killed by a real signal; the uninterrupted baselines and most relaunches run
in-process through `main()`, whose returned history holds every step's logged loss terms.
"""
import glob
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace

import open_clip
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training  # noqa: F401  (registers neuclip-tiny)
from training.checkpoint import read_checkpoint
from training.data.loader import get_data
from training.main import main
from training.params import parse_args
from training import preemption
from training.observers import StepResult
from training.preemption import EXIT_REQUEUE, StepCheckpoints, StopSignals, slurm_job_id
from training.data.synthetic.shards import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "src", "training", "main.py")
STEPS_PER_EPOCH, EPOCHS = 8, 2
METHODS = {
    "openclip": [],
    "fastclip": ["--fastclip", "--multiply_tau", "--fastclip_eps", "1e-6"],
    "neuclip": ["--fastclip", "--multiply_tau", "--fastclip_eps", "1e-6", "--npn", "--npn_num_protos", "16",
                "--npn_repetition", "2", "--npn_restart_iter", "5", "--npn_lr", "0.05"],
}


def flags(logs, name, method, *extra):
    return ["--logs", str(logs), "--name", name, "--model", "neuclip-tiny", "--dataset-type", "synthetic",
            "--synthetic-num-samples", "64", "--batch-size", "8", "--epochs", str(EPOCHS), "--workers", "0",
            "--warmup", "3", "--lr", "1e-3", "--precision", "fp32", "--seed", "7", "--log-every-n-steps", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "", *METHODS[method], *extra]


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """Uninterrupted runs, one per method, computed on first use: {method: {step: terms}}."""
    logs, cache = tmp_path_factory.mktemp("baselines"), {}

    def get(method):
        if method not in cache:
            cache[method] = dict(main(flags(logs, method, method))["history"])
        return cache[method]
    return get


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def launch(argv, log_path, env=None, **popen):
    with open(log_path, "w") as out:
        return subprocess.Popen([sys.executable, "-u", SCRIPT, *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=env or clean_env(), **popen)


def wait_until(condition, procs, timeout=180.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        finished = [p for p in procs if p.poll() is not None]
        assert not finished, f"process exited ({finished[0].returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_losses(history, baseline, first_step):
    assert [step for step, _ in history] == list(range(first_step, STEPS_PER_EPOCH * EPOCHS + 1))
    for step, terms in history:
        assert terms == baseline[step], f"step {step}: {terms} != {baseline[step]}"


def resumed_step(run_dir) -> int:
    found = re.findall(r"Resumed from \S+ at epoch \d+, batch \d+, step (\d+)", open(run_dir / "out.log").read())
    return int(found[-1])


# ------------------------------------------------------------------------ kill -9, signals, resume

@pytest.mark.parametrize("method", list(METHODS))
def test_kill9_mid_epoch_then_same_command_continues_exactly(tmp_path, baselines, method):
    argv = flags(tmp_path, "run", method, "--save-every-n-steps", "3")
    ckpts = tmp_path / "run" / "checkpoints"
    proc = launch(argv, tmp_path / "killed.log")
    wait_until(lambda: (ckpts / "iter_6.pt").exists(), [proc], what="iter_6.pt")  # epoch 0, batch 6
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL

    summary = main(argv)  # the same command: resumes from the newest valid checkpoint
    start = resumed_step(tmp_path / "run")
    assert (start % 3 == 0 or start == STEPS_PER_EPOCH) and 6 <= start < STEPS_PER_EPOCH * EPOCHS  # iter_, epoch_1
    assert_same_losses(summary["history"], baselines(method), start + 1)
    assert not glob.glob(str(ckpts / "*.tmp*"))


@pytest.mark.parametrize("sig, method", [(signal.SIGTERM, "fastclip"), (signal.SIGUSR1, "neuclip")])
def test_signal_checkpoints_exits_75_and_relaunch_finishes_exactly(tmp_path, baselines, sig, method):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = clean_env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # No periodic checkpoints: the signal's is the only one. A DataLoader worker, which gets the signal too
    # (slurm signals every process of the step; here: the process group), must not fail the step.
    argv = flags(tmp_path, "run", method, "--workers", "1")
    run = tmp_path / "run"
    proc = launch(argv, tmp_path / "signalled.log", env=env, start_new_session=True)
    wait_until(lambda: (run / "out.log").exists() and "Train Epoch: 0 [3/8" in (run / "out.log").read_text(),
               [proc], what="step 3")
    os.killpg(proc.pid, sig)
    assert proc.wait(60) == EXIT_REQUEUE, (tmp_path / "signalled.log").read_text()[-3000:]
    written = glob.glob(str(run / "checkpoints" / "iter_*.pt"))
    assert len(written) == 1
    step = read_checkpoint(written[0])["step"]
    assert 3 <= step < STEPS_PER_EPOCH * EPOCHS
    requeued = (tmp_path / "scontrol.log").read_text().split() if (tmp_path / "scontrol.log").exists() else []
    assert requeued == (["requeue", "4242"] if sig == signal.SIGUSR1 else [])

    summary = main(argv)  # workers 1 or 0, the same batches: augmentations are per sample
    assert resumed_step(run) == step
    assert_same_losses(summary["history"], baselines(method), step + 1)


def test_checkpoint_schedule_by_steps_minutes_and_signal(monkeypatch):
    clock, saved = [0.0], []
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    args = Namespace(save_every_n_steps=5, save_every_n_minutes=1.0, no_requeue=False, is_master=True)
    signals = StopSignals()
    control = StepCheckpoints(args, signals, lambda position: saved.append(position) or "ckpt.pt", "cpu")
    assert not control.after_step(StepResult(1, 0, 1, 8)) and saved == []
    clock[0] = 61.0  # a minute since the start: due
    assert not control.after_step(StepResult(2, 0, 2, 8)) and saved == [{"epoch": 0, "batch": 2}]
    clock[0] = 100.0  # 39 s since that checkpoint: not due; step 5: due
    assert not control.after_step(StepResult(3, 0, 3, 8)) and len(saved) == 1
    assert not control.after_step(StepResult(5, 0, 5, 8)) and saved[-1] == {"epoch": 0, "batch": 5}
    signals.code = 1  # what the SIGTERM handler sets
    assert not control.after_step(StepResult(8, 0, 8, 8))  # the epoch's last step: left to at_epoch_end
    assert control.at_epoch_end(8, 1) and saved[-1] == {"epoch": 1, "batch": 0}
    assert control.stopped_at == (8, "ckpt.pt")
    assert slurm_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3"}) == "7_3"
    assert slurm_job_id({}) is None


def tensorboard_losses(run_dir, tag="train/loss") -> list[dict]:
    """{step: value} of each event file (one per launch), oldest launch first."""
    files = sorted(glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*")),
                   key=lambda f: int(f.split(".tfevents.")[1].split(".")[0]))
    out = []
    for path in files:
        acc = EventAccumulator(path)
        acc.Reload()
        out.append({e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {})
    return out


def test_kill9_two_gloo_ranks_torchrun_then_same_command(tmp_path, baselines):
    """NeuCLIP on 2 ranks x 4 = the 1-process baseline's global batch of 8 (augmentations are per sample,
    so the data is the same): the relaunched steps match it, and the steps both launches computed match
    bit for bit."""
    env = clean_env()
    argv = flags(tmp_path, "two", "neuclip", "--batch-size", "4", "--save-every-n-steps", "3",
                 "--report-to", "tensorboard")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "training.main", "--", *argv]
    ckpts = tmp_path / "two" / "checkpoints"
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: (ckpts / "iter_6.pt").exists(), [proc], what="iter_6.pt")
    os.killpg(proc.pid, signal.SIGKILL)  # the agent and both workers, as a lost node would
    proc.wait(30)

    cmd[cmd.index("--master_port") + 1] = str(free_port())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    start = resumed_step(tmp_path / "two")
    killed, relaunched = tensorboard_losses(tmp_path / "two")
    # TensorBoard numbers steps from 0 as open_clip does; the baselines' history counts them from 1
    assert sorted(relaunched) == list(range(start, STEPS_PER_EPOCH * EPOCHS))
    overlap = set(killed) & set(relaunched)
    assert all(killed[s] == relaunched[s] for s in overlap), overlap
    baseline = baselines("neuclip")
    assert [relaunched[s] for s in sorted(relaunched)] == pytest.approx(
        [baseline[s + 1]["loss"] for s in sorted(relaunched)], rel=1e-5)


def srun_like(argv, tmp_path, ranks=2, **env):
    """What `srun python -u src/training/main.py ...` starts: one process per rank with slurm's variables."""
    base = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **env)
    return [launch(argv, tmp_path / f"rank{r}.log",
                   env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": str(ranks)})
            for r in range(ranks)]


def test_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    procs = srun_like(flags(tmp_path, "run", "openclip", "--batch-size", "4"), tmp_path)
    log0 = tmp_path / "run" / "out.log"
    wait_until(lambda: log0.exists() and "Train Epoch: 0 [2/8" in log0.read_text(), procs, what="step 2")
    procs[1].send_signal(signal.SIGTERM)  # only rank 1 hears it
    codes = [p.wait(120) for p in procs]
    assert codes == [EXIT_REQUEUE, EXIT_REQUEUE], (tmp_path / "rank0.log").read_text()[-3000:]
    (path,) = glob.glob(str(tmp_path / "run" / "checkpoints" / "iter_*.pt"))
    ckpt = read_checkpoint(path)
    assert len(ckpt["rng"]) == 2 and ckpt["data_position"]["global_batch"] == 8
    assert f"stopping at step {ckpt['step']}" in log0.read_text()


# ------------------------------------------------------------------------------- faulty ranks

def garbage_shard_argv(tmp_path, bad_rank: int) -> list[str]:
    """Two shards of 8 samples, one per rank; the one rank `bad_rank` reads in epoch 0 is garbage."""
    write_shards(str(tmp_path / "shards"), 16, samples_per_shard=8)
    order = [str(tmp_path / "shards" / f"{i:05d}.tar") for i in range(2)]
    random.Random(7 + 0).shuffle(order)  # EpochShuffledShards: seed + epoch; rank r takes order[r]
    with open(order[bad_rank], "wb") as f:
        f.write(b"this is not a tar file" * 100)
    return [*flags(tmp_path, "run", "openclip", "--batch-size", "4"), "--dataset-type", "webdataset",
            "--train-data", str(tmp_path / "shards" / "{00000..00001}.tar"), "--train-num-samples", "16",
            "--dist-timeout-minutes", "1"]

def test_rank_whose_data_runs_out_brings_the_job_down_naming_it(tmp_path):
    """Rank 1's only shard is garbage: it gets no batch, raises, and rank 0 (waiting in a collective)
    fails too instead of hanging, and its log says what happened on rank 1."""
    argv = garbage_shard_argv(tmp_path, bad_rank=1)
    procs = srun_like(argv, tmp_path)
    codes = [p.wait(120) for p in procs]
    rank0 = (tmp_path / "rank0.log").read_text()
    assert all(code not in (0, EXIT_REQUEUE) for code in codes), rank0[-3000:]
    assert re.search(r"rank 1 reported: RuntimeError: this rank got 0 of its \d+ batches", rank0), rank0[-3000:]


def test_hung_rank_times_out_naming_it(tmp_path):
    argv = flags(tmp_path, "run", "openclip", "--batch-size", "4", "--save-every-n-steps", "2",
                 "--dist-timeout-minutes", "0.25")
    procs = srun_like(argv, tmp_path)
    try:
        wait_until(lambda: (tmp_path / "run" / "checkpoints" / "iter_2.pt").exists(), procs, what="iter_2.pt")
        procs[1].send_signal(signal.SIGSTOP)  # alive, holding its sockets, never answering
        assert procs[0].wait(120) not in (0, EXIT_REQUEUE)
    finally:
        procs[1].kill()
        procs[1].wait(30)
    rank0 = (tmp_path / "rank0.log").read_text()
    assert re.search(r"rank\(s\) 1 did not report|Rank 1 failed to pass monitoredBarrier", rank0), rank0[-3000:]


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_advice(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(FloatingPointError, match=r"3 consecutive non-finite steps: lower --lr"):
        main(flags(tmp_path, "nan", "openclip", "--lr", "1e20", "--warmup", "1", "--max-nonfinite-steps", "3"))
    assert re.search(r"non-finite gradient at step \d+: step skipped \(1 so far\)", caplog.text)


# --------------------------------------------------------------------------- damaged checkpoints

def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, baselines, caplog):
    argv = flags(tmp_path, "run", "openclip", "--save-every-n-steps", "2", "--stop_epochs", "1",
                 "--save-frequency", "0")
    main(argv)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["iter_4.pt", "iter_6.pt"]  # --keep-last-k 2, no temporary files
    model, _, _ = open_clip.create_model_and_transforms("neuclip-tiny", pretrained=str(ckpts / "iter_6.pt"))
    with open(ckpts / "iter_6.pt", "r+b") as f:  # a write cut short
        f.truncate(os.path.getsize(ckpts / "iter_6.pt") // 2)
    torch.save({"state_dict": model.state_dict(), "step": 50}, ckpts / "iter_50.pt")  # not a training checkpoint
    caplog.set_level(logging.WARNING)
    summary = main(argv)
    assert re.search(r"iter_6\.pt cannot be read \(truncated or corrupt\?\)", caplog.text)
    assert re.search(r"iter_50\.pt lacks .*optimizer", caplog.text)
    assert resumed_step(tmp_path / "run") == 4
    assert [s for s, _ in summary["history"]] == [5, 6, 7, 8]
    baseline = baselines("openclip")
    assert all(terms == baseline[s] for s, terms in summary["history"])
    assert sorted(os.listdir(ckpts)) == ["iter_4.pt", "iter_50.pt.corrupt", "iter_6.pt", "iter_6.pt.corrupt"]
    # Going back explicitly sets the newer checkpoints aside: a later automatic resume must not return to them.
    main([*argv, "--resume", str(ckpts / "iter_4.pt"), "--stop_epochs", "0"])
    assert "iter_6.pt is from beyond step 4, where this run resumes; renamed to iter_6.pt.superseded" in caplog.text


# ------------------------------------------------------------------------------------ bad input

def test_resume_with_another_world_size_or_batch_size_warns_and_maps_the_position(tmp_path, caplog):
    argv = flags(tmp_path, "run", "openclip", "--save-every-n-steps", "3", "--stop_epochs", "1",
                 "--save-frequency", "0")
    main(argv)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "iter_6.pt", weights_only=True)
    ckpt["rng"], ckpt["world_size"], ckpt["batch_size"] = ckpt["rng"] * 2, 2, 4  # as if from 2 ranks x 4
    torch.save(ckpt, tmp_path / "two_ranks.pt")
    caplog.set_level(logging.WARNING)
    summary = main(flags(tmp_path, "one_rank", "openclip", "--stop_epochs", "1",
                         "--resume", str(tmp_path / "two_ranks.pt")))
    assert "written by 2 ranks, this run has 1: RNG states not restored" in caplog.text
    assert "--batch-size 4, this run uses 8" in caplog.text
    assert [s for s, _ in summary["history"]] == [7, 8]  # the same global batch: the same position
    # The same folder relaunched with twice the batch: 6 batches of 8 are 3 of 16, of 4 per epoch.
    summary = main([*argv, "--batch-size", "16"])
    assert "flags differ from the run folder's params.txt: batch_size: 8 -> 16" in caplog.text
    assert "global batch of 8, this run has 16: resuming epoch 0 at batch 3" in caplog.text
    assert [s for s, _ in summary["history"]] == [7]


def test_checkpoint_of_another_model_or_method_or_nowhere(tmp_path, caplog):
    model = open_clip.create_model("neuclip-tiny")
    other = dict(model.state_dict(), text_projection=torch.zeros(64, 32))
    torch.save({"state_dict": other}, tmp_path / "other_model.pt")
    with pytest.raises(RuntimeError, match=r"other_model\.pt does not fit --model neuclip-tiny.*another --model"):
        main(flags(tmp_path, "model", "openclip", "--resume", str(tmp_path / "other_model.pt")))
    with pytest.raises(FileNotFoundError, match=r"--resume \S*nowhere\.pt: no such checkpoint file"):
        main(flags(tmp_path, "nowhere", "openclip", "--resume", str(tmp_path / "nowhere.pt")))
    torch.save({"state_dict": model.state_dict(), "optimizer": {}, "method_name": "gcl", "step": 0},
               tmp_path / "fastclip.pt")
    caplog.set_level(logging.WARNING)
    summary = main(flags(tmp_path, "method", "openclip", "--epochs", "1", "--resume", str(tmp_path / "fastclip.pt")))
    assert "trained with method gcl, this run uses openclip: only the model weights are restored" in caplog.text
    assert summary["step"] == STEPS_PER_EPOCH


@pytest.mark.parametrize("extra, message", [
    (["--keep-last-k", "0"], "--keep-last-k must be ≥ 1"),
    (["--save-every-n-steps", "-1"], "--save-every-n-steps must be ≥ 0"),
    (["--dist-timeout-minutes", "0"], "--dist-timeout-minutes must be > 0"),
])
def test_conflicting_reliability_flags_fail_at_once(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        main(flags(tmp_path, "bad", "openclip", *extra))
    assert message in capsys.readouterr().err


def test_empty_and_garbage_shards_are_skipped_and_counted(tmp_path):
    write_shards(str(tmp_path), 8, samples_per_shard=8)
    open(tmp_path / "00001.tar", "wb").close()  # empty
    (tmp_path / "00002.tar").write_bytes(b"\0garbage" * 64)
    args = parse_args(["--train-data", str(tmp_path / "{00000..00002}.tar"), "--train-num-samples", "16",
                       "--batch-size", "4", "--workers", "0"])
    args.rank, args.world_size = 0, 1
    info = get_data(args, lambda im: torch.zeros(1), None, lambda texts: torch.zeros(len(texts), 2))["train"]
    info.set_epoch(0)
    assert len(list(info.dataloader)) == 4 and info.skipped() >= 2


@pytest.mark.parametrize("source, workers", [("synthetic", 0), ("shards", 2)])
def test_resumed_pass_yields_the_same_batches_and_augmentations(tmp_path, source, workers):
    """set_epoch(e, start_batch=k) yields batches k.. of the epoch, augmented identically, whatever the
    workers (map-style: skipped in the sampler; shards: read and dropped)."""
    args = parse_args(["--batch-size", "4", "--workers", str(workers), "--seed", "1", "--synthetic-num-samples",
                       "32", "--train-num-samples", "32"])
    args.rank, args.world_size, args.data_size = 0, 1, 32
    if source == "shards":
        write_shards(str(tmp_path), 32, samples_per_shard=8)
        args.train_data, args.dataset_type = str(tmp_path / "{00000..00003}.tar"), "webdataset"
    else:
        args.dataset_type = "synthetic"
    _, augment, _ = open_clip.create_model_and_transforms("neuclip-tiny")  # random crops
    info = get_data(args, augment, augment, open_clip.get_tokenizer("neuclip-tiny"))["train"]
    info.set_epoch(1)
    full = list(info.dataloader)
    info.set_epoch(1, start_batch=3)
    resumed = list(info.dataloader)
    assert len(full) == 8 and len(resumed) == 5
    for (a_img, a_txt, a_key), (b_img, b_txt, b_key) in zip(full[3:], resumed):
        assert torch.equal(a_key, b_key) and torch.equal(a_txt, b_txt) and torch.equal(a_img, b_img)


ABANDONED_LOADER = """
import sys, time, torch
sys.path.insert(0, {src!r})
from torch.utils.data import DataLoader, Dataset
from training.data.workers import ignore_stop_signals

class Slow(Dataset):
    def __len__(self):
        return 100
    def __getitem__(self, i):
        if i > 0:
            time.sleep(600)  # a worker busy in a slow read when the training process fails
        return torch.zeros(1 << 20)

it = iter(DataLoader(Slow(), batch_size=1, num_workers=1, worker_init_fn=ignore_stop_signals, prefetch_factor=4))
next(it)
raise SystemExit(3)  # the training process fails with a loader mid-epoch
"""


def test_process_with_an_abandoned_loader_exits_despite_workers_ignoring_sigterm(tmp_path):
    """Workers ignore SIGTERM (slurm signals the whole step); multiprocessing's exit handler SIGTERMs and then
    joins daemonic children, so without training.data.loader's atexit hook this process would never exit."""
    script = tmp_path / "abandon.py"
    script.write_text(ABANDONED_LOADER.format(src=os.path.join(ROOT, "src")))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert time.perf_counter() - start < 60
