"""Memory of the methods for part 1 of `training.bench` (cost): peak training memory on CPU, persistent state size.

Memory peak on CPU: each method in its own subprocess (`python -m training.bench.memory --memory-probe JSON`): the
peak RSS while the method is built and steps, minus the RSS just before (Linux: /proc/self/clear_refs resets the
peak mark, VmHWM reads it; `resource.getrusage`'s ru_maxrss is the fallback, but it survives fork + exec and so
starts at the parent's peak). The GPU peak is taken in `training.bench.cost.measure`.

Persistent state: the bytes of each method's state_dict plus AdamW's moments of its own parameters, per embedding
width and data size (`state_sizes`). `training.bench.cost` re-exports every name of this module.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys

import torch

from training.bench.common import MethodSpec, human_bytes, python, subprocess_env
from training.bench.cost import CommTimer, Runner, build_args, clock_for, data_size_for, make_batches, make_model


# ------------------------------------------------------------------------------------ memory (CPU)

def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: /proc/self/clear_refs 5); returns the
    current RSS in bytes, or None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def peak_rss() -> int:
    """Peak RSS of this process image in bytes: VmHWM (which clear_refs resets) where /proc has it, else
    getrusage's ru_maxrss (which survives fork + exec: it then includes the parent's peak)."""
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else max_rss_bytes()


def memory_probe(config: dict) -> dict:
    """In a fresh process: model and batches first, then the peak mark is reset, the method built and its
    steps run; the increase of peak RSS over the RSS at the reset is the method's training memory."""
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    device = torch.device("cpu")
    model, preprocess, tokenizer = make_model(config["model"], device, "fp32")
    batches = make_batches(preprocess, tokenizer, config["batch"], config["batches"], device)
    spec = MethodSpec(**{**config["spec"], "flags": tuple(config["spec"]["flags"])})
    gc.collect()
    current = reset_peak_rss()
    before = current if current is not None else peak_rss()
    runner = Runner.build(spec, model, config["model"], config["batch"], "fp32",
                          data_size_for(config["batch"], config["batches"]), device)
    clock = clock_for(device)
    for i in range(config["steps"]):
        runner.step_once(batches[i % len(batches)], clock, CommTimer(clock))
    after = peak_rss()
    return {"rss_before": before, "rss_after": after, "delta": after - before,
            "how": "VmHWM after clear_refs" if current is not None else "ru_maxrss"}


def run_memory_probes(specs: list[MethodSpec], model: str, batch: int, batches: int, steps: int, threads: int,
                      log) -> dict:
    out = {}
    for spec in specs:
        config = {"model": model, "batch": batch, "batches": batches, "steps": steps, "threads": threads,
                  "spec": {"key": spec.key, "family": spec.family, "label": spec.label, "flags": list(spec.flags)}}
        proc = subprocess.run([python(), "-m", "training.bench.memory", "--memory-probe", json.dumps(config)],
                              capture_output=True, text=True, env=subprocess_env(), timeout=1800)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[spec.key] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
        else:
            out[spec.key] = json.loads(lines[-1])
        log(f"  memory probe {spec.key}: {human_bytes(out[spec.key].get('delta', math.nan))}")
    return out


# ------------------------------------------------------------------------------------- state size

class _StubModel(torch.nn.Module):
    """What a method reads from the model when it is built: the temperature and the embedding width."""

    def __init__(self, dim: int):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.text_projection = torch.nn.Parameter(torch.zeros(1, dim))
        self.visual = torch.nn.Module()
        self.visual.output_dim = dim


def state_bytes(method) -> int:
    """Tensors of method.state_dict() plus AdamW's two moments for the method's own trainable parameters
    (the main optimizer's state for them; the model's own optimizer state is the same for every method)."""
    total = sum(t.numel() * t.element_size() for t in method.state_dict().values() if torch.is_tensor(t))
    for group in method.trainable_parameter_groups():
        total += 2 * sum(p.numel() * p.element_size() for p in group["params"])
    return total


def state_sizes(specs: list[MethodSpec], dims: list[int], allocated: list[int], computed: list[int]) -> list[dict]:
    """Persistent state per method, embedding width and data size n (the sample-key space): built for real
    for n in `allocated`; for n in `computed`, the state at the smallest allocated n plus the per-sample
    bytes × (n − that n) (`contrastive.registry.per_sample_state_bytes`: the method's entry says), checked against
    the allocated ones."""
    from contrastive import build_method, registry  # noqa: PLC0415
    rows = []
    for dim in dims:
        for spec in specs:
            measured = {}
            for n in allocated:
                args = build_args(spec, "neuclip-tiny", 64, "fp32", n, torch.device("cpu"))
                method = build_method(args.method, args, _StubModel(dim))
                measured[n] = state_bytes(method)
                del method
            n0 = min(allocated)
            args0 = build_args(spec, "neuclip-tiny", 64, "fp32", n0, torch.device("cpu"))
            per_sample = registry.per_sample_state_bytes(args0)
            fixed = measured[n0] - per_sample * n0
            predicted = {n: fixed + per_sample * n for n in allocated}
            sizes = {n: {"bytes": measured[n], "how": "allocated"} for n in allocated}
            sizes |= {n: {"bytes": fixed + per_sample * n, "how": "computed"} for n in computed if n not in sizes}
            rows.append({"key": spec.key, "label": spec.label, "dim": dim, "per_sample_bytes": per_sample,
                         "fixed_bytes": fixed, "sizes": {str(n): v for n, v in sizes.items()},
                         "formula_matches_allocated": all(predicted[n] == measured[n] for n in allocated)})
    return rows


# ------------------------------------------------------------------------------------------- entry

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="helper of training.bench")
    parser.add_argument("--memory-probe", required=True, help="JSON config (see memory_probe)")
    opts = parser.parse_args(argv)
    sys.stdout.write(json.dumps(memory_probe(json.loads(opts.memory_probe))) + "\n")


if __name__ == "__main__":
    main()
