"""The device-decoding pipeline (`--input-pipeline device`, training.data.device_decode), on the CPU.

References are independent of the module: open_clip's `image_transform(..., is_train=True)` on a fully
PIL-decoded image, torchvision's RandomResizedCrop itself and its box sampling restated in
tests/test_fast_images.py, PIL's decode. The device here is the CPU (torchvision's CPU `decode_jpeg` on the
list): the same code path the GPU runs, with nvJPEG in place of libjpeg-turbo.
"""
import io
import logging
import math

import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TVF

from test_fast_images import MEAN, STD, jpeg, loader_args, reference_box, reference_output, tokens, write_photo_shard
from training.data import device_decode
from training.data.device_decode import (HEADER_BYTES, KIND_JPEG, KIND_RAW, DecodeOnDevice, pack, stack_images,
                                         train_image_pipeline)
from training.data.fast_images import move_float_images, open_image_lazily, recognise_train_transform
from training.data.loader import get_data

CPU = torch.device("cpu")


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differences of normalised images in 8-bit grey levels (undoing the std)."""
    return (a.float() - b.float()) * torch.tensor(STD).view(-1, 1, 1) * 255


def psnr(a, b) -> float:
    mse = (grey_levels(a, b) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90, **options)
    return buffer.getvalue()


def header(row: torch.Tensor) -> list[int]:
    return row[:HEADER_BYTES].clone().view(torch.int32).tolist()


def device_output(images, data: bytes, seed: int) -> torch.Tensor:
    """One sample through the worker transform (seeded), the collation and the device stage."""
    torch.manual_seed(seed)
    row = images.transform(images.open_bytes(data))
    return images.to_device(stack_images([row]), CPU, None)[0]


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
def test_crop_boxes_are_random_resized_crops_under_the_same_rng(scale):
    """Catches a worker that draws another box than open_clip's RandomResizedCrop (another law, RNG, x/y
    swapped, a box packed in the wrong header field): under the same seed the packed box must equal the
    restated get_params, and resized_crop on that box must equal torchvision's RandomResizedCrop output."""
    transform = image_transform(32, is_train=True, mean=MEAN, std=STD)
    transform.transforms[0].scale = scale
    images = train_image_pipeline("device", transform)
    crop = transform.transforms[0]
    for width in (96, 160, 200):
        data = jpeg(width, width)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        for seed in range(8):
            torch.manual_seed(seed)
            kind, top, left, height, width_, size = header(images.transform(images.open_bytes(data)))
            assert kind == KIND_JPEG and size == len(data)
            torch.manual_seed(seed)
            assert (top, left, height, width_) == reference_box(*decoded.size, scale, (3 / 4, 4 / 3))
            torch.manual_seed(seed)
            expected = crop(decoded)  # torchvision's RandomResizedCrop itself, same RNG draws
            ours = TVF.resized_crop(decoded, top, left, height, width_, crop.size, crop.interpolation)
            assert ours.tobytes() == expected.tobytes(), (width, seed)


@pytest.mark.parametrize("width, out, scale, max_levels, interpolation", [
    (96, 64, (0.9, 1.0), 1, "bicubic"), (160, 64, (0.08, 1.0), 1, "bicubic"), (200, 48, (0.08, 1.0), 3, "bicubic"),
    (200, 224, (0.08, 1.0), 1, "bicubic"), (160, 64, (0.08, 1.0), 1, "bilinear")])
def test_pixels_match_open_clip_on_the_same_crop_box(width, out, scale, max_levels, interpolation):
    """Catches a crop from the wrong place, wrong resampling (not bicubic antialiased, align_corners, no rounding to
    grey levels, one 2-D pass without PIL's clamp between its width and height passes), channel order or
    normalisation on the device path: under the same seed the output must be within 45 dB PSNR and `max_levels`
    grey levels of open_clip's train transform (PIL decode, RandomResizedCrop, ToTensor, Normalize), bicubic and
    bilinear (a resize ignoring the crop's interpolation fails the latter). Measured: >= 53.9 dB; one grey level,
    but 3 on a few pixels of boxes upscaled in width and downscaled in height (200 -> 48); one 2-D float pass
    instead: 3-6 grey levels in every case."""
    transform = image_transform(out, is_train=True, mean=MEAN, std=STD)
    transform.transforms[0].scale = scale
    transform.transforms[0].interpolation = T.InterpolationMode(interpolation)  # open_clip's: always bicubic
    images = train_image_pipeline("device", transform)
    assert images.to_device.interpolation == interpolation
    for index in range(3):
        data = jpeg(width, index)
        for seed in range(4):
            ours, reference = device_output(images, data, seed), reference_output(transform, data, seed)
            assert ours.shape == reference.shape == (3, out, out)
            assert psnr(ours, reference) >= 45.0, (index, seed, psnr(ours, reference))
            assert grey_levels(ours, reference).abs().max() <= max_levels + 1e-3, (index, seed)


def test_a_batch_mixing_jpegs_grayscale_png_and_cmyk_decodes_each_row_right():
    """Catches rows of one batch read with another row's header (offsets, padding), a grayscale JPEG given one
    channel, PNG/CMYK images sent to the JPEG decoder (which cannot take them), progressive JPEGs sent to it
    (nvJPEG's batched hardware decoder cannot: they would be decoded serially on the training process's CPU) or raw
    pixels mis-shaped: each JPEG row of the mixed batch must match open_clip's transform of its own image as
    closely as a single JPEG does, each raw row must equal the fast pipeline's output for its image."""
    transform = image_transform(48, is_train=True, mean=MEAN, std=STD)
    images = train_image_pipeline("device", transform)
    photo = Image.open(io.BytesIO(jpeg(160, 4))).convert("RGB")
    samples = [encode(photo), encode(photo.convert("L")), encode(photo, "PNG"), encode(photo.convert("CMYK")),
               jpeg(96, 5), encode(photo, progressive=True)]
    rows = []
    for seed, data in enumerate(samples):
        torch.manual_seed(seed)
        rows.append(images.transform(images.open_bytes(data)))
    assert [header(row)[0] for row in rows] == [KIND_JPEG, KIND_JPEG, KIND_RAW, KIND_RAW, KIND_JPEG, KIND_RAW]
    batch = stack_images(rows)
    assert batch.dtype == torch.uint8 and batch.shape == (6, max(len(row) for row in rows))
    out = images.to_device(batch, CPU, None)
    assert out.shape == (6, 3, 48, 48) and out.dtype == torch.float32
    fast = recognise_train_transform(transform)
    for seed, (data, image, row) in enumerate(zip(samples, out, rows)):
        reference = reference_output(transform, data, seed)
        if header(row)[0] == KIND_JPEG:
            assert psnr(image, reference) >= 45.0 and grey_levels(image, reference).abs().max() <= 1 + 1e-3, seed
        else:  # the fast pipeline's pixels, as they are (its own test bounds them by 35 dB)
            torch.manual_seed(seed)
            assert torch.equal(image, fast.device_stage()(fast(open_image_lazily(data))[None], CPU, None)[0])
            assert psnr(image, reference) >= 35.0, seed
    assert torch.equal(images.to_device(batch, CPU, torch.bfloat16), out.to(torch.bfloat16))


def test_damaged_jpegs_are_skipped_and_counted_in_the_worker(tmp_path):
    """Catches damaged JPEGs shipped to the device (where a truncated file would stop training) instead of
    being skipped and counted by the loader's workers, and complete JPEGs with trailing padding wrongly
    skipped: through the real loader, the truncated files and the garbage are counted, the padded file and
    the good ones arrive as JPEG rows (not decoded in the worker)."""
    good = jpeg(160, 3)
    damaged = {2: good[:len(good) // 2], 5: b"\xff\xd8\xff\xe0 not a jpeg", 7: good[:-2],
               8: jpeg(160, 8) + b"\x00" * 7}  # 8: complete, zero-padded: kept
    write_photo_shard(tmp_path / "00000.tar", range(11), damaged)
    transform = image_transform(32, is_train=True, mean=MEAN, std=STD)
    info = get_data(loader_args(tmp_path / "00000.tar", "device", 8, workers=1), transform, transform,
                    tokens)["train"]  # a real worker process: rows and skip counts cross to the main process
    info.set_epoch(0)
    keys, kinds = [], set()
    for batch, _, batch_keys in info.dataloader:
        assert batch.dtype == torch.uint8 and batch.dim() == 2
        kinds |= {header(row)[0] for row in batch}
        keys += batch_keys.tolist()
        assert info.images_to_device(batch, CPU, None).shape == (len(batch), 3, 32, 32)
    assert sorted(keys) == [0, 1, 3, 4, 6, 8, 9, 10] and info.skipped() == 3
    assert kinds == {KIND_JPEG}


def jpeg_batch(transform, count: int = 3):
    images = train_image_pipeline("device", transform)
    rows = []
    for i in range(count):
        torch.manual_seed(i)
        rows.append(images.transform(images.open_bytes(jpeg(96 + 32 * i, i))))
    return images, stack_images(rows)


def test_a_failing_batched_decode_falls_back_row_by_row_then_to_pil(monkeypatch, caplog):
    """Catches a fallback that is missing (one bad image fails the step), decodes the wrong rows, or differs
    from the normal path: with decode_jpeg failing on lists, then on everything, the batch must come out
    equal to the normal path's (torchvision's CPU decode and PIL's are both libjpeg-turbo: the same pixels),
    with one warning for the PIL fallback."""
    transform = image_transform(40, is_train=True, mean=MEAN, std=STD)
    images, batch = jpeg_batch(transform)
    expected = images.to_device(batch, CPU, None)
    real = device_decode.decode_jpeg
    calls = []

    def no_lists(data, **kwargs):
        calls.append(type(data).__name__)
        if isinstance(data, list):
            raise RuntimeError("batched decode failed")
        return real(data, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", no_lists)
    assert torch.equal(images.to_device(batch, CPU, None), expected)
    assert calls == ["list", "Tensor", "Tensor", "Tensor"]

    def never(data, **kwargs):
        raise RuntimeError("nvJPEG: unsupported")

    monkeypatch.setattr(device_decode, "decode_jpeg", never)
    stage = DecodeOnDevice((40, 40), MEAN, STD)
    with caplog.at_level(logging.WARNING, logger=device_decode.__name__):
        assert torch.equal(stage(batch, CPU, None), expected)
        assert torch.equal(stage(batch, CPU, None), expected)
    assert len([r for r in caplog.records if "decoding such images on the CPU" in r.message]) == 1


def test_a_row_no_decoder_can_read_stops_with_one_line():
    """Catches an undecodable row that passes silently (zeros, another row's pixels) or a multi-line
    traceback as the only message: a JPEG row that decode_jpeg and PIL both reject raises one clear line."""
    data = jpeg(96, 1)
    row = pack(KIND_JPEG, (0, 0, 72, 96), data[:len(data) // 3])
    with pytest.raises(RuntimeError, match=r"^--input-pipeline device: a training JPEG decodes neither") as err:
        DecodeOnDevice((32, 32), MEAN, STD)(stack_images([row]), CPU, None)
    assert "\n" not in str(err.value)


def test_other_transforms_are_kept_and_names_checked():
    """Catches the device pipeline taking over a transform it does not reproduce (the evaluation transform,
    colour jitter) or accepting an unknown pipeline name; float [3, H, W] samples still stack as before."""
    for transform in (image_transform(64, is_train=False),
                      image_transform(64, is_train=True, aug_cfg={"color_jitter": (0.4, 0.4, 0.4, 0.1),
                                                                   "color_jitter_prob": 0.5})):
        images = train_image_pipeline("device", transform)
        assert images.transform is transform and images.to_device is move_float_images
    assert isinstance(train_image_pipeline("device", image_transform(64, is_train=True)).to_device, DecodeOnDevice)
    with pytest.raises(ValueError, match="fast, open_clip, device"):
        train_image_pipeline("dali", image_transform(64, is_train=True))
    samples = [torch.rand(3, 4, 4) for _ in range(2)]
    assert torch.equal(stack_images(samples), torch.stack(samples))
    assert recognise_train_transform(image_transform(64, is_train=True)) is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_nvjpeg_batch_matches_the_cpu_path():
    """Catches the CUDA path going wrong where the CPU tests cannot see it (nvJPEG's output layout or channel
    order, rows decoded into the wrong slots, raw rows not moved, results read before the decoder's stream
    finished): a mixed batch decoded on CUDA must be on the GPU and within 30 dB PSNR of the same batch
    decoded on the CPU. Loose on purpose: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's; the
    exact figure on 512x384 photos is in scripts/gpu_check.sh's report (training.bench.gpu_decode)."""
    transform = image_transform(64, is_train=True, mean=MEAN, std=STD)
    transform.transforms[0].scale = (0.08, 1.0)
    images = train_image_pipeline("device", transform)
    photo = Image.open(io.BytesIO(jpeg(200, 7))).convert("RGB")
    samples = [jpeg(200, i) for i in range(6)] + [encode(photo.convert("L")), encode(photo, "PNG")]
    rows = []
    for seed, data in enumerate(samples):
        torch.manual_seed(seed)
        rows.append(images.transform(images.open_bytes(data)))
    batch = stack_images(rows).pin_memory()
    on_gpu = images.to_device(batch, torch.device("cuda"), None)
    torch.cuda.synchronize()
    assert on_gpu.is_cuda and on_gpu.shape == (8, 3, 64, 64)
    on_cpu = images.to_device(batch, CPU, None)
    for i, (gpu, cpu) in enumerate(zip(on_gpu.cpu(), on_cpu)):
        assert psnr(gpu, cpu) >= 30.0, (i, psnr(gpu, cpu))
    torch.testing.assert_close(on_gpu.cpu()[-1], on_cpu[-1], rtol=0, atol=1e-5)  # the raw row: moved as it is
