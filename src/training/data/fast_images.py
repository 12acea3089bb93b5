"""The fast training-image pipeline (`--input-pipeline fast`, the default): open_clip's train transform,
split so that the data loader workers do only what must be done on the CPU.

open_clip's train transform is RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic, antialias) ->
convert to RGB -> ToTensor -> Normalize(mean, std), on a fully decoded image, and its float32 output
travels through worker shared memory. Here, per sample, in the worker:

1. the JPEG is opened, not decoded: its header gives the size;
2. the crop box is drawn exactly as RandomResizedCrop draws it (its own `get_params`, same torch RNG
   draws: under the same seed, the same box as the reference pipeline);
3. the JPEG is decoded by libjpeg-turbo at the smallest DCT scale (1, 1/2, 1/4, 1/8; PIL's `draft`) that
   keeps the crop box at least the output size, so no pixel of the output is upsampled;
4. crop and resize in uint8, bicubic and antialiased: at DCT scale 1 by torch's uint8 kernels on the
   integer box (within one grey level of PIL's resize, which the reference runs, at a fifth of its time);
   from a reduced decode by PIL's resize of the fractional box (the crop's exact place). The result is a
   uint8 [H, W, 3] tensor: 4x less shared memory than float32, and channels last, as decoded, so a batch
   stacks with a plain copy.

On the device (`NormalizeOnDevice`, called by the training loop when a batch arrives): a non-blocking copy
(the loader pins batches when CUDA is present), channels first, then ToTensor's and Normalize's own float32
operations in their order (/255, -mean, /std) with the mean/std of the model's preprocess config, then the
dtype cast. Given the same uint8 pixels the result is bit-identical to open_clip's. The pixels differ from
the reference's by at most one grey level at DCT scale 1; at smaller scales the DCT's own downscale
replaces part of the bicubic filter: PSNR >= 35 dB against the reference on the same crop box
(tests/test_fast_images.py; ~47 dB on 1024x768 photos).

Why PIL's `draft` and not `torchvision.io.decode_jpeg`: both call libjpeg-turbo, but decode_jpeg has no
DCT scaling, so at 1024 px it decodes 4x the pixels; on 512x384 JPEGs, where the scale is 1, the two
decode at the same speed (measured in docs/results/input/). A transform this module does not recognise
(another augmentation config, --no-train-augmentation, a test's own function) runs as it is.
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

log = logging.getLogger(__name__)

DCT_SCALES = (8, 4, 2, 1)  # what libjpeg can decode at: 1/8, 1/4, 1/2, full size
PIL_RESAMPLE = {T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
                T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR}  # antialiased in uint8 by PIL and torch


def dct_reduction(crop_width: int, crop_height: int, out_width: int, out_height: int) -> int:
    """The largest DCT reduction k in (8, 4, 2, 1) whose crop box, k times smaller, still covers the output
    (1 for a crop smaller than the output: it is upsampled from full-size pixels, as the reference does)."""
    return next((k for k in DCT_SCALES if crop_width >= k * out_width and crop_height >= k * out_height), 1)


def as_hwc(pixels: np.ndarray) -> torch.Tensor:
    """[h, w, c] or [h, w] uint8 array -> [h, w, c] tensor (one channel for "L", as ToTensor gives). A
    read-only array (np.asarray of a PIL image) is only ever read from here."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's warning about read-only arrays
        return torch.from_numpy(pixels)


def open_image_lazily(data: bytes) -> Image.Image:
    """The image with its header read and its pixels not yet decoded (the transform picks the DCT scale)."""
    image = Image.open(io.BytesIO(data))
    if image.format is None:
        raise ValueError("not an image")
    return image


def open_image_file_lazily(path: str) -> Image.Image:
    with open(path, "rb") as f:  # read now: no file handle stays open in the worker
        return open_image_lazily(f.read())


def decode_fully(data: bytes) -> Image.Image:
    """The reference decode: every pixel at full size, converted to RGB (truncated files fail here)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class FastTrainTransform:
    """(lazily opened or decoded) PIL image -> uint8 [H, W, 3]: RandomResizedCrop's box, DCT-scaled decode,
    uint8 crop + resize. Channels last, as decoded and resized: batches stack with a plain copy; the
    device stage (NormalizeOnDevice) puts channels first and normalises."""

    def __init__(self, size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                 interpolation: T.InterpolationMode, mean, std, mode: str = "RGB"):
        self.size, self.scale, self.ratio = tuple(size), tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        self.mean, self.std, self.mode = tuple(mean), tuple(std), mode

    def crop_box(self, image: Image.Image) -> tuple[int, int, int, int]:
        """(top, left, height, width): RandomResizedCrop.get_params itself, which reads only the image's
        size: the same torch RNG draws, so the same box, as open_clip's transform under the same seed."""
        return T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        top, left, height, width = self.crop_box(image)
        out_height, out_width = self.size
        full_width, full_height = image.size
        factor = 1.0
        k = dct_reduction(width, height, out_width, out_height)
        if k > 1:  # a no-op (None) for formats other than JPEG and for images already decoded
            drafted = image.draft(None, (full_width // k, full_height // k))
            if drafted is not None:
                factor = full_width / drafted[1][2]  # the scale libjpeg decodes at
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if factor != 1.0:  # PIL's resize of the fractional box: the crop's exact place in the reduced image
            box = (left / factor, top / factor, (left + width) / factor, (top + height) / factor)
            out = image.resize((out_width, out_height), PIL_RESAMPLE[self.interpolation], box=box)
            return as_hwc(np.array(out))
        # torch's uint8 antialiased kernels on the integer box: within one grey level of PIL's resize, at a
        # fifth of its time
        crop = as_hwc(np.asarray(image))[top:top + height, left:left + width].permute(2, 0, 1)
        out = TF.resize(crop, [out_height, out_width], interpolation=self.interpolation, antialias=True)
        return out.permute(1, 2, 0)  # channels-last kernels: [H, W, C] memory order already, no copy

    def device_stage(self) -> "NormalizeOnDevice":
        return NormalizeOnDevice(self.mean, self.std)

    def __repr__(self) -> str:
        return (f"FastTrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation.value}, mean={self.mean}, std={self.std})")


def move_float_images(images: torch.Tensor, device, dtype) -> torch.Tensor:
    """The reference hand-off: float images already normalised, moved and cast (open_clip_train's)."""
    return images.to(device, dtype=dtype, non_blocking=True)


class NormalizeOnDevice:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] (contiguous) on `device`: ToTensor's /255 and
    Normalize's -mean, /std, the same float32 operations in the same order, so bit-identical to them for
    the same pixels."""

    def __init__(self, mean, std):
        self.mean_std = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), \
            torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.on_device: dict = {}

    def __call__(self, images: torch.Tensor, device, dtype) -> torch.Tensor:
        images = images.to(device, non_blocking=True)  # uint8: a quarter of float32's bytes
        key = str(images.device)
        if key not in self.on_device:
            self.on_device[key] = tuple(t.to(images.device) for t in self.mean_std)
        mean, std = self.on_device[key]
        images = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        images = images.div_(255).sub_(mean).div_(std)
        return images if dtype is None else images.to(dtype)


def recognise_train_transform(transform) -> FastTrainTransform | None:
    """The FastTrainTransform equal in distribution to `transform` when it is open_clip's train transform
    (Compose[RandomResizedCrop, MaybeConvertMode, MaybeToTensor, Normalize]), else None."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, list) or len(steps) != 4:
        return None
    crop, convert, to_tensor, normalize = steps
    if not (type(crop) is T.RandomResizedCrop and type(normalize) is T.Normalize
            and type(convert).__name__ == "MaybeConvertMode" and isinstance(to_tensor, T.ToTensor)):
        return None
    if crop.interpolation not in PIL_RESAMPLE or crop.antialias is False or normalize.inplace:
        return None
    return FastTrainTransform(crop.size, crop.scale, crop.ratio, crop.interpolation, normalize.mean,
                              normalize.std, getattr(convert, "mode", "RGB"))


def decode_file_fully(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImagePipeline:
    """How a split's images go from bytes (or a file) to the model's input: `open_bytes` / `open_file` in
    the worker before the (seeded) `transform`, then `to_device(images, device, dtype)` in the training
    loop. Without a FastTrainTransform: full decode, `transform` as given, float images moved and cast."""

    def __init__(self, transform, fast: FastTrainTransform | None = None):
        self.fast = fast
        self.transform = fast if fast is not None else transform
        self.open_bytes = open_image_lazily if fast is not None else decode_fully
        self.open_file = open_image_file_lazily if fast is not None else decode_file_fully
        self.to_device = fast.device_stage() if fast is not None else move_float_images


INPUT_PIPELINES = ("fast", "open_clip")


def train_image_pipeline(pipeline: str, transform) -> ImagePipeline:
    """--input-pipeline: "open_clip" keeps `transform` on fully decoded images, exactly; "fast" replaces
    open_clip's train transform by FastTrainTransform + NormalizeOnDevice (any other transform is kept)."""
    if pipeline not in INPUT_PIPELINES:
        raise ValueError(f"unknown --input-pipeline {pipeline!r}; choose from {', '.join(INPUT_PIPELINES)}")
    if pipeline == "open_clip":
        return ImagePipeline(transform)
    fast = recognise_train_transform(transform)
    if fast is None:
        log.info("--input-pipeline fast: the train transform is not open_clip's standard one; using it as "
                 "it is (%s)", type(transform).__name__)
    return ImagePipeline(transform, fast)
