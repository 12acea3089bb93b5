"""torchrun's elastic agent: a fresh key space for every restart, and one default run name for all of them.

torchrun (c10d or static rendezvous) hosts one TCPStore in an agent for the whole launch and points every
worker of every restart at it (TORCHELASTIC_USE_AGENT_STORE=True, the same MASTER_ADDR:MASTER_PORT). The
keys a process group writes there (each rank's gloo address, the barrier counters) have no per-restart
prefix, so after `--max-restarts` restarts the workers the new ranks read the dead ranks' addresses and
wait inside init_process_group until the timeout (30 minutes by default). TORCHELASTIC_RESTART_COUNT cannot
serve as a prefix: it counts each agent's own failures, and an agent that restarts its workers because
another node failed (a membership change) does not count it.

So the ranks agree on a fresh generation first (`agree_generation`), through keys that cannot be stale:
each rank posts a new random token, and waits for rank 0's answer under a key named by that token; rank 0
answers every token it sees with its own new token and waits until each rank has acknowledged under a key
named by it. The process group then lives under `neuclip/pg/<generation>/`.

The same store outlives the restarts, so it also carries the default (timestamped) run name from the first
attempt to the next ones: a restarted rank 0 finds its run folder and resumes from the newest checkpoint
instead of starting a new run.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import time
import uuid

import torch.distributed as dist

log = logging.getLogger(__name__)
PREFIX = "neuclip"
_store: dist.Store | None = None  # the agent's store, once connected
_generation: str | None = None  # this start's token, once agreed


def agent_store_env(env=os.environ) -> tuple[str, int] | None:
    """(MASTER_ADDR, MASTER_PORT) of the store torchrun's agent hosts for this launch; None elsewhere."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return None
    return env["MASTER_ADDR"], int(env["MASTER_PORT"])


def agent_store(timeout: datetime.timedelta) -> dist.Store | None:
    """A client of the agent's store (one per process); None when not under torchrun's agent store."""
    global _store
    where = agent_store_env()
    if where is None:
        return None
    if _store is None:
        _store = dist.TCPStore(where[0], where[1], is_master=False, timeout=timeout)
    return _store


def agree_generation(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta,
                     poll_s: float = 0.05) -> str:
    """A token every rank of this start gets, and no rank of an earlier start had."""
    deadline = time.monotonic() + timeout.total_seconds()
    if rank != 0:
        mine = uuid.uuid4().hex
        store.set(f"{PREFIX}/hello/{rank}", mine)
        store.wait([f"{PREFIX}/answer/{mine}"], timeout)
        generation = store.get(f"{PREFIX}/answer/{mine}").decode()
        store.set(f"{PREFIX}/ack/{generation}/{rank}", "1")
        return generation
    generation = uuid.uuid4().hex
    pending, answered = set(range(1, world_size)), {}
    while pending:
        for r in sorted(pending):
            hello = f"{PREFIX}/hello/{r}"
            if store.check([hello]):  # possibly an earlier start's token: answering it does no harm
                token = store.get(hello).decode()
                if answered.get(r) != token:
                    store.set(f"{PREFIX}/answer/{token}", generation)
                    answered[r] = token
            if store.check([f"{PREFIX}/ack/{generation}/{r}"]):
                pending.discard(r)
        if pending and time.monotonic() > deadline:
            raise dist.DistError(f"rank(s) {', '.join(map(str, sorted(pending)))} did not join within "
                                 f"{timeout.total_seconds():.0f} s")
        if pending:
            time.sleep(poll_s)
    return generation


def generation_store(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The agent's store under this start's own prefix: what init_process_group gets."""
    global _generation
    _generation = agree_generation(store, rank, world_size, timeout)
    return dist.PrefixStore(f"{PREFIX}/pg/{_generation}/", store)


def launch_identity(env=os.environ) -> dict:
    """Which torchrun launch and which start of it this process belongs to (empty outside torchrun): the run
    lock takes over from an earlier start of the same launch, since the agent stops every worker of a start
    before it begins the next. One rank under torchrun has no generation: its PID tells the same."""
    where = agent_store_env(env)
    if where is None:
        return {}
    return {"torchrun": f"{where[0]}:{where[1]}/{env.get('TORCHELASTIC_RUN_ID', '')}", "torchrun_start": _generation}


def shared_default_name(candidate: str) -> tuple[str, bool]:
    """Rank 0: (the run name of this launch, whether an earlier start of it chose it). The first start's
    candidate is kept in the agent's store; without one (not torchrun) the candidate is the name."""
    if _store is None:
        return candidate, False
    kept = _store.compare_set(f"{PREFIX}/default_run_name", "", candidate).decode()
    return kept, kept != candidate


def node_range(env=os.environ, parent_cmdline: str | None = None) -> tuple[int, int] | None:
    """torchrun's --nnodes as (MIN, MAX) when this process is its worker, from PET_NNODES or the agent's
    command line (the worker's environment does not say it); None elsewhere or when unknown."""
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    text = env.get("PET_NNODES")
    if text is None:
        if parent_cmdline is None:
            try:
                with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                    parent_cmdline = f.read().decode(errors="replace").replace("\0", " ")
            except OSError:
                return None
        found = re.search(r"--nnodes[= ](\S+)", parent_cmdline)
        text = found.group(1) if found else "1"
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        return None


def elastic_range_refusal(env=os.environ, parent_cmdline: str | None = None) -> str | None:
    """Why an elastic world size (`--nnodes MIN:MAX`, MIN < MAX) cannot run here; None when it is fixed."""
    nodes = node_range(env, parent_cmdline)
    if nodes is None or nodes[0] == nodes[1]:
        return None
    return (f"torchrun --nnodes {nodes[0]}:{nodes[1]} (a world size that changes while the run goes on) is not "
            "supported: a node joining makes torch's rendezvous fail the launch when the agent shares its store "
            "(this torch's default), and mid-epoch the shard split cannot change; use a fixed --nnodes N with "
            "--max-restarts, whose restarts resume from the last checkpoint")
