"""Shared pieces of `training.bench`: the methods compared, statistics, tables, machine facts, plots.

Every method is named by the training flags that select it (`MethodSpec.flags`), so the benchmark
builds exactly what `python -m training.main` with those flags trains.
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass

import torch

# This file is src/training/bench/common.py: four levels up is the repository.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
SRC_DIR = os.path.join(REPO_ROOT, "src")

# FastCLIP-v3 (RGCL-g), the family settings the CPU quickstart uses (scripts/quickstart.sh); NeuCLIP and
# AmorLIP are the same family with another normalizer estimator, as in the paper's comparison.
FAMILY_FLAGS = ("--fastclip", "--multiply_tau", "--temperature_scheme", "global_learnable", "--temperature",
                "0.07", "--lr_tau", "2.5e-4", "--lr_tau_scheduler", "step_thresh", "--rho", "6.5",
                "--fastclip_eps", "1e-6", "--gamma", "0.8", "--gamma_schedule", "cosine")
PAPER_NPN = {"protos": 4096, "repetition": 10, "restart": 500, "lr": 1.0}  # paper Table 4 / section 5
METHOD_ORDER = ("openclip", "siglip", "fastclip", "neuclip", "amorlip")
METHOD_LABELS = {"openclip": "OpenCLIP", "siglip": "SigLIP", "fastclip": "FastCLIP-v3", "neuclip": "NeuCLIP",
                 "amorlip": "AmorLIP"}


@dataclass(frozen=True)
class MethodSpec:
    key: str          # unique name in tables and JSON, e.g. "neuclip-m512"
    family: str       # one of METHOD_ORDER
    label: str        # for people
    flags: tuple      # training.main flags that select it

    @property
    def uses_family(self) -> bool:
        return self.family in ("fastclip", "neuclip", "amorlip")


def method_spec(family: str, *, protos: int = PAPER_NPN["protos"], repetition: int = PAPER_NPN["repetition"],
                restart: int = PAPER_NPN["restart"], npn_lr: float = PAPER_NPN["lr"], key: str | None = None
                ) -> MethodSpec:
    if family == "openclip":
        return MethodSpec(key or family, family, "OpenCLIP", ())
    if family == "siglip":
        return MethodSpec(key or family, family, "SigLIP", ("--siglip",))
    if family == "fastclip":
        return MethodSpec(key or family, family, "FastCLIP-v3", FAMILY_FLAGS)
    if family == "neuclip":
        flags = FAMILY_FLAGS + ("--npn", "--npn_lr", str(npn_lr), "--npn_num_protos", str(protos),
                                "--npn_repetition", str(repetition), "--npn_restart_iter", str(restart))
        return MethodSpec(key or family, family, f"NeuCLIP (m={protos}, T_u={repetition})", flags)
    if family == "amorlip":
        return MethodSpec(key or family, family, f"AmorLIP (T_u={repetition})",
                          FAMILY_FLAGS + ("--amorlip", "--npn_repetition", str(repetition)))
    raise ValueError(f"unknown method {family!r}; choose from {', '.join(METHOD_ORDER)}")


def parse_method_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in METHOD_ORDER:
            raise ValueError(f"unknown method {name!r} in {text!r}; choose from {', '.join(METHOD_ORDER)}")
    return names


# ---------------------------------------------------------------------------------------- statistics

def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return quantile(values, 0.5)


def iqr(values: list[float]) -> tuple[float, float]:
    return quantile(values, 0.25), quantile(values, 0.75)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for fewer than 2 values)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - 1 - int(math.log10(abs(x))), 0)}f}"


def fmt_pm(mean: float, std: float, digits: int = 3) -> str:
    return fmt(mean, digits) if math.isnan(std) else f"{fmt(mean, digits)} ± {fmt(std, 2)}"


def human_bytes(n: float) -> str:
    if n is None or math.isnan(n):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


# -------------------------------------------------------------------------------------------- tables

def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def console_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- machine

def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> dict:
    """HEAD and whether the working tree differs from it. Read-only: --no-optional-locks keeps `git status`
    from refreshing the index."""
    commit = _run(["git", "rev-parse", "HEAD"]) or "unknown"
    changed = _run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    return {"commit": commit, "dirty": bool(changed), "changed_files": changed.splitlines()[:50]}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import open_clip  # noqa: PLC0415
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "gpus": gpus, "torch": torch.__version__,
            "cuda": torch.version.cuda, "open_clip": open_clip.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average": load_average()}


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def command_line(argv: list[str]) -> str:
    return "PYTHONPATH=src python -m training.bench " + shlex.join(argv)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def python() -> str:
    return sys.executable


# ------------------------------------------------------------------------------------------ plots

def pyplot():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def save_figure(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
