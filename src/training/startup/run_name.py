"""The run's name when --name is not given, and why an existing folder of that name is this run's own.

A new run must not land in an old run's folder, so the default name is timestamped (open_clip's
convention). But a run restarted by its launcher must find its folder again to resume:

* Slurm: the job id stands in for the timestamp (training.params.default_run_name). A requeued job keeps
  its id, so its folder existing means an earlier attempt of this job wrote it: resume.
* torchrun: every restart (--max-restarts, a lost node) starts the workers anew, with a new clock. The
  first start's name is kept in the agent's store (training.elastic.shared_default_name), so later starts
  take it and resume.

Elsewhere an existing folder of a timestamped name is a second run started in the same second: refused.
"""
import os

from training.distributed import broadcast_object
from training.elastic import shared_default_name
from training.params import default_run_name
from training.errors import RunFolderExists


def choose_run_name(args) -> str:
    """Sets args.name when it is empty; rank 0 decides, every rank follows (and raises alike)."""
    if args.name:
        return args.name
    name, refusal = None, None
    if args.is_master:
        name, restarted = shared_default_name(default_run_name(args))
        under_slurm = bool(os.environ.get("SLURM_JOB_ID"))
        if os.path.exists(os.path.join(args.logs, name)) and not (restarted or under_slurm):
            refusal = (f"the default run name {name} exists already (two runs in one second): pass --name")
    name, refusal = broadcast_object((name, refusal))
    if refusal:
        raise RunFolderExists(refusal)
    args.name = name
    return name
