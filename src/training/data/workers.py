"""The data loader's worker processes: which one this is, what signals they ignore, and how the training
process makes sure none outlives it."""
from __future__ import annotations

import atexit
import multiprocessing
import signal

from torch.utils.data import get_worker_info


def worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0  # --workers 0: the main process is the only reader


def ignore_stop_signals(worker: int) -> None:
    """worker_init_fn: slurm signals every process of a job step (a terminal's Ctrl-C every process of its
    foreground group), and PyTorch's workers die of a SIGTERM or SIGINT their parent did not send, failing
    the step the training process must finish before it checkpoints (training.preemption). Ignored here;
    the training process stops its workers itself."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def kill_leftover_workers(grace_s: float = 2.0) -> None:
    """atexit hook of the training process. A loader abandoned by an exception can leave a worker alive;
    multiprocessing's own exit handler stops daemonic children with SIGTERM (which our workers ignore, see
    `ignore_stop_signals`) and then joins them: forever. Registered after multiprocessing's, so it runs
    first: SIGTERM, a short grace, then SIGKILL for whatever is still alive."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=grace_s)
        if child.is_alive():
            child.kill()
            child.join(timeout=grace_s)


atexit.register(kill_leftover_workers)
