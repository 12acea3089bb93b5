"""How many CPU threads torch uses and how many data-loader workers a rank starts.

torch's default (one thread per core of the machine) oversubscribes whenever data-loader workers or
other ranks share those cores: on 2 shared cores with 1 worker, 2 torch threads ran a training step
about 6.5x slower than 1 thread (same losses), since OpenMP threads spin waiting for a core. The policy:
split the cores this process may run on (its affinity mask, which slurm and containers set) between the
ranks on this node, give each rank's data-loader workers one core each, and torch the rest (at least 1).
--workers 0 counts as one worker: the training process then decodes and augments the images itself,
and on 2 busy cores (load 6) a 16-step run with --workers 0 took 55-76 s with 2 torch threads against
29-30 s with 1 (tests/test_startup.py names the command).
Pure standard library: params.py uses `default_workers()` for the --workers default before torch loads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

MAX_DEFAULT_WORKERS = 4


def available_cores() -> int:
    """Cores this process may run on (affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows: no affinity masks
        return max(1, os.cpu_count() or 1)


def local_world_size(env=None) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, slurm's SLURM_NTASKS_PER_NODE, else 1."""
    env = os.environ if env is None else env
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(var, "").split("(")[0]  # slurm may write "4(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cores_per_rank(cores: int, ranks_on_node: int) -> int:
    return max(1, cores // max(1, ranks_on_node))


def default_workers(cores: int | None = None, ranks_on_node: int | None = None) -> int:
    """Workers per rank: one core per worker, leaving a core for the training process, at most 4
    (more rarely helps at these image sizes and each holds a copy of the data pipeline). 0 on a single
    core: the training process then loads the data itself."""
    cores = available_cores() if cores is None else cores
    ranks_on_node = local_world_size() if ranks_on_node is None else ranks_on_node
    return min(MAX_DEFAULT_WORKERS, cores_per_rank(cores, ranks_on_node) - 1)


@dataclass
class ThreadChoice:
    threads: int
    why: str


def choose_threads(*, cores: int, ranks_on_node: int, workers: int, requested: int | None = None,
                   omp_num_threads: str | None = None) -> ThreadChoice:
    """--threads wins, then OMP_NUM_THREADS (the user's or the launcher's explicit choice), else the
    cores of this rank minus one per data-loader worker (workers mostly decode and augment images), and
    minus one without workers (the training process does that work itself)."""
    if requested is not None and requested > 0:
        return ThreadChoice(requested, "--threads")
    if omp_num_threads and omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return ThreadChoice(int(omp_num_threads), "OMP_NUM_THREADS")
    per_rank = cores_per_rank(cores, ranks_on_node)
    threads = max(1, per_rank - max(1, workers))
    ranks = f", {ranks_on_node} ranks on this node" if ranks_on_node > 1 else ""
    return ThreadChoice(threads, f"{cores} cores available{ranks}, {workers} data-loader worker"
                                 f"{'s' if workers != 1 else ''}")


def apply_thread_policy(args) -> str:
    """Sets torch's intra-op threads for this process; returns the start-up line's text."""
    import torch  # noqa: PLC0415  (this module stays importable without torch)
    choice = choose_threads(cores=available_cores(), ranks_on_node=local_world_size(), workers=args.workers,
                            requested=getattr(args, "threads", None),
                            omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(choice.threads)
    how = "set by --threads" if choice.why == "--threads" else f"{choice.why}; --threads N to override"
    return f"{choice.threads} torch thread{'s' if choice.threads != 1 else ''} ({how})"
