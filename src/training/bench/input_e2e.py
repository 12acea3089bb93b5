"""Part "input" of `training.bench`, end to end: samples/s of whole trainings whose speed is set by the data
loader, this trainer next to open_clip's own (`open_clip_train`), on the same photo-like JPEG shards.

Loader-bound by construction: the model is `neuclip-tiny-224` (ViT with 32-px patches on 224-px images, one
layer of width 32 per tower: a few ms per step on a CPU core), one torch thread, `--workers 1`, so a step
waits for its batch from the single worker, which decodes, augments and tokenises. Three trainings per round,
interleaved (round r starts at trainer r mod 3):
  peer       open_clip_train (open_clip 3.3.0): PIL decode, its train transform, float32 batches
  open_clip  this trainer with `--input-pipeline open_clip` (the same transform: isolates the trainer's own
             overhead from the pipeline's)
  fast       this trainer with `--input-pipeline fast` (the default; training.data.fast_images)
Every training runs OpenCLIP's loss, fp32, batch --input-batch, on the same shards. Timing is the peer part's
(training.bench.peer_run): each "Train Epoch" log line is stamped in-process, step times are differences of
consecutive stamps (start-up and the first --peer-warmup steps dropped); samples/s = batch / median step time;
ratios are paired within a round, then median and range over rounds. Workers' and the main process's CPU
seconds per step show where the time went (a loader-bound run: the worker busy for most of each step).
"""
from __future__ import annotations

import argparse
import os

from training.bench.common import markdown_table, median
from training.bench.peer import run_one

MODEL = "neuclip-tiny-224"
TRAINERS = (("peer", "open_clip_train (its own pipeline)", ()),
            ("open_clip", "this trainer, --input-pipeline open_clip", ("--input-pipeline", "open_clip")),
            ("fast", "this trainer, --input-pipeline fast", ("--input-pipeline", "fast")))
TARGET = 2.0  # this trainer's samples/s over open_clip_train's, same --workers


def run_input_e2e(opts, out_dir: str, log) -> tuple[str, dict]:
    from training.bench.input import photo_shards, uptime  # noqa: PLC0415
    batch, steps, size = opts.input_batch, opts.input_e2e_steps, opts.input_e2e_size
    samples = batch * (steps + 1)  # one spare batch: the last may be dropped
    shards = photo_shards(out_dir, size, samples)
    warmup = min(3, max(0, steps - 2))
    settings = argparse.Namespace(model=MODEL, peer_batch=batch, workers=1, threads=1, peer_warmup=warmup)
    work = os.path.join(out_dir, "input_e2e")
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in TRAINERS}
    for rnd in range(opts.input_e2e_rounds):
        shift = rnd % len(TRAINERS)
        for key, _, flags in TRAINERS[shift:] + TRAINERS[:shift]:
            result = run_one(settings, key, flags, shards, samples, work, rnd)
            result["samples_per_s"] = batch / result["median_s"]
            runs[key].append(result)
            log(f"[input e2e] round {rnd + 1}/{opts.input_e2e_rounds} {key}: {result['samples_per_s']:.1f} samples/s "
                f"(worker {result['workers_cpu_s']:.3f} CPU s/step, main {result['cpu_s']:.3f})")
    summary = summarize(runs)
    data = {"model": MODEL, "batch": batch, "steps": steps, "warmup": warmup, "size": size, "shards": shards,
            "rounds": opts.input_e2e_rounds, "runs": runs, "summary": summary, "target": TARGET, "uptime": uptime()}
    return e2e_markdown(data), data


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for key, rs in runs.items():
        ratios = [r["samples_per_s"] / p["samples_per_s"] for r, p in zip(rs, runs["peer"])]
        out[key] = {"samples_per_s": median([r["samples_per_s"] for r in rs]),
                    "vs_peer": {"median": median(ratios), "min": min(ratios), "max": max(ratios)},
                    "workers_cpu_s": median([r["workers_cpu_s"] for r in rs]),
                    "main_cpu_s": median([r["cpu_s"] for r in rs]),
                    "step_s": median([r["median_s"] for r in rs])}
    return out


def e2e_markdown(data: dict) -> str:
    rows = []
    for key, label, _ in TRAINERS:
        e = data["summary"][key]
        ratio = e["vs_peer"]
        rows.append([label, f"{e['samples_per_s']:.1f}",
                     f"**{ratio['median']:.2f}x** ({ratio['min']:.2f}-{ratio['max']:.2f})" if key != "peer" else "1",
                     f"{e['step_s']:.3f}", f"{e['workers_cpu_s']:.3f}", f"{e['main_cpu_s']:.3f}"])
    return "\n".join([
        "## Input pipeline end to end: a loader-bound training, this trainer vs open_clip_train", "",
        f"`{data['model']}` (224 px), OpenCLIP's loss, fp32, batch {data['batch']}, one torch thread, --workers 1, "
        f"photo-like {data['size']}x{data['size'] * 3 // 4} JPEG shards; {data['rounds']} interleaved rounds of "
        f"{data['steps']} steps per training, the first {data['warmup']} dropped (training.bench.input_e2e). "
        f"Target: >= {data['target']:g}x open_clip_train's samples/s.", "",
        markdown_table(["training", "samples/s", "x open_clip_train (per-round ratios: median, range)",
                        "s/step", "worker CPU s/step", "main CPU s/step"], rows), "",
        f"`uptime` at the end: {data['uptime']}", ""])
