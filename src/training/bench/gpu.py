"""Part 4 of `training.bench`: GPU throughput, next to the paper's Table 5.

ViT-B/32 (`--gpu-model`), bf16 autocast, local batch 512 or the largest power-of-two fraction of it that fits,
synthetic tensors as input (no data loading); every method interleaved as in part 1; samples/s and NeuCLIP's
NPN share of the step (m = 4096, T_u = 10, the paper's). The paper's Table 5 numbers are per iteration on 8
H100s (global batch 4096, so 512 per GPU) with communication; here it is one GPU without communication.
"""
from __future__ import annotations

import gc
import math
import os

import torch

from training.bench.common import METHOD_ORDER, PAPER_NPN, fmt, human_bytes, markdown_table, method_spec
from training.bench.cost import (PHASES, CommTimer, Runner, clock_for, count_flops, data_size_for, make_batches,
                                 make_model, measure, summarize)
from training.bench.cost_report import plot_step_times

# NeuCLIP paper, Table 5: (data set, vision encoder, NPN ms, total ms, share)
PAPER_TABLE5 = [("CC3M", "ResNet50", "49.23 ± 1.10", "529.09 ± 21.79", "9.30%"),
                ("DFN-14M", "ViT-B/32", "54.17 ± 3.98", "897.79 ± 31.89", "6.03%"),
                ("DFN-192M", "ViT-B/16", "56.43 ± 2.83", "944.41 ± 29.40", "5.98%")]


def flop_share(flops: dict) -> str:
    """before_encoder_step's (the NPN inner loop's) share of the step's counted FLOPs."""
    total = sum(v for k, v in flops.items() if isinstance(v, (int, float)))
    if not total or "before" not in flops or not flops["before"]:
        return "—"
    return f"{100 * flops['before'] / total:.2f}%"


def skipped_markdown(reason: str) -> str:
    return f"## 4. GPU mode\n\nSkipped: {reason}\n"


def run_gpu(opts, out_dir: str, log) -> tuple[str, dict]:
    dry_run = getattr(opts, "gpu_device", "cuda") == "cpu"  # the same plumbing on CPU (scripts/gpu_check.sh)
    if not dry_run and not torch.cuda.is_available():
        reason = "no CUDA device here (`torch.cuda.is_available()` is False); the CPU parts above are the report."
        log(f"[gpu] {reason}")
        return skipped_markdown(reason), {"skipped": reason}
    device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
    protos = getattr(opts, "gpu_protos", None) or PAPER_NPN["protos"]
    specs = [method_spec(f, key=f, protos=protos) for f in METHOD_ORDER if f in opts.gpu_methods]
    model, preprocess, tokenizer = make_model(opts.gpu_model, device, "amp_bf16")
    batch = opts.gpu_batch
    clock = clock_for(device)
    while True:
        try:
            batches = make_batches(preprocess, tokenizer, batch, 2, device, tensors=True)
            runners = [Runner.build(s, model, opts.gpu_model, batch, "amp_bf16", data_size_for(batch, 2), device)
                       for s in specs]
            for runner in runners:  # one trial step each: does this batch fit?
                runner.step_once(batches[0], clock, CommTimer(clock))
            break
        except torch.OutOfMemoryError:
            runners = batches = None
            gc.collect()
            torch.cuda.empty_cache()
            if batch <= 8:
                raise
            batch //= 2
            log(f"[gpu] out of memory: trying local batch {batch}")
    log(f"[gpu] {opts.gpu_model}, local batch {batch}, bf16 autocast, {opts.gpu_warmup} warm-up + "
        f"{opts.gpu_repeats} measured rounds")
    results, peaks = measure(runners, batches, opts.gpu_warmup, opts.gpu_repeats, clock, CommTimer(clock))
    summary = summarize(results, specs[0].key if specs[0].family == "openclip" else None)
    flops = {r.spec.key: count_flops(r, batches[0], clock) for r in runners}
    data = {"model": opts.gpu_model, "batch": batch, "requested_batch": opts.gpu_batch, "protos": protos,
            "gpu": "CPU (dry run: plumbing only, not results)" if dry_run else torch.cuda.get_device_name(),
            "flops": flops, "dry_run": dry_run,
            "summary": summary, "raw": results, "peaks": peaks, "specs": [s.__dict__ for s in specs]}
    data["plots"] = [plot_step_times(summary, specs, os.path.join(out_dir, "gpu_step_time.png"),
                                     f"{opts.gpu_model}, local batch {batch}, bf16 autocast, {data['gpu']}")]
    return gpu_markdown(data, specs), data


def gpu_markdown(data: dict, specs) -> str:
    summary, batch = data["summary"], data["batch"]
    lines = ["## 4. GPU mode", ""]
    lines.append(f"`{data['model']}` on one {data['gpu']}, bf16 autocast, local batch {batch}"
                 + (f" (asked for {data['requested_batch']}; it did not fit)"
                    if batch != data["requested_batch"] else "")
                 + ", random tensors as input (no data loading), methods interleaved as in part 1. NeuCLIP with "
                 + f"m = {data.get('protos', 4096)}, T_u = 10 (the paper's: m = 4096)."
                 + " *NPN FLOP share* is the inner loop's matmul FLOPs over the step's: the share its time would "
                   "have at the step's FLOP rate (the limit a perfectly efficient NPN approaches).")
    lines.append("")
    header = ["method", "samples/s (median [IQR])", "step ms", "× OpenCLIP", "NPN inner loop ms", "NPN share",
              "paper (Table 5, ViT-B/32)", "NPN FLOP share", "before_encoder_step share", "step peak memory"]
    rows = []
    for spec in specs:
        e = summary[spec.key]
        tot = e["total"]
        npn = e["npn_inner"]["median"] if e["npn_inner"] else math.nan
        rate = [batch / tot["iqr"][1], batch / tot["median"], batch / tot["iqr"][0]]
        rows.append([spec.label, f"{rate[1]:.0f} [{rate[0]:.0f}–{rate[2]:.0f}]", f"{tot['median'] * 1e3:.1f}",
                     fmt(e["ratio"]["median"]) if e.get("ratio") else "—",
                     "—" if math.isnan(npn) else f"{npn * 1e3:.2f}",
                     "—" if math.isnan(npn) else f"{100 * npn / tot['median']:.2f}%",
                     PAPER_TABLE5[1][4] if spec.family == "neuclip" else "—",
                     flop_share(data.get("flops", {}).get(spec.key, {})),
                     f"{100 * e['before']['median'] / tot['median']:.2f}%",
                     human_bytes(data["peaks"][spec.key]) if data["peaks"][spec.key] else "n/a (CPU)"])
    lines += [markdown_table(header, rows), ""]
    lines += ["Paper, Table 5 (8 H100s, per iteration, including communication):", "",
              markdown_table(["data set", "vision encoder", "NPN time (ms)", "total time (ms)", "percentage"],
                             [list(r) for r in PAPER_TABLE5]), ""]
    phase_rows = [[s.label, *(f"{summary[s.key][p]['median'] * 1e3:.2f}" for p in PHASES)] for s in specs]
    lines += ["Phase medians (ms):", "", markdown_table(["method", *PHASES], phase_rows), "",
              "![GPU step time](gpu_step_time.png)", ""]
    return "\n".join(lines)
