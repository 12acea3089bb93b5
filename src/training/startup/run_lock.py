"""One writer per run folder, and ranks that do not outlive their launcher.

Two launches training into the same run folder at once log every step twice, rename each other's
checkpoints and race on `iter_N.pt`. Rank 0 therefore holds `RUN_DIR/run.lock`, a small JSON file with the
holder's host, PID, process start time and slurm job, created atomically (written under a temporary name,
then hard-linked to the real one, which fails if it exists). A second launch is refused while the holder
lives, naming it. The lock is taken over, with a warning, only when its holder is provably gone:

* same host, and that PID is not running, or is running but started at another time (a reused PID);
* same slurm job, another restart count (slurm ends every step of a job before it requeues it).

A holder on another host that died with its node cannot be proved gone from here: the message says which
file to delete once that is known.

Orphans: torchrun starts each worker in a session of its own, so a `kill -9` of the agent (or of its
process group) leaves the workers training with nobody to stop them. Each rank started by torchrun asks
the kernel for SIGKILL when its parent, the agent, dies (prctl PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import signal
import socket
import time

from training.elastic import launch_identity

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
PR_SET_PDEATHSIG = 1


class RunFolderLocked(RuntimeError):
    """Another live process trains into this run folder."""


def process_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone, only not reaped yet
    except (OSError, IndexError):
        return True


def holder_record(pid: int | None = None) -> dict:
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": process_start_ticks(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            **launch_identity()}


def holder_gone(holder: dict) -> str | None:
    """Why the recorded holder is provably gone, or None when it may be alive."""
    me = holder_record()
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"] \
            and holder.get("slurm_restart") != me["slurm_restart"]:
        return f"an earlier attempt ({holder.get('slurm_restart')}) of slurm job {holder['slurm_job']}"
    if holder.get("torchrun") and holder.get("torchrun") == me.get("torchrun") and holder.get("torchrun_start") \
            and me.get("torchrun_start") and holder["torchrun_start"] != me["torchrun_start"]:
        return f"an earlier start of this torchrun launch ({holder['torchrun']})"
    if holder.get("host") != me["host"]:
        return None
    pid = int(holder.get("pid", -1))
    if pid == os.getpid() and holder.get("start_ticks") == me["start_ticks"]:
        return None  # this very process (a second main() while the first still runs)
    if pid <= 0 or not pid_running(pid):
        return f"PID {pid} is not running on {me['host']}"
    ticks = process_start_ticks(pid)
    if holder.get("start_ticks") is not None and ticks is not None and ticks != holder["start_ticks"]:
        return f"PID {pid} on {me['host']} now belongs to a process started later"
    return None


class RunLock:
    def __init__(self, path: str):
        self.path, self.record = path, holder_record()

    def _create(self) -> bool:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.record, f)
        try:
            os.link(tmp, self.path)  # atomic, and fails if a lock exists: readers never see it half-written
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                json.dump(self.record, f)
            return True
        finally:
            os.remove(tmp)

    def acquire(self) -> "RunLock":
        for _ in range(3):
            if self._create():
                atexit.register(self.release)
                return self
            try:
                with open(self.path) as f:
                    holder = json.load(f)
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):
                holder = {}
            why = holder_gone(holder) if holder else "the lock file is unreadable"
            where = f"{holder.get('host', '?')}, PID {holder.get('pid', '?')}, since {holder.get('started', '?')}"
            if why is None:
                raise RunFolderLocked(
                    f"run folder {os.path.dirname(self.path)} is in use by another run ({where}): two writers "
                    f"would corrupt it. Stop that run first, choose another --name, or, if that process is gone "
                    f"(e.g. its node died), delete {self.path}")
            try:  # of two launches taking over at once, only one rename succeeds
                os.rename(self.path, f"{self.path}.stale{os.getpid()}")
            except FileNotFoundError:
                continue
            os.remove(f"{self.path}.stale{os.getpid()}")
            log.warning("taking over the run folder's lock from a run that is gone (%s; %s)", where, why)
        raise RunFolderLocked(f"could not take the lock {self.path}: other launches keep taking it")

    def release(self) -> None:
        try:
            with open(self.path) as f:
                mine = json.load(f) == self.record
        except (OSError, ValueError):
            mine = False
        if mine:
            os.remove(self.path)
        atexit.unregister(self.release)


_held: list[RunLock] = []


def lock_run_folder(run_dir: str) -> RunLock:
    """Rank 0: hold RUN_DIR/run.lock until release_run_folder() or exit."""
    lock = RunLock(os.path.join(run_dir, LOCK_NAME)).acquire()
    _held.append(lock)
    return lock


def release_run_folder() -> None:
    while _held:
        _held.pop().release()


def die_with_launcher(env=os.environ) -> bool:
    """Under torchrun (TORCHELASTIC_RUN_ID set; the parent is the agent): SIGKILL this rank when the agent
    dies. Linux only; True when installed."""
    if "TORCHELASTIC_RUN_ID" not in env or not hasattr(os, "getppid"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() != parent:  # the agent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True
