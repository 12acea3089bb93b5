"""Webdataset shards of the procedural data set of `training.data.synthetic.samples`.

    python -m training.data.synthetic --out DIR --num-samples N --seed S

writes samples 0..N-1 as img2dataset-style tar shards ({key}.jpg, .txt and .json with the sample's attributes)
plus info.json, and prints the brace pattern to pass as --train-data.

`--style photo --image-size 512` writes the same samples as photo-like 512x384 JPEGs of about 100 KB
(`training.data.synthetic.photos`): realistic shards for measuring the input pipeline.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor

from PIL import Image

from training.data.synthetic.photos import render_photo
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


STYLES = ("shapes", "photo")
JPEG_QUALITY = {"shapes": 95, "photo": 90}  # photo: a typical web photo's quality


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render_image(spec, size: int, style: str) -> Image.Image:
    """shapes: size x size; photo: size x 3/4 size, textured and grainy (training.data.synthetic.photos)."""
    return render_photo(spec, size) if style == "photo" else render(spec, size)


def _write_shard(path: str, start: int, stop: int, seed: int, size: int, style: str = "shapes") -> str:
    tmp_path = path + ".tmp"
    with tarfile.open(tmp_path, "w") as tar:
        for i in range(start, stop):
            spec = sample_spec(seed, i)
            key = format_key(i)
            text = caption(spec, stream_rng(TRAIN_CAPTION_STREAM, seed, i))
            _add_member(tar, f"{key}.jpg", encode_jpeg(render_image(spec, size, style), JPEG_QUALITY[style]))
            _add_member(tar, f"{key}.txt", text.encode("utf-8"))
            _add_member(tar, f"{key}.json", json.dumps({"key": i, "caption": text, **spec.attributes()}).encode("utf-8"))
    os.replace(tmp_path, path)  # a crash never leaves a truncated shard behind
    return path


def write_shards(out_dir: str, num_samples: int, seed: int = 0, samples_per_shard: int = 1000,
                 size: int = 64, workers: int = 1, style: str = "shapes") -> list[str]:
    """Write samples 0..num_samples-1 as img2dataset-style tar shards plus info.json."""
    if num_samples <= 0 or samples_per_shard <= 0:
        raise ValueError("num_samples and samples_per_shard must be positive")
    if style not in STYLES:
        raise ValueError(f"unknown image style {style!r}; choose from {', '.join(STYLES)}")
    os.makedirs(out_dir, exist_ok=True)
    starts = range(0, num_samples, samples_per_shard)
    jobs = [(os.path.join(out_dir, f"{shard:05d}.tar"), start, min(start + samples_per_shard, num_samples), seed, size,
             style)
            for shard, start in enumerate(starts)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            paths = list(pool.map(_write_shard, *zip(*jobs)))
    else:
        paths = [_write_shard(*job) for job in jobs]
    info = {"num_samples": num_samples, "seed": seed, "size": size, "style": style,
            "samples_per_shard": samples_per_shard,
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
    parser.add_argument("--size", "--image-size", dest="size", type=int, default=64,
                        help="image side in pixels (photo: the width; the height is 3/4 of it)")
    parser.add_argument("--style", choices=STYLES, default="shapes",
                        help="shapes: small flat drawings (training); photo: photo-like JPEGs at realistic sizes, "
                             "~100 KB at --image-size 512, for measuring the input pipeline")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    paths = write_shards(args.out, args.num_samples, args.seed, args.samples_per_shard, args.size, args.workers,
                         args.style)
    pattern = shard_pattern(args.out, len(paths))
    print(pattern)
    return pattern


if __name__ == "__main__":
    main()
