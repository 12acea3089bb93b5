"""Part "input" of `training.bench`: training images per second per loader core, the fast input pipeline
(`--input-pipeline fast`, training.data.fast_images) next to open_clip's train transform (`--input-pipeline
open_clip`) on the same shards; and the workers of `--input-pipeline device` (JPEG bytes and crop boxes only:
the loader cores a GPU-decoding run needs).

The shards are photo-like JPEGs written by `python -m training.data.synthetic --style photo` at each
--input-sizes width (4:3; ~95 KB at 512x384, quality 90). Each measurement is one epoch of this trainer's
own training loader (`training.data.get_data`) with --workers 1, and "per loader core" is images per CPU
second of that worker process (reading the tar, decoding, augmenting, tokenising, batching, handing the
batch over through shared memory), which a busy shared machine does not distort as it does wall-clock
rates. The device-side normalisation of the fast pipeline is not in it: it runs on the accelerator. The transform is ViT-B-32's
(224 px, RandomResizedCrop scale 0.9-1, bicubic). Rounds interleave the pipelines, the first one
rotating, and each round's ratio fast / open_clip is taken within the round, so a change in the load of a
shared machine hits both alike; the table gives the median and range of the per-round ratios.

Then, end to end, a loader-bound training of this trainer next to open_clip_train's (training.bench.input_e2e).

Also measured, on the same JPEGs: decoding alone by PIL at full size and at the DCT scale the fast pipeline
picks, and by torchvision.io.decode_jpeg (full size only: it has no DCT scaling); and tokenising one
caption, the per-sample cost the two pipelines share.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import resource
import subprocess
import tarfile
import time

import torch

from training.bench.common import markdown_table, median

PIPELINES = ("open_clip", "fast", "device")
#: `device` ships JPEG bytes and crop boxes; its decode runs where the batch lands (training.data.device_decode).
#: Here only its workers are timed, so its figure is the loader cores a GPU run needs, not a CPU run's speed.


def photo_shards(out_dir: str, size: int, samples: int) -> str:
    """The shard pattern of `samples` photo-like JPEGs `size` px wide under out_dir (written once, reused)."""
    import json  # noqa: PLC0415

    from training.data.synthetic.shards import shard_pattern, write_shards  # noqa: PLC0415
    folder = os.path.join(out_dir, "input_shards", f"photo{size}_n{samples}")
    info_path = os.path.join(folder, "info.json")
    if not os.path.exists(info_path):
        write_shards(folder, samples, seed=0, samples_per_shard=max(1, samples // 2), size=size, style="photo")
    with open(info_path) as f:
        return shard_pattern(folder, json.load(f)["num_shards"])


def reference_transform():
    """open_clip's train transform for ViT-B-32's preprocess config (224 px, OpenAI mean/std)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: PLC0415
    return image_transform_v2(PreprocessCfg(), is_train=True)


def loader_args(pattern: str, samples: int, batch: int, pipeline: str, workers: int) -> argparse.Namespace:
    return argparse.Namespace(
        train_data=pattern, val_data=None, dataset_type="webdataset", dataset_resampled=False, workers=workers,
        batch_size=batch, world_size=1, rank=0, seed=0, train_num_samples=samples, input_pipeline=pipeline,
        uses_per_sample_state=False, data_size=None, train_data_upsampling_factors=None)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: the loader's finished workers
    return usage.ru_utime + usage.ru_stime


def time_loader(pattern: str, samples: int, batch: int, pipeline: str, transform, tokenizer) -> dict:
    """One epoch of the training loader with one worker process. Its CPU seconds (the worker exits and is
    reaped at the end of the epoch) give images per loader-core-second, whatever else the machine runs."""
    from training.data.loader import get_data  # noqa: PLC0415
    info = get_data(loader_args(pattern, samples, batch, pipeline, 1), transform, transform, tokenizer)["train"]
    info.set_epoch(0)
    start, worker_start, main_start = time.perf_counter(), children_cpu_s(), time.process_time()
    images, dtype, batch_bytes = 0, None, 0
    for batch_images, _, _ in info.dataloader:
        images += batch_images.shape[0]
        dtype, batch_bytes = str(batch_images.dtype).replace("torch.", ""), batch_images.nbytes
    gc.collect()  # the finished iterator's workers are joined by now; this drops any reference left
    wall, main = time.perf_counter() - start, time.process_time() - main_start
    worker = children_cpu_s() - worker_start
    return {"images": images, "wall_s": wall, "worker_cpu_s": worker, "main_cpu_s": main,
            "images_per_s": images / wall, "images_per_core_s": images / max(worker, 1e-9),
            "batch_dtype": dtype, "batch_bytes": batch_bytes}


def shard_jpegs(pattern: str, limit: int) -> tuple[list[bytes], list[str]]:
    from training.data.checks import expand_shard_urls  # noqa: PLC0415
    jpegs, captions = [], []
    for url in expand_shard_urls(pattern, "--train-data"):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    jpegs.append(tar.extractfile(member).read())
                elif member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8"))
                if len(jpegs) >= limit and len(captions) >= limit:
                    return jpegs, captions
    return jpegs, captions


def time_decoders(jpegs: list[bytes], out_size: int = 224) -> dict:
    """Images/s of decoding alone: PIL full size, PIL at the fast pipeline's DCT scale for an uncropped image
    (its largest possible box), torchvision.io.decode_jpeg (libjpeg-turbo too, no DCT scaling)."""
    from PIL import Image  # noqa: PLC0415
    from torchvision.io import decode_jpeg  # noqa: PLC0415

    from training.data.fast_images import dct_reduction  # noqa: PLC0415

    def pil(data, scaled):
        image = Image.open(io.BytesIO(data))
        if scaled:
            k = dct_reduction(*image.size, out_size, out_size)
            image.draft(None, (image.size[0] // k, image.size[1] // k))
        image.load()

    decoders = {"PIL (full size)": lambda d: pil(d, False), "PIL draft (DCT-scaled)": lambda d: pil(d, True),
                "torchvision decode_jpeg": lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8))}
    out = {}
    for name, decode in decoders.items():
        start = time.process_time()  # CPU seconds: one core's rate, whatever else the machine runs
        for data in jpegs:
            decode(data)
        out[name] = len(jpegs) / max(time.process_time() - start, 1e-9)
    return out


def time_tokenizer(captions: list[str], tokenizer) -> dict:
    from training.data.loader import tokenize_one  # noqa: PLC0415
    tokenizer(captions)  # both ways below then find the BPE cache equally warm
    start = time.process_time()
    for caption in captions:
        tokenize_one(tokenizer, caption)
    one = (time.process_time() - start) / len(captions)
    start = time.process_time()
    tokenizer(captions)
    batched = (time.process_time() - start) / len(captions)
    return {"one_at_a_time_us": one * 1e6, "batched_us": batched * 1e6}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"


def run_input(opts, out_dir: str, log) -> tuple[str, dict]:
    import open_clip  # noqa: PLC0415
    transform, tokenizer = reference_transform(), open_clip.get_tokenizer("ViT-B-32")
    data, rows = {"sizes": {}}, []
    for size in opts.input_sizes:
        samples = opts.input_samples_1024 if size >= 1024 else opts.input_samples
        pattern = photo_shards(out_dir, size, samples)
        jpegs, captions = shard_jpegs(pattern, 64)
        kb = sum(map(len, jpegs)) / len(jpegs) / 1000
        time_loader(pattern, opts.input_batch, opts.input_batch, "fast", transform, tokenizer)  # warm-up
        rounds = []
        for r in range(opts.input_rounds):
            order = PIPELINES[r % 3:] + PIPELINES[:r % 3]  # each pipeline goes first in turn
            result = {p: time_loader(pattern, samples, opts.input_batch, p, transform, tokenizer) for p in order}
            result["ratio"] = result["fast"]["images_per_core_s"] / result["open_clip"]["images_per_core_s"]
            result["wall_ratio"] = result["fast"]["images_per_s"] / result["open_clip"]["images_per_s"]
            result["device_ratio"] = result["device"]["images_per_core_s"] / result["open_clip"]["images_per_core_s"]
            rounds.append(result)
            log(f"[input] {size} px round {r + 1}: images per loader-core-second: open_clip "
                f"{result['open_clip']['images_per_core_s']:.1f}, fast {result['fast']['images_per_core_s']:.1f}, "
                f"ratio {result['ratio']:.2f} (wall-clock images/s ratio {result['wall_ratio']:.2f}); device's workers "
                f"{result['device']['images_per_core_s']:.1f} ({result['device_ratio']:.2f}x)")
        decoders, tokens = time_decoders(jpegs), time_tokenizer(captions, tokenizer)
        data["sizes"][size] = {"pattern": pattern, "jpeg_kb": kb, "rounds": rounds, "decoders": decoders,
                               "tokenizer": tokens}
        ratios = [r["ratio"] for r in rounds]
        target = 3.0 if size >= 1024 else 2.5
        walls = [r["wall_ratio"] for r in rounds]
        rows.append([f"{size}x{size * 3 // 4}", f"{kb:.0f} KB",
                     f"{median([r['open_clip']['images_per_core_s'] for r in rounds]):.1f}",
                     f"{median([r['fast']['images_per_core_s'] for r in rounds]):.1f}",
                     f"**{median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})", f">= {target:g}x",
                     f"{median(walls):.2f}x",
                     f"{median([r['device']['images_per_core_s'] for r in rounds]):.1f} "
                     f"({median([r['device_ratio'] for r in rounds]):.2f}x)",
                     " / ".join(f"{decoders[k]:.0f}" for k in decoders),
                     f"{tokens['one_at_a_time_us']:.0f} / {tokens['batched_us']:.0f}"])
    section = "\n".join([
        "## Input pipeline: training images per second per loader core", "",
        f"ViT-B-32's train transform (224 px), batch {opts.input_batch}, this trainer's training loader with "
        f"--workers 1; images per loader-core-second = images / the worker process's CPU seconds (robust to "
        f"a shared machine's load). {opts.input_rounds} interleaved rounds per size; ratio = fast / open_clip "
        "within a round, median (min-max) over rounds; wall = the same ratio of wall-clock images/s. Decode: "
        "images per CPU second of decoding alone, PIL full size / PIL at the fast pipeline's DCT scale / "
        "torchvision decode_jpeg; tokenise: CPU µs per caption, open_clip's tokenizer one caption at a time "
        "(as the loader calls it) / a whole list at once. device: `--input-pipeline device`'s workers only (JPEG bytes "
        "and the crop box; the decode runs on the accelerator, not timed here), images per worker core-second and "
        "its ratio to open_clip's.", "",
        markdown_table(["JPEG", "mean size", "open_clip img/core-s", "fast img/core-s", "ratio", "target", "wall",
                        "device workers img/core-s (ratio)",
                        "decode img/CPU-s (PIL / PIL draft / decode_jpeg)", "tokenise µs (one / list)"], rows), "",
        f"`uptime` at the end: {uptime()}", ""]) if rows else ""
    return section, data
