"""Benchmark and report: cost, normalizer estimation error, quality, GPU throughput of the compared methods.

    PYTHONPATH=src python -m training.bench --out DIR [--parts cost,error,quality,gpu] [--quick] [size flags]

Writes DIR/report.md (the exact command, git commit, torch version and machine at the top, then one section per
part), the PNG plots next to it, DIR/<part>.json with every number behind the tables, and DIR/runs/ with the
run folders of the trainings (logs and results; checkpoints are deleted once read). Parts:

  cost     (1) step time of OpenCLIP, SigLIP, FastCLIP-v3, NeuCLIP, AmorLIP split into phases, interleaved
           repeats, medians/IQR, ratio to OpenCLIP, FLOPs, NPN profile, peak memory, persistent state vs n
           (training.bench.cost)
  error    (2) estimation error vs batch size and data size, paper Figure 2c (training.bench.train)
  quality  (3) zero-shot / retrieval at a fixed budget over seeds, Table 1 in miniature (training.bench.train)
  gpu      (4) ViT-B/32 bf16 samples/s and NPN share vs the paper's Table 5; skipped without CUDA
           (training.bench.gpu)
  regime   estimation error vs n/B up to the paper's ~3 000 by feature-level simulation (the real method
           objects on synthetic backbone features; arms tau/fixed/drift; calibration against docs/results/
           cpu-error-n2048); only when asked for (training.bench.regime)
  input    training images/s per loader core, --input-pipeline fast vs open_clip on photo-like shards at
           --input-sizes (training.bench.input), then end to end in a loader-bound run: this trainer vs
           open_clip_train, samples/s (training.bench.input_e2e; --input-e2e-rounds 0 skips it); only when asked for

`--quick` shrinks every size to a smoke test (minutes): its numbers are not results. Under torchrun only the
cost part runs (every rank steps, rank 0 reports; comm = time inside the collectives). `--reuse` keeps the
trainings of an earlier run into the same DIR whose flags are unchanged (resume a long run).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

from training.bench.common import (METHOD_ORDER, command_line, git_commit, machine_info, parse_method_list)

PARTS = ("cost", "error", "quality", "gpu", "peer", "regime", "input")
DEFAULT_PARTS = ("cost", "error", "quality", "gpu")  # peer (needs open_clip_train), regime and input: when asked for
PART_TITLES = {"cost": "1. Cost per step", "error": "2. Estimation error vs batch size and data size",
               "quality": "3. Quality at a fixed budget", "gpu": "4. GPU mode"}  # of the default parts

# Sizes: the full CPU run (well under an hour on 2 free cores) and --quick (a smoke test).
FULL = dict(cost_batch=128, cost_warmup=3, cost_repeats=30, cost_data_batches=4, cost_memory_steps=5,
            error_batches="64,128", error_n=512, error_samples=20480, error_checkpoints=5, error_reference=4096,
            quality_batch=64, quality_n=5120, quality_samples=15360, seeds="0,1,2", npn_protos=512,
            gpu_batch=512, gpu_warmup=5, gpu_repeats=30, peer_batch=128, peer_steps=30, peer_warmup=3,
            peer_rounds=5, regime_batch=256, regime_ratios="100,1000,3000", regime_steps=6000, regime_checkpoints=3,
            regime_anchors=1024, regime_seeds="0,1,2",
            input_samples=512, input_samples_1024=256, input_rounds=3, input_batch=64,
            input_e2e_steps=20, input_e2e_rounds=5, input_e2e_size=512)
QUICK = dict(cost_batch=32, cost_warmup=1, cost_repeats=5, cost_data_batches=2, cost_memory_steps=2,
             error_batches="16,32", error_n=64, error_samples=1280, error_checkpoints=5, error_reference=512,
             quality_batch=32, quality_n=320, quality_samples=640, seeds="0", npn_protos=32,
             gpu_batch=512, gpu_warmup=2, gpu_repeats=5, peer_batch=8, peer_steps=4, peer_warmup=1, peer_rounds=1,
             regime_batch=16, regime_ratios="10,30", regime_steps=60, regime_checkpoints=2, regime_anchors=128,
             regime_seeds="0",
             input_samples=64, input_samples_1024=32, input_rounds=1, input_batch=16,
             input_e2e_steps=4, input_e2e_rounds=1, input_e2e_size=128)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="training.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="report folder (report.md, PNGs, JSON, runs/)")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (minutes); numbers are not results")
    p.add_argument("--model", default="neuclip-tiny", help="model of parts 1-3")
    p.add_argument("--device", default=None, help="parts 1-3 (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (0: torch's default). 1 by default: the trainings' data loader worker "
                        "gets the other core, and a shared machine does not stall OpenMP barriers")
    p.add_argument("--workers", type=int, default=1, help="data loader workers of the trainings")
    p.add_argument("--lr", type=float, default=1e-3, help="lr of every training (parts 2, 3)")
    p.add_argument("--npn-protos", type=int, default=None,
                   help="NeuCLIP's m in the trainings (parts 2, 3) and an extra part-1 row (part 1 always has the "
                        "paper's 4096; the data sets here are smaller than 4096 samples per restart)")
    p.add_argument("--npn-restart", type=int, default=500, help="NeuCLIP's T_r in the trainings (paper: 500)")
    p.add_argument("--reuse", action="store_true", help="reuse finished trainings in DIR/runs with identical flags")
    p.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="skip the start-up calibration that prints the estimated wall time")
    for part, names in (("cost", ("batch", "warmup", "repeats", "data_batches", "memory_steps")),
                        ("error", ("n", "samples", "checkpoints", "reference")),
                        ("quality", ("batch", "n", "samples")), ("gpu", ("batch", "warmup", "repeats")),
                        ("peer", ("batch", "steps", "warmup", "rounds")),
                        ("input", ("samples", "samples_1024", "rounds", "batch", "e2e_steps", "e2e_rounds", "e2e_size"))):
        for name in names:
            p.add_argument(f"--{part}-{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--error-batches", default=None, help="the two batch sizes of part 2, e.g. 64,128")
    p.add_argument("--seeds", default=None, help="seeds of part 3, e.g. 0,1,2")
    p.add_argument("--no-memory", dest="cost_memory", action="store_false", help="skip part 1's memory probes")
    p.add_argument("--cost-methods", default=",".join(METHOD_ORDER))
    p.add_argument("--error-methods", default="openclip,fastclip,neuclip")
    p.add_argument("--quality-methods", default=",".join(METHOD_ORDER))
    p.add_argument("--gpu-methods", default=",".join(METHOD_ORDER))
    p.add_argument("--gpu-model", default="ViT-B-32")
    p.add_argument("--peer-methods", default="openclip,neuclip-m512",
                   help="this trainer's methods next to open_clip_train (METHOD or neuclip-mM for m = M)")
    p.add_argument("--gpu-device", default="cuda", choices=("cuda", "cpu"),
                   help="part 4's device; cpu is a dry run of its plumbing (scripts/gpu_check.sh --dry-run)")
    p.add_argument("--gpu-protos", type=int, default=None, help="NeuCLIP's m in part 4 (default: the paper's 4096)")
    for name, kind, what in (("batch", int, "batch size B"), ("steps", int, "steps of every run"),
                             ("checkpoints", int, "error checkpoints per run (equal steps in every setting)"),
                             ("anchors", int, "anchors R whose exact normalizer is computed against all n"),
                             ("ratios", str, "n/B values, e.g. 100,1000,3000 (n = ratio × B)"),
                             ("seeds", str, "seeds, e.g. 0,1,2 (data, heads and batch order)")):
        p.add_argument(f"--regime-{name}", type=kind, default=None, help=f"regime part: {what}")
    p.add_argument("--regime-epochs", type=float, default=None,
                   help="regime part: run this many epochs at every n/B (steps = epochs × n/B; overrides --regime-steps)")
    p.add_argument("--regime-arms", default="tau,fixed,drift", help="regime part: arms (tau, fixed, drift)")
    p.add_argument("--regime-methods", default="openclip,fastclip,neuclip")
    p.add_argument("--regime-tau", type=float, default=0.05, help="regime part: τ of the fixed arms")
    p.add_argument("--no-regime-calibration", dest="regime_calibration", action="store_false",
                   help="regime part: skip the calibration against the real CPU miniature")
    p.add_argument("--input-sizes", default="512,1024", help="part input: JPEG widths (4:3 photo-like shards)")
    return p


def parse_opts(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    opts = parser.parse_args(argv)
    sizes = QUICK if opts.quick else FULL
    for name, value in sizes.items():
        if getattr(opts, name, None) is None:
            setattr(opts, name, value)
    try:
        opts.parts = [p.strip() for p in opts.parts.split(",") if p.strip()]
        unknown = set(opts.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
        opts.error_batches = sorted(int(b) for b in str(opts.error_batches).split(","))
        if len(opts.error_batches) != 2:
            raise ValueError("--error-batches takes exactly two batch sizes")
        opts.seeds = [int(s) for s in str(opts.seeds).split(",")]
        opts.regime_seeds = [int(s) for s in str(opts.regime_seeds).split(",")]
        opts.regime_ratios = [int(r) for r in str(opts.regime_ratios).split(",")]
        opts.regime_arms = [a.strip() for a in opts.regime_arms.split(",") if a.strip()]
        opts.regime_methods = [m.strip() for m in opts.regime_methods.split(",") if m.strip()]
        for name in ("cost_methods", "error_methods", "quality_methods", "gpu_methods"):
            setattr(opts, name, parse_method_list(getattr(opts, name)))
        opts.input_sizes = [int(s) for s in str(opts.input_sizes).split(",") if s.strip()]
        opts.peer_methods = [m.strip() for m in opts.peer_methods.split(",") if m.strip()]
        parse_method_list(",".join(m.partition("-m")[0] for m in opts.peer_methods))
        check_sizes(opts)
    except ValueError as exc:
        parser.error(str(exc))
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts.argv = list(argv)
    return opts


def check_sizes(opts) -> None:
    """Fail before anything runs when a size does not give exact epochs or common checkpoint points."""
    from training.bench.train import checkpoint_steps  # noqa: PLC0415
    if "error" in opts.parts:
        for b in opts.error_batches:
            if opts.error_n % b:
                raise ValueError(f"--error-n {opts.error_n} must be a multiple of each batch size ({b})")
            checkpoint_steps(opts.error_samples, opts.error_checkpoints, b)
        if opts.error_samples % (10 * opts.error_n):
            raise ValueError(f"--error-samples {opts.error_samples} must be a multiple of 10 × --error-n")
        if opts.npn_protos > opts.error_n:
            print(f"note: NeuCLIP's m = {opts.npn_protos} exceeds the small data set n = {opts.error_n}")
    if "regime" in opts.parts:
        from training.bench.regime import ARMS, REGIME_METHODS  # noqa: PLC0415
        bad = [a for a in opts.regime_arms if a not in ARMS] + [m for m in opts.regime_methods if m not in REGIME_METHODS]
        if bad:
            raise ValueError(f"--regime-arms/--regime-methods: unknown {bad}; arms {','.join(ARMS)}, methods "
                             f"{','.join(REGIME_METHODS)}")
        if min(opts.regime_ratios) < 2 or opts.regime_steps < opts.regime_checkpoints or opts.regime_checkpoints < 1 \
                or (opts.regime_epochs is not None and opts.regime_epochs <= 0):
            raise ValueError("--regime-ratios must be ≥ 2, --regime-steps ≥ --regime-checkpoints ≥ 1 and --regime-epochs > 0")
    if "quality" in opts.parts and (opts.quality_samples % opts.quality_n or opts.quality_n % opts.quality_batch):
        raise ValueError("--quality-samples must be a multiple of --quality-n, and --quality-n of --quality-batch")


# ----------------------------------------------------------------------------------------- report

def header_markdown(opts, info: dict, git: dict, started: str, seconds: float | None, done: list[str]) -> str:
    gpus = ", ".join(info["gpus"]) or "none"
    lines = ["# NeuCLIP benchmark report", ""]
    if opts.quick:
        lines += ["> **--quick: smoke-test sizes. These numbers check that the benchmark runs; they are not "
                  "results.**", ""]
    lines += [f"- Command: `{command_line(opts.argv)}`",
              f"- Git commit: `{git['commit']}`" + (" (working tree differs from it: "
                                                     f"{len(git['changed_files'])} changed tracked files)"
                                                     if git["dirty"] else ""),
              f"- Started: {started}" + (f"; wall time {seconds / 60:.1f} min" if seconds is not None else ""),
              f"- torch {info['torch']} (CUDA {info['cuda']}), open_clip {info['open_clip']}, Python {info['python']}",
              f"- Machine: {info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores, "
              f"torch threads {info['torch_threads']}; GPU: {gpus}; {info['platform']}",
              f"- Load average at start: {info['load_average']}" + (
                  f" — above the {info['usable_cores']} usable cores: the machine is shared and timings are noisy"
                  + ("" if info["torch_threads"] == 1 else " (several torch threads then also lose time in OpenMP "
                     "barriers when a core is taken away; `--threads 1` is steadier)")
                  if info["load_average"] and info["load_average"][0] > info["usable_cores"] else ""),
              f"- Parts: {', '.join(opts.parts)}; device of parts 1-3: {opts.device}; model {opts.model}", ""]
    missing = [p for p in opts.parts if p not in done]
    if missing and seconds is None:
        lines += [f"(In progress: {', '.join(missing)} not finished yet.)", ""]
    return "\n".join(lines)


def write_report(out: str, header: str, sections: dict, parts: list[str]) -> str:
    path = os.path.join(out, "report.md")
    body = [header] + [sections[p] for p in parts if p in sections]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(body).rstrip() + "\n")
    os.replace(path + ".tmp", path)
    return path


# ------------------------------------------------------------------------------------- estimate

def estimate_seconds(opts) -> dict:
    """A rough wall-time estimate from a short calibration on this machine, now: 3 OpenCLIP steps at the
    trainings' batch size, and the time to draw and preprocess samples (the data loader worker's job)."""
    from training.bench.common import method_spec  # noqa: PLC0415
    from training.bench.cost import CommTimer, Runner, clock_for, make_batches, make_model  # noqa: PLC0415
    device = torch.device(opts.device)
    batch = opts.quality_batch
    model, preprocess, tokenizer = make_model(opts.model, device, "fp32")
    start = time.perf_counter()
    batches = make_batches(preprocess, tokenizer, batch, 1, device)
    data_s = (time.perf_counter() - start) / batch
    runner = Runner.build(method_spec("openclip"), model, opts.model, batch, "fp32", batch, device)
    clock = clock_for(device)
    runner.step_once(batches[0], clock, CommTimer(clock))
    start = time.perf_counter()
    for _ in range(3):
        runner.step_once(batches[0], clock, CommTimer(clock))
    step_s = (time.perf_counter() - start) / 3 / batch
    factor = {"openclip": 1.0, "siglip": 1.0, "fastclip": 1.2, "neuclip": 1.6, "amorlip": 1.6}

    def per_sample(method: str) -> float:  # a data loader worker overlaps drawing samples with training
        work = step_s * factor[method]
        return max(work, data_s) if opts.workers > 0 else work + data_s

    est = {}
    if "cost" in opts.parts:
        rounds = opts.cost_warmup + opts.cost_repeats + 2
        per_round = sum(opts.cost_batch * step_s * (6.0 if m == "neuclip" else factor[m]) for m in opts.cost_methods)
        est["cost"] = rounds * per_round + (8 + 5 * opts.cost_batch * step_s * 3) * len(opts.cost_methods)
    if "error" in opts.parts:
        total = 0.0
        for m in opts.error_methods:
            for n in (opts.error_n, 10 * opts.error_n):
                ref = min(n, opts.error_reference)
                measures = opts.error_checkpoints + opts.error_samples // n
                total += 2 * (4 + opts.error_samples * per_sample(m) + measures * ref * step_s / 3 + ref * data_s)
        est["error"] = total
    if "quality" in opts.parts:
        per = sum(per_sample(m) for m in opts.quality_methods) * opts.quality_samples
        est["quality"] = len(opts.seeds) * (per + len(opts.quality_methods) * (4 + 4000 * data_s))
    est["calibration"] = {"train_s_per_sample": step_s, "data_s_per_sample": data_s, "batch": batch}
    return est


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_opts(argv)
    # Before open_clip's first module-level logging.warning: on a handler-less root that call installs
    # logging's default stderr handler, and every line of the trainings would then print twice.
    from training.logger import setup_logging  # noqa: PLC0415
    setup_logging(None, True)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from training.distributed import init_distributed, shutdown  # noqa: PLC0415
    opts.dist_info = init_distributed(opts.device if opts.device != "cuda" else None)
    if opts.dist_info.distributed:
        opts.device = str(opts.dist_info.device)
        if opts.parts != ["cost"]:
            raise SystemExit("under torchrun only --parts cost runs (the trainings of parts 2-3 launch their own "
                             "processes): run the other parts in one process")
    master = opts.dist_info.is_master
    log = (lambda msg: print(msg, flush=True)) if master else (lambda msg: None)
    os.makedirs(opts.out, exist_ok=True)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    info, git = machine_info(), git_commit()
    log(f"training.bench: parts {','.join(opts.parts)}{' (--quick)' if opts.quick else ''} -> {opts.out}")
    log(f"machine: {info['cpu']}, {info['usable_cores']} cores, torch threads {info['torch_threads']}, "
        f"GPU {', '.join(info['gpus']) or 'none'}, load average {info['load_average']}")
    if info["load_average"] and info["load_average"][0] > info["usable_cores"] and info["torch_threads"] > 1:
        log("warning: the load average exceeds the cores: timings will be noisy, and with several torch threads "
            "much slower (OpenMP barriers); --threads 1 is steadier on a shared machine")
    if master and not opts.dist_info.distributed and opts.estimate:
        est = estimate_seconds(opts)
        parts = {k: v for k, v in est.items() if k != "calibration"}
        log("estimated time (rough, from a short calibration on this machine now): "
            + ", ".join(f"{k} ~{v / 60:.1f} min" for k, v in parts.items())
            + f"; total ~{sum(parts.values()) / 60:.1f} min")
    sections, data, done = {}, {}, []
    runners = {"cost": _run_cost, "error": _run_error, "quality": _run_quality, "gpu": _run_gpu, "peer": _run_peer,
               "regime": _run_regime, "input": _run_input}
    for part in opts.parts:
        part_start = time.perf_counter()
        section, part_data = runners[part](opts, log)
        part_data["seconds"] = time.perf_counter() - part_start
        if master:
            sections[part], data[part] = section, part_data
            done.append(part)
            with open(os.path.join(opts.out, f"{part}.json"), "w") as f:
                json.dump(part_data, f, indent=1, default=_json_default)
            write_report(opts.out, header_markdown(opts, info, git, started, None, done), sections, opts.parts)
            log(section)
            log(f"[{part}] done in {part_data['seconds'] / 60:.1f} min")
    seconds = time.perf_counter() - t0
    path = None
    if master:
        path = write_report(opts.out, header_markdown(opts, info, git, started, seconds, done), sections, opts.parts)
        with open(os.path.join(opts.out, "machine.json"), "w") as f:
            json.dump({"machine": info, "git": git, "command": command_line(opts.argv), "started": started,
                       "seconds": seconds, "load_average_end": machine_info()["load_average"]}, f, indent=1)
        log(f"report: {path} ({seconds / 60:.1f} min)")
    shutdown()
    return {"report": path, "seconds": seconds, "data": data}


def _run_cost(opts, log):
    from training.bench.cost_report import run_cost  # noqa: PLC0415
    return run_cost(opts, opts.out, log)


def _run_error(opts, log):
    from training.bench.train import run_error  # noqa: PLC0415
    return run_error(opts, opts.out, log)


def _run_quality(opts, log):
    from training.bench.train import run_quality  # noqa: PLC0415
    return run_quality(opts, opts.out, log)


def _run_gpu(opts, log):
    from training.bench.gpu import run_gpu  # noqa: PLC0415
    return run_gpu(opts, opts.out, log)


def _run_peer(opts, log):
    from training.bench.peer import run_peer  # noqa: PLC0415
    return run_peer(opts, opts.out, log)


def _run_regime(opts, log):
    from training.bench.regime_report import run_regime  # noqa: PLC0415
    return run_regime(opts, opts.out, log)


def _run_input(opts, log):
    from training.bench.input import run_input  # noqa: PLC0415
    from training.bench.input_e2e import run_input_e2e  # noqa: PLC0415
    section, data = run_input(opts, opts.out, log)
    if opts.input_e2e_rounds > 0:
        e2e_section, data["end_to_end"] = run_input_e2e(opts, opts.out, log)
        section = "\n".join(filter(None, [section, e2e_section]))
    return section, data


def _json_default(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if torch.is_tensor(obj):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":
    main()
