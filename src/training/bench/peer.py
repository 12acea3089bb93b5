"""Part "peer" of `training.bench`: this trainer next to open_clip's own (`open_clip_train`) on the same work.

Same model (--model, neuclip-tiny by default: registered for open_clip_train by training.bench.peer_run), same
batch, the same synthetic shards (`python -m training.data.synthetic`), fp32 on the CPU, the same torch threads
(--threads) and data loader workers (--workers), --log-every-n-steps 1 in both. Rounds interleave the trainings
(round r starts at trainer r mod k) so a change in the machine's load hits all of them alike.

How it is timed: inside each process, every "Train Epoch" log line (one per step, at its end) is stamped with the
wall clock, the process's CPU time and its loader workers' CPU time (training.bench.peer_run). A step's time is the
difference of consecutive stamps; the first --peer-warmup steps of a run are dropped, and start-up (imports,
model, data loader start) is never in them. Ratios are per round (ours / peer in the same round), then the
median and range over rounds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from training.bench.common import SRC_DIR, markdown_table, median, method_spec, quantile

PEER = "open_clip_train"


def trainers(opts) -> list[tuple[str, str, tuple]]:
    """(key, label, flags) of each training: the peer, then ours per --peer-methods."""
    out = [("peer", f"{PEER} (open_clip 3.3.0's trainer)", ())]
    for name in opts.peer_methods:
        family, _, protos = name.partition("-m")
        spec = method_spec(family, protos=int(protos)) if protos else method_spec(family)
        out.append((name, f"this trainer: {spec.label}", spec.flags))
    return out


def common_flags(opts, shards: str, samples: int, logs: str, name: str) -> list[str]:
    return ["--model", opts.model, "--batch-size", str(opts.peer_batch), "--workers", str(opts.workers),
            "--lr", "1e-4", "--warmup", "1", "--epochs", "1", "--precision", "fp32", "--log-every-n-steps", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "", "--save-frequency", "0",
            "--seed", "0", "--train-data", shards, "--train-num-samples", str(samples), "--dataset-type",
            "webdataset", "--logs", logs, "--name", name, "--device", "cpu"]


def step_stats(marks: dict, warmup: int) -> dict:
    stamps = marks["stamps"][warmup:]
    if len(stamps) < 2:
        raise RuntimeError(f"{marks['trainer']}: only {len(marks['stamps'])} step lines logged; "
                           "raise --peer-steps above --peer-warmup + 1")
    n = len(stamps) - 1
    walls = [b["wall"] - a["wall"] for a, b in zip(stamps, stamps[1:])]
    return {"steps": n, "step_s": walls, "median_s": median(walls),
            "cpu_s": (stamps[-1]["cpu"] - stamps[0]["cpu"]) / n,
            "workers_cpu_s": (stamps[-1]["workers_cpu"] - stamps[0]["workers_cpu"]) / n,
            "run_wall_s": marks["run_wall"], "threads": marks["threads"]}


def run_one(opts, key: str, flags: tuple, shards: str, samples: int, out_dir: str, rnd: int) -> dict:
    logs = os.path.join(out_dir, "runs")
    name = f"{key}-r{rnd}"
    marks_path = os.path.join(out_dir, "runs", f"{name}.marks.json")
    os.makedirs(logs, exist_ok=True)
    shutil.rmtree(os.path.join(logs, name), ignore_errors=True)  # open_clip_train refuses an existing run name
    trainer = "peer" if key == "peer" else "ours"
    ours = () if key == "peer" else ("--data_size", str(samples))  # per-sample state (FastCLIP's u) needs it
    cmd = [sys.executable, "-m", "training.bench.peer_run", marks_path, trainer,
           *common_flags(opts, shards, samples, logs, name), *ours, *flags]
    threads = str(opts.threads or os.cpu_count())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": SRC_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{key} (round {rnd}) failed with status {proc.returncode}:\n{proc.stderr[-3000:]}")
    with open(marks_path) as f:
        return step_stats(json.load(f), opts.peer_warmup)


def run_peer(opts, out_dir: str, log) -> tuple[str, dict]:
    from training.data.synthetic.shards import main as write_shards  # noqa: PLC0415
    samples = opts.peer_batch * (opts.peer_steps + 1)  # one spare batch: the last may be dropped
    shards = write_shards(["--out", os.path.join(out_dir, "peer_shards"), "--num-samples", str(samples),
                           "--samples-per-shard", str(max(opts.peer_batch, samples // 8))])
    entries = trainers(opts)
    load_start = os.getloadavg()
    runs = {key: [] for key, _, _ in entries}
    for rnd in range(opts.peer_rounds):
        shift = rnd % len(entries)
        for key, _, flags in entries[shift:] + entries[:shift]:
            start = time.perf_counter()
            runs[key].append(run_one(opts, key, flags, shards, samples, out_dir, rnd))
            log(f"[peer] round {rnd + 1}/{opts.peer_rounds} {key}: {runs[key][-1]['median_s']:.3f} s/step "
                f"(run {time.perf_counter() - start:.0f} s)")
    data = {"trainers": [{"key": k, "label": lab, "flags": list(f)} for k, lab, f in entries], "runs": runs,
            "batch": opts.peer_batch, "steps": opts.peer_steps, "warmup": opts.peer_warmup,
            "rounds": opts.peer_rounds, "threads": opts.threads, "workers": opts.workers, "model": opts.model,
            "shards": shards, "load_average": {"start": load_start, "end": os.getloadavg()},
            "uptime": _uptime(), "summary": summarize(runs)}
    return peer_markdown(data), data


def _ratio_stats(values: list[float]) -> dict:
    return {"median": median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict) -> dict:
    peer = runs["peer"]
    out = {}
    for key, rs in runs.items():
        steps = [s for r in rs for s in r["step_s"]]
        total_cpu = [r["cpu_s"] + r["workers_cpu_s"] for r in rs]
        entry = {"step_median_s": median(steps), "step_iqr_s": [quantile(steps, 0.25), quantile(steps, 0.75)],
                 "cpu_s": median([r["cpu_s"] for r in rs]), "workers_cpu_s": median([r["workers_cpu_s"] for r in rs]),
                 "total_cpu_s": median(total_cpu)}
        entry["step_ratio"] = _ratio_stats([r["median_s"] / p["median_s"] for r, p in zip(rs, peer)])
        entry["cpu_ratio"] = _ratio_stats([(r["cpu_s"] + r["workers_cpu_s"]) / (p["cpu_s"] + p["workers_cpu_s"])
                                           for r, p in zip(rs, peer)])
        out[key] = entry
    return out


def peer_markdown(data: dict) -> str:
    s = data["summary"]
    rows = []
    for t in data["trainers"]:
        e = s[t["key"]]
        rows.append([t["label"], f"{e['step_median_s']:.3f} [{e['step_iqr_s'][0]:.3f}–{e['step_iqr_s'][1]:.3f}]",
                     f"{e['step_ratio']['median']:.3f} [{e['step_ratio']['min']:.3f}–{e['step_ratio']['max']:.3f}]",
                     f"{e['cpu_s']:.3f}", f"{e['workers_cpu_s']:.3f}",
                     f"{e['cpu_ratio']['median']:.3f} [{e['cpu_ratio']['min']:.3f}–{e['cpu_ratio']['max']:.3f}]"])
    header = ["trainer", "s/step, median [IQR] of all steps", "× peer step (median [range] of per-round ratios)",
              "main-process CPU s/step", "loader-worker CPU s/step", "× peer CPU time (main + workers)"]
    la = data["load_average"]
    return "\n".join([
        "## Peer comparison: open_clip_train vs this trainer", "",
        f"`{data['model']}`, batch {data['batch']}, fp32 on the CPU, {data['threads']} torch thread(s), "
        f"{data['workers']} loader worker(s), the same synthetic shards, {data['rounds']} interleaved rounds of "
        f"{data['steps']} steps per training (the first {data['warmup']} dropped). Step times are differences of "
        "consecutive per-step log stamps inside each process (start-up excluded); ratios are paired per round.", "",
        markdown_table(header, rows), "",
        f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in la['start'])}, at end "
        f"{tuple(round(x, 2) for x in la['end'])}; `uptime`: {data['uptime']}", ""])


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
