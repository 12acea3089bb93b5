"""The run folder (open_clip's logs/NAME/): created or found again, locked to one writer, and its
params.txt compared with this launch's flags. Rank 0 decides, every rank follows."""
import logging
import os

from training.distributed import broadcast_object
from training.errors import RunFolderExists
from training.startup.run_lock import lock_run_folder

log = logging.getLogger("training")
#: Flags that may differ between launches of one run without a warning: where and how it runs, not what.
NOT_COMPARED = {"resume", "no_auto_resume", "rank", "local_rank", "is_master", "device", "threads", "progress",
                "verbose"}


def prepare_run_folder(args) -> tuple[str, dict]:
    """The run folder; in an existing one, --resume latest unless --no-auto-resume. Returns the folder
    and the previous params.txt (empty for a new run). Rank 0 decides, every rank follows."""
    run_dir = os.path.join(args.logs, args.name)
    previous = {}
    if args.is_master:
        params = os.path.join(run_dir, "params.txt")
        if os.path.exists(params):
            if args.no_auto_resume and not args.resume:
                raise RunFolderExists(f"run folder {run_dir} already exists and --no-auto-resume is set: "
                                      "drop it (or pass --resume latest) to continue the run, or choose "
                                      "another --name")
            with open(params) as f:
                previous = dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)
            args.resume = args.resume or "latest"
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        lock_run_folder(run_dir)  # one writer per run folder (training.startup.run_lock)
    args.resume = broadcast_object(args.resume)
    return run_dir, previous


def changed_params(args, previous: dict) -> list[str]:
    return [f"{name}: {previous.get(name, '(unset)')} -> {getattr(args, name)}" for name in sorted(vars(args))
            if name not in NOT_COMPARED and previous and previous.get(name) != str(getattr(args, name))]


def announce_resume(args, run_dir: str, previous: dict) -> None:
    """In an existing run folder: say that the run resumes, and which flags differ from its params.txt."""
    if previous:
        log.info("run folder %s exists: resuming from its newest valid checkpoint (--no-auto-resume refuses)",
                 run_dir)
        changes = changed_params(args, previous)
        if changes:
            log.warning("flags differ from the run folder's params.txt: %s", "; ".join(changes))


def write_params(args, run_dir: str) -> None:
    with open(os.path.join(run_dir, "params.txt"), "w") as f:
        for name in sorted(vars(args)):
            f.write(f"{name}: {getattr(args, name)}\n")
