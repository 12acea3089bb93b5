"""Process-group set-up for torchrun, srun and plain single-process runs.

torchrun exports LOCAL_RANK/RANK/WORLD_SIZE; srun exports SLURM_LOCALID/SLURM_PROCID/SLURM_NTASKS
(MASTER_ADDR/MASTER_PORT come from the job script). With neither, the run is a single process and
no process group is created.

Faults: every collective gives up after --dist-timeout-minutes instead of waiting forever. On gloo,
`barrier()` is a monitored barrier, which names the ranks that did not arrive; once a collective has
failed the process group is unusable, so `report_failure` goes through the rendezvous store instead:
each rank that catches an exception posts it there, and rank 0 lists which ranks failed and how, and
which never reported: dead or stuck when rank 0's own error came from a collective giving up, otherwise
most likely waiting for rank 0 in a collective (rank 0 raised first and is the cause). On NCCL, PyTorch's watchdog enforces the
timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING, default 3: tear the process down); see docs/FAULTS.md.
"""
import contextlib
import datetime
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.elastic import agent_store, generation_store

log = logging.getLogger(__name__)
WAIT_REPORT_S = float(os.environ.get("NEUCLIP_WAIT_REPORT_S", 30))  # how often a waiting rank says so
REPORT_WAIT_S = 5.0  # how long rank 0 collects the other ranks' failure reports
# How a collective that failed because of a peer reads (gloo raises plain RuntimeErrors naming its sources)
_PEER_FAILURE = re.compile(r"gloo|nccl|monitoredBarrier|timed out|connection (closed|reset)|broken pipe", re.I)


def failed_in_collective(exc: BaseException) -> bool:
    """True when `exc` is a collective or the store giving up (a peer's fault, most likely); False when
    this rank raised by itself, which leaves its peers waiting for it in their next collective."""
    return isinstance(exc, dist.DistError) or bool(_PEER_FAILURE.search(str(exc)))


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def world_info_from_env() -> tuple[int, int, int]:
    """(local_rank, rank, world_size) from torchrun's or slurm's variables."""
    for local, global_, size in (("LOCAL_RANK", "RANK", "WORLD_SIZE"),
                                 ("SLURM_LOCALID", "SLURM_PROCID", "SLURM_NTASKS")):
        if global_ in os.environ and size in os.environ:
            return int(os.environ.get(local, 0)), int(os.environ[global_]), int(os.environ[size])
    return 0, 0, 1


@contextlib.contextmanager
def saying_while_waiting(what: str, every_s: float | None = None):
    """Log `what` and the time waited so far every `every_s` seconds until the block ends: forming the
    process group waits for every rank, and minutes of silence there look like a hang (a rank that never
    started, a wrong MASTER_ADDR, a stale rendezvous). Logged by each rank, since each waits for itself."""
    every_s = WAIT_REPORT_S if every_s is None else every_s
    done, start = threading.Event(), time.monotonic()

    def report():
        while not done.wait(every_s):
            log.warning("%s: still waiting after %.0f s (every rank must get here; --dist-timeout-minutes "
                        "gives up)", what, time.monotonic() - start)
    thread = threading.Thread(target=report, name="wait-report", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    waited = time.monotonic() - start
    if waited >= every_s:
        log.info("%s: formed after %.0f s", what, waited)


def init_distributed(device_arg: str | None = None, backend: str | None = None,
                     timeout_minutes: float = 30.0) -> DistInfo:
    local_rank, rank, world_size = world_info_from_env()
    use_cuda = torch.cuda.is_available() if device_arg is None else device_arg.startswith("cuda")
    if use_cuda:
        device = torch.device("cuda", local_rank if device_arg in (None, "cuda") else
                              torch.device(device_arg).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_arg or "cpu")
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"{var} is not set: export it in the job script (the reference slurm "
                                   "script sets MASTER_ADDR to the first node and MASTER_PORT=12805)")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        with saying_while_waiting(f"rank {rank} of {world_size}: forming the process group at "
                                  f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"):
            store = agent_store(timeout)  # torchrun: a key space of this start's own (training.elastic)
            how = {"store": generation_store(store, rank, world_size, timeout)} if store else {"init_method": "env://"}
            dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), rank=rank,
                                    world_size=world_size, timeout=timeout, **how)
    elif world_size == 1:
        agent_store(timeout)  # one rank under torchrun: the store keeps the default run name across restarts
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP on GPU and CPU alike (device_ids only for CUDA: passing them on CPU raises)."""
    if not info.distributed:
        return model
    device_ids = [info.device] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """All ranks meet. On gloo a monitored barrier: past the process group's timeout it raises naming
    every rank that did not arrive, rather than a bare timeout."""
    if not is_distributed():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(wait_all_ranks=True)
    else:
        dist.barrier()


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def report_failure(exc: BaseException) -> None:
    """Best effort, after an exception on this rank: post it to the rendezvous store; on rank 0, wait a
    few seconds for the other ranks' reports and log who failed how, and who never reported."""
    if not is_distributed():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    log.error("rank %d of %d failed: %s", rank, world, text)
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=REPORT_WAIT_S))
        prefix = f"neuclip_failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.set(f"{prefix}/{rank}", text)
        store.add(f"{prefix}/count", 1)
        if rank != 0:
            return
        deadline = time.monotonic() + REPORT_WAIT_S
        while store.add(f"{prefix}/count", 0) < world and time.monotonic() < deadline:
            time.sleep(0.2)
        reports = {r: store.get(f"{prefix}/{r}").decode() for r in range(world) if store.check([f"{prefix}/{r}"])}
    except Exception as store_exc:  # the store lived in a process that is gone, or timed out
        log.error("could not collect the other ranks' failure reports (%s): check every rank's log", store_exc)
        return
    silent = [r for r in range(world) if r not in reports]
    for r, message in sorted(reports.items()):
        if r != 0:
            log.error("rank %d reported: %s", r, message)
    if silent and not failed_in_collective(exc):  # rank 0 failed first: the others cannot report yet
        log.error("rank(s) %s had not reported a failure within %.0f s: most likely waiting for rank 0 in a "
                  "collective; rank 0's error above is the cause", ", ".join(map(str, silent)), REPORT_WAIT_S)
    elif silent:
        log.error("rank(s) %s did not report within %.0f s: dead (killed, out of memory, node lost) or stuck "
                  "outside a collective; look at their logs first", ", ".join(map(str, silent)), REPORT_WAIT_S)


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
