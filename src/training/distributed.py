"""Process-group set-up for torchrun, srun and plain single-process runs.

torchrun exports LOCAL_RANK/RANK/WORLD_SIZE; srun exports SLURM_LOCALID/SLURM_PROCID/SLURM_NTASKS
(MASTER_ADDR/MASTER_PORT come from the job script). With neither, the run is a single process and
no process group is created.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"{var} is not set: export it in the job script (the reference slurm "
                                   "script sets MASTER_ADDR to the first node and MASTER_PORT=12805)")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), init_method="env://",
                                rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP on GPU and CPU alike (device_ids only for CUDA: passing them on CPU raises)."""
    if not info.distributed:
        return model
    device_ids = [info.device] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
