"""The device-decoding input pipeline's throughput (`--input-pipeline device`, training.data.device_decode): the
GPU step of scripts/gpu_check.sh, also runnable on the CPU.

    PYTHONPATH=src python -m training.bench.gpu_decode [--device cuda] [--size 512] [--batches 256,512] [--json F]

Photo-like JPEGs (`training.data.synthetic` shards, --style photo, `--size` px wide, 4:3, quality 90; ~95 KB at
512x384) go through the pipeline's worker transform (EncodedCropTransform: lazy open, RandomResizedCrop's box,
one uint8 row per sample) and are stacked into batches of 256-512 rows as the loader's workers do. Measured:
- the device stage (DecodeOnDevice: batched decode_jpeg, nvJPEG on CUDA, crop, resize, normalise) on `--device`:
  images/s after a warm-up, the device synchronised around the timing, and the main process's CPU seconds per
  image (time.process_time) over the same span: the share of a core that feeding the device costs. Target on
  one GPU: >= 3000 images/s at <= 1 CPU core;
- the worker side, images per CPU second: EncodedCropTransform (no pixel decoding) next to the fast pipeline's
  FastTrainTransform (DCT-scaled decode, uint8 crop and resize) on the same JPEGs and seeds;
- on a CPU `--device`, the whole device pipeline per CPU second next to the whole fast pipeline (worker +
  NormalizeOnDevice), both on one torch thread: what the device path costs where there is no accelerator.
The transform is ViT-B-32's (224 px, RandomResizedCrop scale 0.9-1, bicubic), as in `training.bench --parts input`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import tarfile
import tempfile
import time

import torch

TARGET_IMAGES_PER_S, TARGET_CORES = 3000, 1.0


def parse(argv):
    p = argparse.ArgumentParser(prog="training.bench.gpu_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512, help="JPEG width (height 3/4 of it)")
    p.add_argument("--distinct", type=int, default=64, help="distinct JPEGs (batches cycle through them)")
    p.add_argument("--batches", default="256,512", help="batch sizes, comma-separated")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def photo_jpegs(size: int, count: int) -> list[bytes]:
    """`count` photo-like JPEGs `size` px wide, written as the trainer's shards and read back."""
    from training.data.synthetic.shards import write_shards  # noqa: PLC0415
    with tempfile.TemporaryDirectory() as folder:
        paths = write_shards(folder, count, seed=0, samples_per_shard=count, size=size, style="photo",
                             workers=min(8, os.cpu_count() or 1))
        jpegs = []
        for path in paths:
            with tarfile.open(path) as tar:
                jpegs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return jpegs


def per_cpu_second(work, items) -> tuple[float, list]:
    """(items per CPU second of this process, the outputs), each item seeded by its index."""
    outputs = []
    start = time.process_time()
    for i, item in enumerate(items):
        torch.manual_seed(i)
        outputs.append(work(item))
    return len(items) / max(time.process_time() - start, 1e-9), outputs


def time_device_stage(stage, batch: torch.Tensor, device: torch.device, warmup: int, repeats: int) -> dict:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        stage(batch, device, None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        stage(batch, device, None)
    sync()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = repeats * len(batch)
    return {"batch": len(batch), "images_per_s": images / wall, "cpu_s_per_image": cpu / images,
            "cores": cpu / wall, "wall_s": wall}


def pixel_difference(a: torch.Tensor, b: torch.Tensor, transform) -> dict:
    """PSNR (dB) and the largest difference, in 8-bit grey levels, of two normalised batches."""
    std = torch.tensor(transform.transforms[-1].std).view(1, -1, 1, 1)
    levels = (a.float() - b.float()) * std * 255
    mse = (levels ** 2).mean().item()
    return {"psnr_db": 10 * math.log10(255 ** 2 / mse) if mse else math.inf, "max_levels": levels.abs().max().item()}


def measure(opts) -> dict:
    from training.bench.input import reference_transform  # noqa: PLC0415
    from training.data.device_decode import stack_images, train_image_pipeline  # noqa: PLC0415
    from training.data.fast_images import open_image_lazily  # noqa: PLC0415
    device = torch.device(opts.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # per-core figures on a shared machine
    jpegs = photo_jpegs(opts.size, opts.distinct)
    transform = reference_transform()
    images, fast = train_image_pipeline("device", transform), train_image_pipeline("fast", transform)
    worker_rate, rows = per_cpu_second(lambda d: images.transform(images.open_bytes(d)), jpegs)
    fast_rate, pixels = per_cpu_second(lambda d: fast.transform(open_image_lazily(d)), jpegs)
    result = {"device": str(device), "size": f"{opts.size}x{opts.size * 3 // 4}", "distinct": len(jpegs),
              "jpeg_kb": sum(map(len, jpegs)) / len(jpegs) / 1000, "worker_images_per_cpu_s": worker_rate,
              "fast_worker_images_per_cpu_s": fast_rate, "stages": []}
    for size in (int(b) for b in opts.batches.split(",")):
        batch = stack_images([rows[i % len(rows)] for i in range(size)])
        if device.type == "cuda":
            batch = batch.pin_memory()  # as the loader pins batches when CUDA is present
        result["stages"].append(time_device_stage(images.to_device, batch, device, opts.warmup, opts.repeats))
    sample = stack_images(rows[:32])  # the device's pixels next to the CPU decoder's (libjpeg-turbo): on a CPU, equal
    result["vs_cpu_rows"] = len(sample)
    result["vs_cpu"] = pixel_difference(images.to_device(sample, device, None).cpu(),
                                        images.to_device(sample, torch.device("cpu"), None), transform)
    if device.type == "cpu":  # the whole pipeline per CPU second, both ways, on one thread
        fast_batch = stack_images([pixels[i % len(pixels)] for i in range(len(batch))])
        fast_stage = time_device_stage(fast.to_device, fast_batch, device, 1, opts.repeats)
        device_stage = result["stages"][-1]
        result["device_pipeline_images_per_cpu_s"] = 1 / (1 / worker_rate + device_stage["cpu_s_per_image"])
        result["fast_pipeline_images_per_cpu_s"] = 1 / (1 / fast_rate + fast_stage["cpu_s_per_image"])
    result["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return result


def summary_lines(result: dict) -> list[str]:
    lines = [f"- {result['size']} photo JPEGs ({result['jpeg_kb']:.0f} KB, {result['distinct']} distinct), ViT-B-32's "
             f"train transform, device stage on `{result['device']}`; `uptime`: {result['uptime']}", "",
             "| batch | images/s | main-process CPU s/image | CPU cores used |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['batch']} | {s['images_per_s']:.0f} | {s['cpu_s_per_image'] * 1e6:.0f} µs | {s['cores']:.2f} |"
              for s in result["stages"]]
    lines += ["", "- Worker side, images per CPU second: EncodedCropTransform "
              f"{result['worker_images_per_cpu_s']:.0f}, the fast pipeline's FastTrainTransform "
              f"{result['fast_worker_images_per_cpu_s']:.0f}"]
    lines.append(f"- The device's pixels vs the CPU decoder's (libjpeg-turbo, as PIL), same {result['vs_cpu_rows']} "
                 f"rows: PSNR {result['vs_cpu']['psnr_db']:.1f} dB, at most {result['vs_cpu']['max_levels']:.0f} "
                 "grey levels")
    if "device_pipeline_images_per_cpu_s" in result:
        lines.append("- Whole pipeline on the CPU (one thread), images per CPU second: device path "
                     f"{result['device_pipeline_images_per_cpu_s']:.0f}, "
                     f"fast {result['fast_pipeline_images_per_cpu_s']:.0f}")
    return lines + [verdict(result)]


def verdict(result: dict) -> str:
    best = max(result["stages"], key=lambda s: s["images_per_s"])
    met = best["images_per_s"] >= TARGET_IMAGES_PER_S and best["cores"] <= TARGET_CORES
    state = ("met" if met else "NOT met") if result["device"].startswith("cuda") else "no verdict: not a GPU"
    return (f"- Device decoding, target on one GPU >= {TARGET_IMAGES_PER_S} images/s at <= {TARGET_CORES:g} CPU "
            f"core: best {best['images_per_s']:.0f} images/s at {best['cores']:.2f} cores (batch {best['batch']}, "
            f"{result['device']}): {state}")


def main(argv=None) -> dict:
    opts = parse(argv)
    result = measure(opts)
    print("\n".join(summary_lines(result)), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
