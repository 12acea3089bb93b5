"""Per-sample state and the host's RAM: how much the gcl family keeps per sample key, and the start-up refusal
of tables that would not fit (every rank keeps a full copy of them on the host, `table.PerSampleTable`)."""
import os

from . import registry
from .temperature import per_sample_temperature_bytes


def bytes_per_sample(args) -> int:
    """Bytes per sample key of the gcl family's per-sample state under these flags: the temperature scheme's
    (FastCLIP-v2's τ_i) plus the estimator's (its registry entry says)."""
    return per_sample_temperature_bytes(args.temperature_scheme) + \
        registry.entry(registry.ESTIMATOR, args.estimator).per_sample_state_bytes(args)


def per_sample_state_bytes(args) -> int:
    """Bytes of per-sample state one rank keeps for these flags (every rank keeps a full copy)."""
    return bytes_per_sample(args) * max(args.data_size, 0)


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (free + reclaimable), else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(args, processes_per_host: int | None = None, available: int | None = None) -> int:
    """Refuse, before allocating, per-sample state that would not fit in this host's RAM.

    Every process on the host keeps its own copy (LOCAL_WORLD_SIZE processes by default).
    Returns the bytes one process will allocate.
    """
    per_process = per_sample_state_bytes(args)
    if per_process == 0:
        return 0
    processes = processes_per_host or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = available_ram_bytes() if available is None else available
    needed = per_process * processes
    if needed > available:
        raise MemoryError(
            f"per-sample state needs {needed} bytes ({needed / 2**30:.2f} GiB: "
            f"{per_process // max(args.data_size, 1)} bytes x --data_size {args.data_size} x "
            f"{processes} process(es) on this host) but only {available} bytes "
            f"({available / 2**30:.2f} GiB) of RAM are available. Fix: set --data_size to the "
            "largest sample key + 1 (not more), run fewer processes per host, or use an estimator "
            "without per-sample state (--estimator npn) and a global temperature scheme.")
    return per_process
