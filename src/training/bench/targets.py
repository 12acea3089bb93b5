"""The issue's targets for parts 2 and 3 of `training.bench`, checked against the measured numbers.

Every verdict is computed from the part's JSON (nothing is typed in by hand) and printed next to the evidence,
so a reader sees at once what was met, what was missed, and by how much. Part 1's cost target is checked in
training.bench.cost_report, next to its profile.
"""
from __future__ import annotations

import math

from training.bench.common import METHOD_LABELS, fmt, markdown_table, mean_std

EST_KEY = "est_err/mean"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# ------------------------------------------------------------------------------ part 2 (error)

def error_cells(runs: list[dict]) -> dict:
    """{(method, batch, n): (mean over the scheduled checkpoints, value at the last one)}."""
    cells = {}
    for run in runs:
        values = [s[EST_KEY] for s in run["scheduled"] if s.get(EST_KEY) is not None and math.isfinite(s[EST_KEY])]
        if values:
            cells[(run["method"], run["batch"], run["n"])] = (sum(values) / len(values), values[-1])
    return cells


def growth(cells: dict, method: str, batches: list[int], sizes: list[int], which: int) -> tuple[float, float]:
    """(error at the smaller batch / at the larger, mean over data sizes;
        error at 10n / at n, mean over batch sizes), from the checkpoint mean (which=0) or last checkpoint (1)."""
    small, large = min(batches), max(batches)
    n, big = min(sizes), max(sizes)

    def ratio(a, b):
        return cells[a][which] / cells[b][which] if a in cells and b in cells and cells[b][which] > 0 else math.nan

    by_batch = [ratio((method, small, s), (method, large, s)) for s in sizes]
    by_data = [ratio((method, b, big), (method, b, n)) for b in batches]
    return _mean(by_batch), _mean(by_data)


def last_checkpoint_lines(data: dict) -> list[str]:
    """The error at the final checkpoint: the checkpoint mean weighs the first, near-random-encoder checkpoints
    (where every estimate is easy) as much as the trained ones."""
    cells = error_cells(data["runs"])
    settings = data["settings"]
    rows = [[METHOD_LABELS[m], *(fmt(cells.get((m, s["batch"], s["n"]), (math.nan, math.nan))[1])
                                 for s in settings)] for m in data["methods"]]
    return [f"Error at the last checkpoint ({data['samples']} samples seen):", "",
            markdown_table(["method", *(s["label"] for s in settings)], rows), ""]


def error_target_lines(data: dict) -> list[str]:
    methods, runs = data["methods"], data["runs"]
    if "neuclip" not in methods or len(methods) < 2:
        return []
    cells = error_cells(runs)
    batches = sorted({r["batch"] for r in runs})
    sizes = sorted({r["n"] for r in runs})
    settings = [(b, s) for s in sizes for b in batches]
    labels = {r["method"]: r["label"].split(" (")[0] for r in runs}
    lines = ["**Targets of part 2** (computed from the table above; *mean* = mean over the checkpoints, as the "
             "paper averages; *last* = the final checkpoint):", ""]
    for which, name in ((0, "mean"), (1, "last")):
        lowest = []
        for b, s in settings:
            present = {m: cells[(m, b, s)][which] for m in methods if (m, b, s) in cells}
            if present:
                lowest.append((b, s, min(present, key=present.get)))
        wins = sum(1 for *_, m in lowest if m == "neuclip")
        where = ", ".join(f"B={b}, n={s}: {labels[m]}" for b, s, m in lowest)
        lines.append(f"- NeuCLIP's error the lowest of the methods ({name}): {_verdict(wins == len(lowest))}, "
                     f"in {wins} of {len(lowest)} settings (lowest per setting: {where}).")
    for which, name in ((0, "mean"), (1, "last")):
        grow = {m: growth(cells, m, batches, sizes, which) for m in methods}
        for axis, title in ((0, f"the batch halves ({max(batches)} → {min(batches)})"),
                            (1, f"the data grows {max(sizes) // min(sizes)}× ({min(sizes)} → {max(sizes)})")):
            factors = {m: g[axis] for m, g in grow.items() if math.isfinite(g[axis])}
            if "neuclip" not in factors:
                continue
            least = min(factors, key=factors.get)
            listed = ", ".join(f"{labels[m]} ×{fmt(v)}" for m, v in factors.items())
            lines.append(f"- NeuCLIP's error grows least when {title} ({name}): {_verdict(least == 'neuclip')} "
                         f"({listed}).")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------- part 3 (quality)

QUALITY_KEY = "builtin/mean_top1"


def paired_differences(runs: list[dict], better: str, worse: str, key: str = QUALITY_KEY) -> list[float]:
    """Per seed, `better`'s metric minus `worse`'s (the same seed: same initial model and data order)."""
    by = {(r["method"], r["seed"]): r["metrics"].get(key) for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    return [100 * (by[(better, s)] - by[(worse, s)]) for s in seeds
            if by.get((better, s)) is not None and by.get((worse, s)) is not None]


def quality_target_lines(data: dict) -> list[str]:
    needed = ("openclip", "fastclip", "neuclip")
    if not all(m in data["methods"] for m in needed):
        return []
    runs = data["runs"]
    means = {}
    for m in needed:
        values = [100 * r["metrics"][QUALITY_KEY] for r in runs if r["method"] == m and QUALITY_KEY in r["metrics"]]
        means[m] = mean_std(values)
    ordered = means["neuclip"][0] >= means["fastclip"][0] >= means["openclip"][0]
    lines = [f"**Target of part 3** (NeuCLIP ≥ FastCLIP ≥ OpenCLIP in zero-shot mean top-1 at batch "
             f"{data['batch']}): {_verdict(ordered)} on the means — NeuCLIP {fmt(means['neuclip'][0])}, "
             f"FastCLIP {fmt(means['fastclip'][0])}, OpenCLIP {fmt(means['openclip'][0])}.", ""]
    for better, worse in (("neuclip", "fastclip"), ("fastclip", "openclip"), ("neuclip", "openclip")):
        diffs = paired_differences(runs, better, worse)
        if not diffs:
            continue
        mean, sd = mean_std(diffs)
        se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 and math.isfinite(sd) else math.nan
        resolved = math.isfinite(se) and abs(mean) > 2 * se
        lines.append(f"- {METHOD_LABELS[better]} − {METHOD_LABELS[worse]}, paired by seed: {fmt(mean)} points (per seed "
                     f"{', '.join(fmt(d) for d in diffs)}; standard error {fmt(se)}): "
                     + ("larger than twice its standard error." if resolved
                        else "within twice its standard error: not resolved by these seeds."))
    lines.append("")
    return lines


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
