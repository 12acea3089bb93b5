"""The preemption flags on 2 real gloo ranks: the all-reduce of (signal, checkpoint due) is read one
boundary late (on a GPU, reading it at once would hold the host until the step's GPU work ended), and
the ranks still agree on every checkpoint and on the stop step."""
import datetime
import json
import os
import socket
from argparse import Namespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training import preemption
from training.observers import StepResult
from training.preemption import StepCheckpoints, StopSignals

WORLD = 2


def _script(rank: int) -> dict:
    clock = [0.0]
    preemption.time.monotonic = lambda: clock[0]  # this spawned process only
    args = Namespace(save_every_n_steps=0, save_every_n_minutes=1.0, no_requeue=True, is_master=rank == 0)
    signals, saved = StopSignals(), []
    control = StepCheckpoints(args, signals, lambda position: saved.append(position) or f"iter_{position['batch']}.pt",
                              "cpu")
    mid_epoch = []
    for step in range(1, 8):
        if step == 2:
            clock[0] = 61.0  # rank 0's clock: a --save-every-n-minutes 1 checkpoint is due
        if step == 5 and rank == 1:
            signals.code = 1  # SIGTERM reaches rank 1 only
        mid_epoch.append([step, control.after_step(StepResult(step, 0, step, 100)), len(saved)])
        if control.stopped_at:
            break
    first = {"steps": mid_epoch, "saved": saved, "stopped_at": control.stopped_at}

    # At the epoch end the flags are read at once: a signal during the epoch's evaluation stops there.
    signals2, saved2 = StopSignals(), []
    control2 = StepCheckpoints(Namespace(save_every_n_steps=0, save_every_n_minutes=0, no_requeue=True,
                                         is_master=rank == 0), signals2,
                               lambda position: saved2.append(position) or "epoch.pt", "cpu")
    assert not control2.after_step(StepResult(1, 0, 1, 2))
    if rank == 0:
        signals2.code = 2  # SIGUSR1 on rank 0 only, after the last mid-epoch boundary
    stopped = control2.at_epoch_end(2, 1)
    return {**first, "epoch_end": [stopped, saved2, control2.stopped_at]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # Ranks that disagree on the stop step wait for each other in a barrier: fail in seconds, not hang.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=20))
    try:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(_script(rank), f)
    finally:
        dist.destroy_process_group()


def test_ranks_read_the_flags_one_step_late_and_agree_on_checkpoints_and_stop(tmp_path):
    """Bugs caught: ranks acting on their own flags instead of the reduced ones (rank 0 would not stop
    at the signal rank 1 heard; rank 1 would not write rank 0's timed checkpoint); a second timed
    checkpoint on the step after the first (rank 0 sending `due` again while the first is in flight); a
    signal during the epoch end left pending (the run would go on into the next epoch); and the flags
    read at the same boundary they are sent (the host wait the late read exists to avoid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert results[0] == results[1]  # every rank made the same decisions at the same steps
    r = results[0]
    # due at boundary 2, written at 3 (one late) and once only; SIGTERM before boundary 5, stop at 6
    assert r["steps"] == [[1, False, 0], [2, False, 0], [3, False, 1], [4, False, 1], [5, False, 1],
                          [6, True, 2]]
    assert r["saved"] == [{"epoch": 0, "batch": 3}, {"epoch": 0, "batch": 6}]
    assert r["stopped_at"] == [6, "iter_6.pt"]
    assert r["epoch_end"] == [True, [{"epoch": 1, "batch": 0}], [2, "epoch.pt"]]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_cuda_exchange_does_not_wait_for_queued_gpu_work():
    """Bug caught: the flags read back at once (or copied from pageable memory), which holds the host until
    the step's GPU work is done: here a queued ~1 s GPU sleep would make the exchange take ~1 s."""
    import time

    from training.preemption import RankFlags

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        flags = RankFlags("cuda")
        assert flags.exchange([1, 0]) == [0, 0]  # nothing earlier to read
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU time, queued
        start = time.perf_counter()
        assert flags.exchange([0, 1]) == [1, 0]  # the previous boundary's reduced values
        took = time.perf_counter() - start
        torch.cuda.synchronize()
        waited = time.perf_counter() - start
        assert took < 0.2 * waited, (took, waited)
        assert flags.exchange([0, 0], now=True) == [0, 1]
    finally:
        dist.destroy_process_group()
