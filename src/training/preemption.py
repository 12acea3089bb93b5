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

Ctrl-C (SIGINT) is the same stop, asked for by a person at a terminal: the checkpoint, one line giving the
command that resumes, and exit status 130 (128 + SIGINT, what shells report for an interrupted program).
A second Ctrl-C raises KeyboardInterrupt at once: whoever presses twice wants out now, checkpoint or not.
"""
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from training.distributed import barrier, is_distributed
from training.errors import EXIT_INTERRUPTED, EXIT_REQUEUE, env_rank
from training.observers import StepResult

log = logging.getLogger(__name__)
# The MAX over ranks decides: SIGUSR1 (requeue) over SIGTERM, and a person's Ctrl-C over both (no requeue).
SIGNAL_CODES = {signal.SIGTERM: 1, signal.SIGUSR1: 2, signal.SIGINT: 3}
SIGNAL_NAMES = {code: signal.Signals(sig).name for sig, code in SIGNAL_CODES.items()}


class Preempted(SystemExit):
    """Raised by main() after the preemption checkpoint: exits the process with EXIT_REQUEUE (a
    scheduler's signal) or EXIT_INTERRUPTED (Ctrl-C)."""

    def __init__(self, step: int, checkpoint: str, exit_code: int = EXIT_REQUEUE, signal_name: str = "SIGTERM"):
        super().__init__(exit_code)
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopSignals:
    """SIGTERM / SIGUSR1 / SIGINT set a flag instead of killing the process. Slurm signals every process of
    the job step, and a terminal's Ctrl-C every process of its foreground group: DataLoader workers ignore
    all three (training.data.workers.ignore_stop_signals), and any other forked child that inherits this handler
    leaves the decision to the training process. `argv`: the flags this process was launched with, for
    the line that says how to resume."""

    def __init__(self, argv: list[str] | None = None):
        self.code, self._pid, self._previous = 0, os.getpid(), {}
        self.argv = list(sys.argv[1:] if argv is None else argv)

    def install(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGUSR1/SIGINT will not trigger a checkpoint")
            return self
        for sig in SIGNAL_CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        if signum == signal.SIGINT:
            if self.code == SIGNAL_CODES[signal.SIGINT]:  # the second Ctrl-C
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            if env_rank() == 0:  # at once: the step and its checkpoint may take a while
                os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again stops at "
                            b"once, without one)\n")
        self.code = max(self.code, SIGNAL_CODES[signum])


def resume_command(argv: list[str], name: str, env=os.environ) -> str:
    """The shell command that resumes this run: the launch's own command with its run name, and without
    the flags that would start over or refuse (--resume PATH, --resume-fresh, --no-auto-resume); the
    run folder then resumes from its newest checkpoint by itself."""
    flags, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--name", "--resume"):
            skip = True
            continue
        if arg.startswith(("--name=", "--resume=")) or arg in ("--resume-fresh", "--no-auto-resume"):
            continue
        flags.append(arg)
    flags += ["--name", name]
    launched = list(getattr(sys, "orig_argv", []))
    if argv == sys.argv[1:] and len(launched) > len(argv):  # this process's own command line
        interpreter = launched[:len(launched) - len(argv)]  # as typed: `python -u src/training/main.py`
    else:  # main() called from Python with its own flags
        interpreter = ["python", "-u", "src/training/main.py"]
    prefix = f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} " if env.get("PYTHONPATH") else ""
    return prefix + shlex.join(interpreter + flags)


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
        self.exit_code = EXIT_REQUEUE
        self.name = getattr(args, "name", None)

    def after_step(self, result: StepResult) -> bool:
        """The loop's step observer (training.observers): True when the run must stop now (its checkpoint is
        written). The epoch's last step is left to `at_epoch_end`, which comes after the epoch's checkpoint
        and evaluation."""
        if result.is_epoch_end:
            return False
        return self._boundary(result.step, {"epoch": result.epoch, "batch": result.batch})

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
        name = SIGNAL_NAMES[code]
        if name == "SIGINT":
            self.exit_code = EXIT_INTERRUPTED
            relaunch = "launch the same command again" if is_distributed() or not self.name else \
                resume_command(self.signals.argv, self.name)
            log.warning("Ctrl-C: stopped at step %d after writing %s; to resume: %s", step, path, relaunch)
        else:
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
