"""Webdataset shards of the procedural data set of `training.data.synthetic.samples`.

    python -m training.data.synthetic --out DIR --num-samples N --seed S

writes samples 0..N-1 as img2dataset-style tar shards ({key}.jpg, .txt and .json with the sample's attributes)
plus info.json, and prints the brace pattern to pass as --train-data.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor

from PIL import Image

from training.data.synthetic.samples import KEY_DIGITS, TRAIN_CAPTION_STREAM, caption, render, sample_spec, stream_rng


def format_key(i: int) -> str:
    return f"{i:0{KEY_DIGITS}d}"


def shard_pattern(out_dir: str, num_shards: int) -> str:
    """Brace pattern as accepted by webdataset / --train-data."""
    return os.path.join(out_dir, f"{{{0:05d}..{max(num_shards - 1, 0):05d}}}.tar")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: byte-reproducible shards
    tar.addfile(info, io.BytesIO(data))


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_shard(path: str, start: int, stop: int, seed: int, size: int) -> str:
    tmp_path = path + ".tmp"
    with tarfile.open(tmp_path, "w") as tar:
        for i in range(start, stop):
            spec = sample_spec(seed, i)
            key = format_key(i)
            text = caption(spec, stream_rng(TRAIN_CAPTION_STREAM, seed, i))
            _add_member(tar, f"{key}.jpg", encode_jpeg(render(spec, size)))
            _add_member(tar, f"{key}.txt", text.encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps({"key": i, "caption": text, **spec.attributes()}).encode("utf-8"))
    os.replace(tmp_path, path)  # a crash never leaves a truncated shard behind
    return path


def write_shards(out_dir: str, num_samples: int, seed: int = 0, samples_per_shard: int = 1000,
                 size: int = 64, workers: int = 1) -> list[str]:
    """Write samples 0..num_samples-1 as img2dataset-style tar shards plus info.json."""
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("num_samples and samples_per_shard must be positive")
    os.makedirs(out_dir, exist_ok=True)
    starts = range(0, num_samples, samples_per_shard)
    jobs = [(os.path.join(out_dir, f"{shard:05d}.tar"), start, min(start + samples_per_shard, num_samples), seed, size)
            for shard, start in enumerate(starts)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            paths = list(pool.map(_write_shard, *zip(*jobs)))
    else:
        paths = [_write_shard(*job) for job in jobs]
    info = {"num_samples": num_samples, "seed": seed, "size": size, "samples_per_shard": samples_per_shard,
            "num_shards": len(paths), "pattern": shard_pattern(out_dir, len(paths))}
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=2)
    return paths


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Write procedural image-caption webdataset shards.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    paths = write_shards(args.out, args.num_samples, args.seed, args.samples_per_shard, args.size, args.workers)
    pattern = shard_pattern(args.out, len(paths))
    print(pattern)
    return pattern


if __name__ == "__main__":
    main()
