"""Realistic faults beyond kill -9 and signals: damaged or unreadable checkpoints, NaN state, a full disk,
state that grows, a second writer, orphaned ranks, a changed split of shards, flags that cannot work.

Runs are tiny (neuclip-tiny, 64 synthetic samples, batch 8: 8 steps per epoch), on one thread; most
relaunches use --stop_epochs 0, which resolves and loads the checkpoint and trains nothing.
"""
import builtins
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import open_clip
import pytest
import torch

import training.checkpoint.files as checkpoint_module
from contrastive.table import PerSampleTable
from training.checkpoint import integrity as checkpoint_integrity
from training.checkpoint import NoUsableCheckpoint, atomic_save, read_checkpoint
from training.checkpoint.integrity import NonFiniteState
from training.data.synthetic.shards import write_shards
from training.main import main
from training.startup.run_lock import LOCK_NAME, RunFolderLocked, holder_record, pid_running

from test_reliability import (SCRIPT, clean_env, flags, free_port, garbage_shard_argv, resumed_step, srun_like,
                              wait_until)

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


def first_epoch(tmp_path, method="openclip", *extra):
    """Epoch 0 with iter_4.pt and iter_6.pt kept (every 2 steps, --keep-last-k 2), no epoch checkpoint."""
    argv = flags(tmp_path, "run", method, "--save-every-n-steps", "2", "--save-frequency", "0", *extra)
    main([*argv, "--stop_epochs", "1"])
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["iter_4.pt", "iter_6.pt"]
    return argv, ckpts


def scribble_in_tensor_data(path, nbytes=1 << 20, seed=0):
    """Random bytes over the middle of the largest member: the pickle stays intact, so torch.load succeeds."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
        header = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    size = min(nbytes, member.compress_size // 2)
    with open(path, "r+b") as f:
        f.seek(header + (member.compress_size - size) // 2)
        f.write(torch.randint(0, 256, (size,), dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(seed)).numpy().tobytes())


# ------------------------------------------------------------------------------------ integrity

def test_random_bytes_in_the_newest_checkpoint_are_detected_and_the_previous_one_is_used(tmp_path, caplog):
    """torch.load ignores the zip CRCs: a scribbled iter_6.pt used to load as garbage weights and be resumed."""
    argv, ckpts = first_epoch(tmp_path)
    scribble_in_tensor_data(ckpts / "iter_6.pt")
    torch.load(ckpts / "iter_6.pt", weights_only=True)  # the damage is invisible to torch.load
    caplog.set_level(logging.WARNING)
    main([*argv, "--stop_epochs", "0"])
    assert resumed_step(tmp_path / "run") == 4
    assert re.search(r"iter_6\.pt is corrupt: member \S+ fails its CRC32 check.*renamed to iter_6\.pt\.corrupt",
                     caplog.text)
    assert sorted(os.listdir(ckpts)) == ["iter_4.pt", "iter_6.pt.corrupt"]


def test_nan_weights_are_never_checkpointed(tmp_path, monkeypatch):
    """Nothing checked parameters before a write: NaN weights became the newest checkpoint, and keep-last-k
    then deleted the good ones."""
    real_step, calls = torch.optim.AdamW.step, [0]

    def step_then_break(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:  # after step 3: a parameter goes NaN (a bad update, a flipped bit)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_break)
    with pytest.raises(NonFiniteState, match=r"not writing a checkpoint at step 4: \S+ is not finite"):
        main(flags(tmp_path, "run", "openclip", "--save-every-n-steps", "2", "--max-nonfinite-steps", "100"))
    ckpts = tmp_path / "run" / "checkpoints"
    assert os.listdir(ckpts) == ["iter_2.pt"]
    read_checkpoint(str(ckpts / "iter_2.pt"))  # intact and finite
    assert "run failed: NonFiniteState: not writing" in (tmp_path / "run" / "out.log").read_text()


def test_a_nan_checkpoint_on_disk_is_treated_as_damaged(tmp_path, caplog):
    """A checkpoint written before this check (or by another tool) with NaN weights must not be resumed."""
    argv, ckpts = first_epoch(tmp_path)
    ckpt = torch.load(ckpts / "iter_6.pt", weights_only=True)
    next(iter(ckpt["state_dict"].values())).fill_(float("nan"))
    torch.save(ckpt, ckpts / "iter_6.pt")
    caplog.set_level(logging.WARNING)
    main([*argv, "--stop_epochs", "0"])
    assert resumed_step(tmp_path / "run") == 4
    assert "iter_6.pt holds non-finite values in" in caplog.text


def test_full_disk_keeps_its_errno(tmp_path, monkeypatch):
    """torch's zip writer reported ENOSPC as `unexpected pos N vs M`, losing the cause; the temporary file
    must not be left behind either (it holds the space a retry needs)."""
    monkeypatch.setattr(checkpoint_module, "open", lambda path, mode: builtins.open("/dev/full", "wb"),
                        raising=False)
    with pytest.raises(OSError, match=r"cannot write checkpoint \S+iter_9\.pt: No space left on device") as caught:
        atomic_save({"weights": torch.zeros(1 << 18)}, str(tmp_path / "iter_9.pt"))
    assert caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------------------------- a floor

def failing_torch_load(monkeypatch, times):
    """torch.load raises EIO the first `times` calls (a network file system hiccup), then works."""
    real_load, calls = torch.load, [0]

    def load(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= times:
            raise OSError(errno.EIO, "Input/output error")
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(checkpoint_integrity, "READ_BACKOFF_S", 0.01)
    return calls


def test_a_transient_read_error_is_retried(tmp_path, monkeypatch, caplog):
    """An EIO during torch.load used to mark a good checkpoint .corrupt and fall back (or start over)."""
    argv, ckpts = first_epoch(tmp_path)
    failing_torch_load(monkeypatch, times=1)
    caplog.set_level(logging.WARNING)
    main([*argv, "--stop_epochs", "0"])
    assert resumed_step(tmp_path / "run") == 6
    assert "Input/output error): retrying" in caplog.text
    assert sorted(os.listdir(ckpts)) == ["iter_4.pt", "iter_6.pt"]


def test_unreadable_checkpoints_stop_the_run_and_stay_untouched(tmp_path, monkeypatch):
    """A persistent EIO used to rename every (good) checkpoint .corrupt and silently train from step 0."""
    argv, ckpts = first_epoch(tmp_path)
    failing_torch_load(monkeypatch, times=10**9)
    with pytest.raises(NoUsableCheckpoint, match=r"could not be read \(left untouched\): iter_4\.pt, iter_6\.pt\. "
                                                  r".*--resume-fresh"):
        main([*argv, "--stop_epochs", "0"])
    assert sorted(os.listdir(ckpts)) == ["iter_4.pt", "iter_6.pt"]
    assert "run failed: NoUsableCheckpoint" in (tmp_path / "run" / "out.log").read_text()


def test_all_checkpoints_damaged_refuses_every_launch_until_resume_fresh(tmp_path):
    """With every checkpoint damaged the run printed "no checkpoint yet" and trained from step 0, exit 0;
    and the launch after that one, which found only .corrupt files, did the same."""
    argv, ckpts = first_epoch(tmp_path)
    for name in ("iter_4.pt", "iter_6.pt"):
        with open(ckpts / name, "r+b") as f:
            f.truncate(1000)
    for _ in range(2):
        with pytest.raises(NoUsableCheckpoint, match=r"damaged \(set aside\): iter_4\.pt\.corrupt, iter_6\.pt\.corrupt"):
            main([*argv, "--stop_epochs", "0"])
    summary = main([*argv, "--resume-fresh", "--epochs", "1"])
    assert [s for s, _ in summary["history"]][0] == 1
    assert sorted(os.listdir(ckpts)) == ["epoch_1.pt", "iter_4.pt", "iter_4.pt.corrupt.discarded", "iter_6.pt",
                                         "iter_6.pt.corrupt.discarded"]


# ---------------------------------------------------------------------------------- state that grows

def test_larger_data_size_resumes_with_the_tables_grown(tmp_path, caplog):
    """Following "set --data_size to max key + 1" made the run unresumable: size mismatch for log_u_img."""
    argv, ckpts = first_epoch(tmp_path, "fastclip")
    before = read_checkpoint(str(ckpts / "iter_6.pt"))["method"]
    caplog.set_level(logging.INFO)
    main([*argv, "--data_size", "128"])  # finishes epoch 1 and writes epoch_2.pt
    assert "per-sample state resized from 64 to 128 keys" in caplog.text
    after = read_checkpoint(str(ckpts / "epoch_2.pt"))["method"]
    for name, old in before.items():
        if name.endswith("log_u_img"):
            assert after[name].shape == (128,) and torch.isfinite(after[name][:64]).all()
            assert torch.isneginf(after[name][64:]).all()  # keys 64.. never seen


def test_per_sample_table_grows_and_refuses_to_drop_state():
    """Shrinking silently would drop the state of keys beyond the new size; unset entries may go."""
    small = PerSampleTable(4, {"u": (torch.float32, -float("inf"))}, owner="test")
    small.u[:3] = torch.tensor([1.0, 2.0, 3.0])
    big = PerSampleTable(6, {"u": (torch.float32, -float("inf"))}, owner="test")
    big.load_state_dict(small.state_dict())
    assert big.u.tolist() == [1.0, 2.0, 3.0, -float("inf"), -float("inf"), -float("inf")]
    tiny = PerSampleTable(3, {"u": (torch.float32, -float("inf"))}, owner="test")
    tiny.load_state_dict(small.state_dict())  # key 3 was never set: nothing is lost
    with pytest.raises(ValueError, match=r"per-sample state for 6 keys, this run has --data_size 2.*--data_size 6"):
        PerSampleTable(2, {"u": (torch.float32, -float("inf"))}, owner="test").load_state_dict(big.state_dict())


def test_another_npn_num_protos_is_refused_in_one_line(tmp_path):
    """A different --npn_num_protos gave a raw `size mismatch for ...` traceback."""
    argv, _ = first_epoch(tmp_path, "neuclip")
    with pytest.raises(ValueError, match=r"^\S+iter_6\.pt was written with --npn_num_protos 16, this run has "
                                         r"--npn_num_protos 32: .*relaunch with --npn_num_protos 16") as caught:
        main([*argv, "--npn_num_protos", "32", "--stop_epochs", "0"])
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------- one writer per folder

def test_second_launch_into_a_live_run_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, caplog):
    """Nothing stopped two launches training into one run folder at the same time."""
    import json
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run / LOCK_NAME).write_text(json.dumps(holder_record(holder.pid)))
        with pytest.raises(RunFolderLocked, match=rf"in use by another run \(\S+, PID {holder.pid}, since "):
            main(flags(tmp_path, "run", "openclip", "--stop_epochs", "0"))
    finally:
        holder.kill()
        holder.wait(30)
    assert not pid_running(holder.pid)
    caplog.set_level(logging.WARNING)
    main(flags(tmp_path, "run", "openclip", "--stop_epochs", "0"))  # the holder is gone: taken over
    assert re.search(rf"taking over the run folder's lock .*PID {holder.pid} is not running", caplog.text)
    assert not (run / LOCK_NAME).exists()  # released at the end


def worker_pids(agent_pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == agent_pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def test_ranks_die_with_their_torchrun_agent(tmp_path):
    """torchrun puts each worker in a session of its own: kill -9 of the agent left both ranks training."""
    argv = flags(tmp_path, "two", "openclip", "--batch-size", "4", "--epochs", "1000")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "training.main", "--", *argv]
    log0 = tmp_path / "two" / "out.log"
    with open(tmp_path / "torchrun.log", "w") as out:
        agent = subprocess.Popen(cmd, env=clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        wait_until(lambda: log0.exists() and "Train Epoch: 0 [2/" in log0.read_text(), [agent], what="step 2")
        workers = worker_pids(agent.pid)
        assert len(workers) == 2, workers
        agent.kill()  # the agent only: its workers are in sessions of their own
        agent.wait(30)
        deadline = time.monotonic() + 20
        while any(pid_running(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if pid_running(p)], "workers outlived their torchrun agent"
    finally:
        for pid in workers:
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()


# --------------------------------------------------------------------------------- data position

def test_shard_run_resumed_mid_epoch_with_other_workers_is_refused(tmp_path):
    """With another --workers the same position means other samples: 234 of 1024 were seen twice, with only
    a "flags differ" warning."""
    write_shards(str(tmp_path / "shards"), 32, samples_per_shard=8)
    argv = [*flags(tmp_path, "run", "openclip", "--batch-size", "4", "--workers", "2", "--save-every-n-steps", "3",
                   "--save-frequency", "0"),
            "--dataset-type", "webdataset", "--train-data", str(tmp_path / "shards" / "{00000..00003}.tar"),
            "--train-num-samples", "32"]
    main([*argv, "--stop_epochs", "1"])
    with pytest.raises(ValueError, match=r"stopped mid-epoch \(epoch 0, batch 6\) of a shard run read by --workers 2 "
                                         r"x 1 process\(es\); this run has --workers 0 x 1.*Finish this epoch with "
                                         r"--workers 2"):
        main([*argv, "--workers", "0", "--stop_epochs", "0"])


# ---------------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("method", ["openclip", "fastclip"])
def test_batch_size_one_is_refused_at_start_up(tmp_path, method):
    """--batch-size 1 crashed FastCLIP with "math domain error" and trained OpenCLIP with loss 0."""
    with pytest.raises(ValueError, match=r"--batch-size 1 on 1 process\(es\) is a global batch of 1: .*--batch-size 2"):
        main(flags(tmp_path, "run", method, "--batch-size", "1"))


def test_fatal_error_of_a_single_process_reaches_out_log(tmp_path):
    """On one process the reason a run stopped went to stderr only, not to the run folder's out.log."""
    model = open_clip.create_model("neuclip-tiny")  # a checkpoint of another shape: found after the folder exists
    torch.save({"state_dict": dict(model.state_dict(), text_projection=torch.zeros(64, 32))}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError):
        main(flags(tmp_path, "run", "openclip", "--resume", str(tmp_path / "other.pt")))
    assert re.search(r"ERROR \| run failed: \w+: .*other\.pt does not fit --model neuclip-tiny",
                     (tmp_path / "run" / "out.log").read_text())


# ------------------------------------------------------------------------------- sample keys

def shard_argv(tmp_path, train_data, *extra):
    return [*flags(tmp_path, "run", "fastclip", "--batch-size", "4", "--stop_epochs", "0"),
            "--dataset-type", "webdataset", "--train-data", train_data, "--train-num-samples", "32", *extra]


def test_key_collision_across_joined_data_sets_is_refused_at_start_up(tmp_path):
    """Two img2dataset sets joined with '::' both number their samples from 0: two samples shared one u slot."""
    for name in ("a", "b"):
        write_shards(str(tmp_path / name), 16, samples_per_shard=8)
    joined = f"{tmp_path / 'a' / '{00000..00001}.tar'}::{tmp_path / 'b' / '{00000..00001}.tar'}"
    with pytest.raises(ValueError, match=r"--train-data parts 1 and 2 \(joined with '::'\) both hold sample key 0 "):
        main(shard_argv(tmp_path, joined, "--data_size", "32"))


@pytest.mark.parametrize("bad_key, message", [(-3, r"sample key -3 \(sample '000000003' of shard \S+\) does not "
                                                   r"fit --data_size 16"),
                                              ("x3", r"sample key 'x3' is not an integer")])
def test_bad_json_key_is_refused_at_start_up(tmp_path, bad_key, message):
    """A negative or non-integer .json key stopped the run mid-epoch, at the batch that held it."""
    import io
    import json
    import tarfile
    write_shards(str(tmp_path), 16, samples_per_shard=8)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(shard, "w") as tar:
        for info, data in members:
            if info.name == "000000003.json":
                data = json.dumps({**json.loads(data), "key": bad_key}).encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=message):
        main(shard_argv(tmp_path, str(tmp_path / "{00000..00001}.tar"), "--data_size", "16",
                        "--train-num-samples", "16"))


def test_rank_0_failing_first_does_not_blame_its_healthy_peer(tmp_path):
    """Rank 0's only shard is garbage, so rank 0 raises while rank 1 waits for it in a collective. Bug:
    rank 0 logged its own error and then 'rank(s) 1 did not report ...: dead ... or stuck', sending the
    reader to a healthy rank's log."""
    argv = garbage_shard_argv(tmp_path, bad_rank=0)
    procs = srun_like(argv, tmp_path)
    codes = [p.wait(120) for p in procs]
    rank0 = (tmp_path / "run" / "out.log").read_text()
    assert all(code != 0 for code in codes), rank0[-3000:]
    assert re.search(r"rank 0 of 2 failed: RuntimeError: this rank got 0 of its \d+ batches", rank0), rank0[-3000:]
    assert "did not report" not in rank0 and "dead" not in rank0, rank0[-3000:]
    assert "had not reported a failure" in rank0, rank0[-3000:]


def test_kill_during_the_epoch_end_evaluation_is_made_up_on_relaunch(tmp_path, monkeypatch):
    """The process dies during epoch 1's zero-shot evaluation, after epoch 1's checkpoint. Bug: the
    relaunch resumed at epoch 1, batch 0 and went on training, so epoch 1's evaluation was never run."""
    import json
    import training.main as main_module

    real_evaluate = main_module.evaluate

    def dying_evaluate(*args, **kwargs):
        monkeypatch.setattr(main_module, "evaluate", real_evaluate)  # dies once, like a kill
        raise KeyboardInterrupt

    monkeypatch.setattr(main_module, "evaluate", dying_evaluate)
    argv = [*flags(tmp_path, "run", "openclip", "--zeroshot-frequency", "1")]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    results = tmp_path / "run" / "checkpoints" / "results.jsonl"
    assert not results.exists() or not results.read_text().strip()
    main(argv)
    epochs = [json.loads(line)["epoch"] for line in results.read_text().splitlines()]
    assert epochs == [1, 2], epochs
    assert "builtin/mean_top1" in json.loads(results.read_text().splitlines()[0])  # the zero-shot line
