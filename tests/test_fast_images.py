"""The fast training-image pipeline (training.data.fast_images) against open_clip's own train transform.

References are independent of the module: open_clip's `image_transform(..., is_train=True)` on a fully
decoded PIL image, torchvision's RandomResizedCrop box sampling restated below, ToTensor + Normalize.
Images are small photo-like renderings (training.data.synthetic.photos) so the tests stay fast; output sizes
are small too, which lets small images reach DCT scales 1/2 and 1/4.
"""
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision import transforms as T

from training.data.fast_images import (NormalizeOnDevice, dct_reduction, decode_fully, move_float_images,
                                       open_image_lazily, recognise_train_transform, train_image_pipeline)
from training.data.loader import get_data
from training.data.position import sample_seed
from training.data.synthetic.photos import render_photo
from training.data.synthetic.samples import sample_spec

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def jpeg(width: int, index: int = 0, quality: int = 90, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    render_photo(sample_spec(0, index), width).convert(mode).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def reference_box(width, height, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, restated from its source: (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in 8-bit grey levels of two normalised image tensors (undoing the std)."""
    std = torch.tensor(STD).view(-1, 1, 1)
    mse = (((a.float() - b.float()) * std * 255) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def fast_output(fast, data: bytes, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return fast.device_stage()(fast(open_image_lazily(data))[None], "cpu", None)[0]


def reference_output(transform, data: bytes, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(decode_fully(data))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_crop_boxes_are_random_resized_crops_under_the_same_rng(scale):
    """Catches a crop-box sampler that is not RandomResizedCrop's (another scale or ratio law, another RNG,
    x and y swapped, a wrong fallback for extreme aspect ratios): seeded alike, every box must be equal."""
    transform = recognise_train_transform(image_transform(224, is_train=True, mean=MEAN, std=STD))
    transform.scale = scale
    for width, height in ((512, 384), (384, 512), (1024, 768), (300, 40), (40, 300), (224, 224)):
        image = Image.new("RGB", (width, height))
        for seed in range(25):
            torch.manual_seed(seed)
            ours = transform.crop_box(image)
            torch.manual_seed(seed)
            assert tuple(ours) == reference_box(width, height, scale, (3 / 4, 4 / 3)), (width, height, seed)


def test_dct_scale_keeps_the_crop_at_least_the_output_size():
    """Catches a DCT scale chosen so small that the output is upsampled from fewer pixels than it has."""
    assert dct_reduction(447, 500, 224, 224) == 1
    assert dct_reduction(448, 448, 224, 224) == 2
    assert dct_reduction(900, 896, 224, 224) == 4
    assert dct_reduction(4000, 3000, 224, 224) == 8
    for crop in range(1, 3000, 37):
        k = dct_reduction(crop, crop + 5, 224, 224)
        assert k in (1, 2, 4, 8) and (k == 1 or crop / k >= 224)


@pytest.mark.parametrize("width, out, expected_k", [(160, 64, 1), (320, 64, 2), (320, 32, 4)])
def test_pixels_match_open_clip_on_the_same_crop_box(width, out, expected_k):
    """Catches a crop taken from the wrong place or scale in the DCT-scaled image, wrong resampling, channel
    order or normalisation: under the same seed the output must be within 35 dB PSNR of open_clip's train
    transform; at DCT scale 1 within one grey level (torch's uint8 resize vs PIL's)."""
    transform = image_transform(out, is_train=True, mean=MEAN, std=STD)
    fast = recognise_train_transform(transform)
    data = jpeg(width)
    ks = set()
    for seed in range(6):
        torch.manual_seed(seed)
        _, _, h, w = fast.crop_box(Image.open(io.BytesIO(data)))
        ks.add(dct_reduction(w, h, out, out))
        ours, reference = fast_output(fast, data, seed), reference_output(transform, data, seed)
        assert ours.shape == reference.shape == (3, out, out)
        assert psnr(ours, reference) >= 35.0, (seed, psnr(ours, reference))
        if expected_k == 1:
            std = torch.tensor(STD).view(-1, 1, 1)
            assert ((ours - reference) * std * 255).abs().max() <= 1.0 + 1e-3
    assert ks == {expected_k}  # the path under test was taken


def test_grayscale_and_png_images_come_out_rgb_like_the_reference():
    """Catches non-RGB inputs (a grayscale JPEG, a PNG) given one channel or skipped mode conversion."""
    transform = image_transform(32, is_train=True, mean=MEAN, std=STD)
    fast = recognise_train_transform(transform)
    buffer = io.BytesIO()
    render_photo(sample_spec(0, 1), 96).save(buffer, format="PNG")
    for data in (jpeg(160, mode="L"), buffer.getvalue()):
        ours, reference = fast_output(fast, data, 3), reference_output(transform, data, 3)
        assert ours.shape == reference.shape == (3, 32, 32) and psnr(ours, reference) >= 35.0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_device_normalisation_is_open_clips_normalize(dtype):
    """Catches a normalisation that differs from ToTensor + Normalize (no /255, mean/std swapped or per
    the wrong channel, channels not put first, another operation order): bit-identical in float32, then
    cast to the input dtype."""
    pixels = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8)  # [b, H, W, C]: the fast batches' layout
    reference = torch.stack([T.Normalize(MEAN, STD)(T.ToTensor()(Image.fromarray(p.numpy()))) for p in pixels])
    ours = NormalizeOnDevice(MEAN, STD)(pixels, torch.device("cpu"), dtype)
    assert ours.dtype == (dtype or torch.float32) and ours.is_contiguous()
    assert torch.equal(ours, reference if dtype is None else reference.to(dtype))


def test_other_transforms_and_the_open_clip_flag_keep_the_old_path():
    """Catches the fast path taking over where it is not equivalent (--input-pipeline open_clip, a transform
    it does not know, such as the evaluation transform or color jitter) and an unknown pipeline name."""
    train = image_transform(64, is_train=True, mean=MEAN, std=STD)
    for pipeline, transform in (("open_clip", train), ("fast", image_transform(64, is_train=False)),
                                ("fast", image_transform(64, is_train=True, aug_cfg={"color_jitter": (0.4, 0.4, 0.4, 0.1),
                                                                                      "color_jitter_prob": 0.5}))):
        images = train_image_pipeline(pipeline, transform)
        assert images.transform is transform and images.open_bytes is decode_fully
        assert images.to_device is move_float_images
    assert train_image_pipeline("fast", train).fast is not None
    with pytest.raises(ValueError, match="--input-pipeline"):
        train_image_pipeline("dali", train)


# ------------------------------------------------------------------------------- through the loader

def write_photo_shard(path, keys, damaged=None):
    """One shard of photo JPEGs (width 160) with captions; damaged: {key: bytes} replacing the JPEG."""
    damaged = damaged or {}
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("jpg", damaged.get(key, jpeg(160, key))), ("txt", f"photo {key}".encode()),
                              ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def loader_args(path, pipeline, samples, **extra):
    import argparse
    fields = dict(train_data=str(path), val_data=None, dataset_type="webdataset", dataset_resampled=False,
                  workers=0, batch_size=4, world_size=1, rank=0, seed=5, train_num_samples=samples,
                  uses_per_sample_state=False, data_size=None, input_pipeline=pipeline)
    fields.update(extra)
    return argparse.Namespace(**fields)


def tokens(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def test_open_clip_pipeline_is_bit_exact_and_fast_is_close(tmp_path):
    """Catches --input-pipeline open_clip drifting from the old path (other decode, seeds, hand-off) and the
    fast path's batches going wrong between the worker and the device: open_clip's batches must equal
    preprocess_train on PIL-decoded images seeded per sample as training.data.position documents; the fast
    path's uint8 batches, normalised by the split's hand-off, must be within 35 dB of them."""
    write_photo_shard(tmp_path / "00000.tar", range(8))
    transform = image_transform(32, is_train=True, mean=MEAN, std=STD)
    batches = {}
    for pipeline in ("open_clip", "fast"):
        info = get_data(loader_args(tmp_path / "00000.tar", pipeline, 8), transform, transform, tokens)["train"]
        info.set_epoch(0)
        batches[pipeline] = [(info.images_to_device(images, torch.device("cpu"), None), images.dtype, keys)
                             for images, _, keys in info.dataloader]
    assert [b[1] for b in batches["open_clip"]] == [torch.float32] * 2
    assert [b[1] for b in batches["fast"]] == [torch.uint8] * 2
    for (old, _, keys), (new, _, new_keys) in zip(batches["open_clip"], batches["fast"]):
        assert torch.equal(keys, new_keys)
        for image, fast_image, key in zip(old, new, keys.tolist()):
            seed = sample_seed("augment", 5, 0, key)  # PerSampleRandomness: (seed, epoch, sample)
            assert torch.equal(image, reference_output(transform, jpeg(160, key), seed))
            assert psnr(fast_image, image) >= 35.0


@pytest.mark.parametrize("pipeline", ["fast", "open_clip"])
def test_corrupt_jpegs_are_skipped_and_counted(tmp_path, pipeline):
    """Catches a damaged JPEG that the lazily decoding fast path lets through (a truncated file decodes
    only when cropped) or that crashes the loader: it must be skipped and counted, as on the old path."""
    good = jpeg(160, 3)
    damaged = {2: good[:len(good) // 2], 5: b"\xff\xd8\xff\xe0 not a jpeg"}
    write_photo_shard(tmp_path / "00000.tar", range(10), damaged)
    transform = image_transform(32, is_train=True, mean=MEAN, std=STD)
    info = get_data(loader_args(tmp_path / "00000.tar", pipeline, 8), transform, transform, tokens)["train"]
    info.set_epoch(0)
    keys = sorted(int(k) for _, _, ks in info.dataloader for k in ks)
    assert keys == [0, 1, 3, 4, 6, 7, 8, 9] and info.skipped() == 2


def test_photo_jpegs_weigh_what_real_photos_do():
    """Catches photo shards too light to measure decoding with (flat images compress to a few KB): a
    512x384 rendering at quality 90 must weigh about 100 KB, like a web photo of that size."""
    sizes = [len(jpeg(512, i)) for i in range(3)]
    assert Image.open(io.BytesIO(jpeg(512))).size == (512, 384)
    assert all(70_000 <= s <= 150_000 for s in sizes), sizes
    assert np.asarray(render_photo(sample_spec(0, 1), 64)).tobytes() == \
        np.asarray(render_photo(sample_spec(0, 1), 64)).tobytes()  # a pure function of the sample


def test_main_trains_with_each_pipeline_and_their_losses_agree(tmp_path):
    """Catches the training loop's hand-off skipping the device-side normalisation (uint8 or unnormalised
    images reaching the model) or the flag not reaching the loader: main() runs with each --input-pipeline,
    the fast run's batches are uint8 on the way, and the first steps' losses agree closely (same model
    seed, same crop boxes, pixels within a grey level). --input-pipeline device (training.data.device_decode)
    decodes at full size and resizes in PIL's two clamped passes, as open_clip does, so its losses must agree
    with open_clip's to rel 3e-4 (measured 6e-5) and with fast's to rel 1e-3: a wrong box or unnormalised
    images move the loss by percents; one unclamped resize pass moved it by 1.4e-3."""
    import training  # noqa: F401  (registers neuclip-tiny)
    from training.data.synthetic.shards import write_shards
    from training.main import main

    write_shards(str(tmp_path / "shards"), 32, seed=0, samples_per_shard=16)
    losses = {}
    for pipeline in ("open_clip", "fast", "device"):
        summary = main(["--logs", str(tmp_path), "--name", pipeline, "--model", "neuclip-tiny", "--batch-size", "16",
                        "--workers", "0", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--seed", "3",
                        "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0",
                        "--report-to", "", "--epochs", "1", "--train-data", str(tmp_path / "shards" / "{00000..00001}.tar"),
                        "--train-num-samples", "32", "--input-pipeline", pipeline])
        losses[pipeline] = [terms["contrastive_loss"] for _, terms in summary["history"]]
        assert "input_pipeline: " + pipeline in (tmp_path / pipeline / "params.txt").read_text()
    assert len(losses["device"]) == len(losses["fast"]) == len(losses["open_clip"]) == 2
    for device, fast, reference in zip(losses["device"], losses["fast"], losses["open_clip"]):
        assert math.isfinite(fast) and fast == pytest.approx(reference, rel=1e-3)
        assert math.isfinite(device) and device == pytest.approx(reference, rel=3e-4)
        assert device == pytest.approx(fast, rel=1e-3)
