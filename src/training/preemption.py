"""Mid-run checkpoints and preemption: a signal becomes a checkpoint and an exit that can be requeued.

Slurm sends SIGTERM before it kills a job (time limit, preemption, scancel) and, with
`#SBATCH --signal=USR1@120`, SIGUSR1 120 s before the time limit. Both only set a flag here. After every
step all ranks combine their flags in one all-reduce(MAX) of two numbers (any signal; rank 0's clock
says a --save-every-n-minutes checkpoint is due), so they agree on the step to stop at although the
signal reaches them at different moments. Every step rather than every few: the all-reduce of 16 bytes
adds tens of microseconds to steps of hundreds of milliseconds. Its result is read one step late
(`RankFlags`): read at once, it would hold the host until the GPU had finished the step, so the CPU could
not queue the next step while the GPU runs this one. A signal therefore stops the run at most two steps
after it arrives (at the epoch end, at once); a single process reads its own flags, no tensor.

On a signal: write iter_{step}.pt (mid-epoch; the data position is in it), then, for SIGUSR1 under slurm
and unless --no-requeue, `scontrol requeue` the job (rank 0, last), and exit with status 75 (EX_TEMPFAIL of
sysexits.h: "temporary failure, try again") on every rank. Launching the same command again resumes.
"""
import logging
import os
import signal
import subprocess
import threading
import time

import torch
import torch.distributed as dist

from training.distributed import barrier, is_distributed

log = logging.getLogger(__name__)
EXIT_REQUEUE = 75
SIGNAL_CODES = {signal.SIGTERM: 1, signal.SIGUSR1: 2}  # the MAX over ranks: SIGUSR1 (requeue) wins


class Preempted(SystemExit):
    """Raised by main() after the preemption checkpoint: exits the process with EXIT_REQUEUE."""

    def __init__(self, step: int, checkpoint: str, signal_name: str = "SIGTERM"):
        super().__init__(EXIT_REQUEUE)
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopSignals:
    """SIGTERM / SIGUSR1 set a flag instead of killing the process. Slurm signals every process of the job
    step: DataLoader workers ignore both (training.data.ignore_stop_signals), and any other forked child
    that inherits this handler leaves the decision to the training process."""

    def __init__(self):
        self.code, self._pid, self._previous = 0, os.getpid(), {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGUSR1 will not trigger a checkpoint")
            return self
        for sig in SIGNAL_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() == self._pid:
            self.code = max(self.code, SIGNAL_CODES[signum])


def slurm_job_id(env=os.environ) -> str | None:
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this job (needs `#SBATCH --requeue` or JobRequeue=1); False if not possible."""
    job = slurm_job_id()
    if job is None:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not requeue slurm job %s: %s", job, exc)
        return False
    if result.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
        return False
    log.info("requeued slurm job %s", job)
    return True


class RankFlags:
    """Integer flags combined over ranks by all-reduce(MAX), each boundary reading the previous one's.

    Each `exchange` starts this boundary's all-reduce and a non-blocking copy of its result to host memory,
    and returns the previous boundary's result, whose copy finished while this step ran: no wait for the
    GPU. Every rank reads the same reduced values at the same boundary, so they agree on the stop step.
    `now=True` (the epoch end, once per epoch) waits for this boundary's result too and returns the MAX of
    both, so nothing pending is lost."""

    def __init__(self, device, size: int = 2):
        self.device, self.size = torch.device(device), size
        self._pending = None  # (host tensor, CUDA event or None) of the previous boundary

    def exchange(self, values: list[int], now: bool = False) -> list[int]:
        flags = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":  # from pinned memory the copy is queued, not waited for
            flags = flags.pin_memory().to(self.device, non_blocking=True)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True).wait()  # NCCL: the stream waits, not the host
        current = self._to_host(flags)
        previous, self._pending = self._pending, current
        read = [self._read(previous)] if previous is not None else [[0] * self.size]
        if now:
            read.append(self._read(current))
            self._pending = None
        return [max(column) for column in zip(*read)]

    def _to_host(self, flags: torch.Tensor):
        if flags.device.type != "cuda":
            return flags, None
        host = torch.empty(self.size, dtype=torch.int64, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def _read(pending) -> list[int]:
        host, event = pending
        if event is not None:
            event.synchronize()  # the copy queued a step ago: long done
        return [int(v) for v in host.tolist()]


class StepCheckpoints:
    """Called by every rank at step boundaries: writes iter_{step}.pt when due (every N steps, every M
    minutes, or on a signal) and says when to stop. `save(position)` writes one and returns its path."""

    def __init__(self, args, signals: StopSignals, save, device):
        self.every_n_steps, self.every_s = args.save_every_n_steps, args.save_every_n_minutes * 60
        self.requeue, self.is_master = not args.no_requeue, args.is_master
        self.signals, self.save, self.device = signals, save, device
        self.flags, self._due_in_flight = RankFlags(device), False
        self.last_save = time.monotonic()
        self.stopped_at: tuple[int, str] | None = None  # (step, checkpoint) once a signal stopped the run
        self.requeue_due, self.stop_signal = False, None

    def after_step(self, step: int, epoch: int, batch: int, epoch_batches: int) -> bool:
        """True when the run must stop now (its checkpoint is written). The epoch's last step is left to
        `at_epoch_end`, which comes after the epoch's checkpoint and evaluation."""
        if batch >= epoch_batches:
            return False
        return self._boundary(step, {"epoch": epoch, "batch": batch})

    def at_epoch_end(self, step: int, completed_epochs: int) -> bool:
        return self._boundary(step, {"epoch": completed_epochs, "batch": 0}, now=True)

    def _boundary(self, step: int, position: dict, now: bool = False) -> bool:
        due = self.is_master and self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        code, due = self.signals.code, int(due and not self._due_in_flight)
        if is_distributed():  # the ranks agree on the stop step: one tiny collective per step, read a step late
            # A due flag sent now comes back next boundary; until then rank 0 must not send another, or
            # the step after that checkpoint would write a second one.
            self._due_in_flight = self._due_in_flight or bool(due)
            code, due = self.flags.exchange([code, due], now=now)
            self._due_in_flight = self._due_in_flight and not due
        path = None
        if code or due or (self.every_n_steps > 0 and step % self.every_n_steps == 0):
            path = self.save(position)
            self.last_save = time.monotonic()
            log.info("checkpoint %s (epoch %d, batch %d)", path, position["epoch"], position["batch"])
        if not code:
            return False
        name = "SIGUSR1" if code == SIGNAL_CODES[signal.SIGUSR1] else "SIGTERM"
        log.warning("%s received: stopping at step %d after writing %s; exiting with status %d, launch the "
                    "same command again to resume", name, step, path, EXIT_REQUEUE)
        barrier()  # no rank exits before rank 0's file is complete
        self.stopped_at = (step, path)
        self.stop_signal = name
        self.requeue_due = name == "SIGUSR1" and self.requeue and self.is_master
        return True

    def requeue_if_due(self) -> None:
        """Rank 0, last thing before exiting after SIGUSR1: `scontrol requeue` ends the job's tasks (SIGTERM,
        then SIGKILL after KillWait), so it comes after the final log lines and the remote sync."""
        if self.requeue_due:
            requeue_slurm_job()
