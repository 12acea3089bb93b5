"""The trainings of parts 2 and 3 of `training.bench` (`training.bench.train`): the flags of a benchmark run, the
run itself through `training.main.main([...])` (or a finished one reused), and its results.jsonl read back.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time

from training.bench.common import method_spec


def train_spec(family: str, opts):
    if family == "neuclip":
        return method_spec("neuclip", protos=opts.npn_protos, restart=opts.npn_restart)
    return method_spec(family)


def train_flags(opts, logs: str, name: str, spec, *, batch: int, n: int, samples: int, seed: int,
                evaluate: bool, extra: list[str] = ()) -> list[str]:
    if samples % n or n % batch:
        raise ValueError(f"samples seen {samples} must be a multiple of the data size {n}, and {n} of the batch "
                         f"size {batch}, for exact epochs")
    epochs, steps = samples // n, samples // batch
    device = opts.device
    flags = ["--logs", logs, "--name", name, "--model", opts.model, "--batch-size", str(batch),
             "--epochs", str(epochs), "--dataset-type", "synthetic", "--synthetic-num-samples", str(n),
             "--workers", str(opts.workers), "--warmup", str(max(1, steps // 10)), "--lr", str(opts.lr),
             "--wd", "0.1", "--precision", "fp32" if device == "cpu" else "amp_bf16", "--device", device,
             "--seed", str(seed), "--log-every-n-steps", str(max(1, steps // 10)),
             "--zeroshot-frequency", str(epochs if evaluate else 0), "--val-frequency", str(epochs if evaluate else 0),
             "--save-frequency", "0", "--report-to", "tensorboard", *spec.flags]
    if spec.uses_family:
        flags += ["--gamma_decay_epochs", str(epochs)]
    return flags + list(extra)


def run_once(flags: list[str], run_dir: str, reuse: bool, extract, log) -> dict:
    """Train (or reuse a finished run with the same flags), let `extract(run_dir, summary)` read what the part
    needs, drop the checkpoints, and return the extracted result (also kept in run_dir/bench_run.json)."""
    from training.main import main  # noqa: PLC0415
    marker = os.path.join(run_dir, "bench_run.json")
    if reuse and os.path.exists(marker):
        with open(marker) as f:
            saved = json.load(f)
        if saved.get("flags") == flags:
            log(f"  reusing {run_dir}")
            return saved["result"]
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    summary = main(flags)
    seconds = time.perf_counter() - start
    result = extract(run_dir, summary)
    result.update(seconds=seconds, train_steps=summary["step"], skipped_nonfinite=summary["skipped_nonfinite"])
    for path in glob.glob(os.path.join(run_dir, "checkpoints", "*.pt")):
        os.remove(path)
    with open(marker, "w") as f:
        json.dump({"flags": flags, "result": result}, f, indent=1)
    log(f"  {os.path.basename(run_dir)}: {summary['step']} steps in {seconds:.0f} s")
    return result


def results_lines(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "checkpoints", "results.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
