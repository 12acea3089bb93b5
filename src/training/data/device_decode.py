"""The device-decoding training-image pipeline (`--input-pipeline device`): JPEGs are decoded, cropped, resized
and normalised on the training device, in batches; the DataLoader workers only read tar members and draw the
crop box.

The fast pipeline (training.data.fast_images) spends nearly all of a worker's time in libjpeg-turbo's entropy
decoding. Here that work moves to the accelerator (nvJPEG through `torchvision.io.decode_jpeg` on a list of
JPEGs, `device="cuda"`); on a CPU device the same code runs torchvision's CPU decoder, which is what the tests
exercise.

Worker side (`EncodedCropTransform`, per sample): the image is opened lazily (header only) by `open_encoded`,
which keeps the file's bytes on the image (`image.encoded`). The crop box is RandomResizedCrop's own
`get_params` (the fast pipeline's `crop_box`: the same torch RNG draws, so under the same seed the same box as
open_clip's transform). The sample becomes ONE 1-D uint8 tensor: a header of six int32s (kind, top, left,
height, width, payload bytes) followed by the payload:
- kind JPEG: the file's bytes, untouched, and the crop box. Checked without decoding: the header must parse
  (lazy open) and the file must be structurally complete (SOI first, EOI last once trailing padding is
  stripped); a file that fails the EOI check, usually a truncated one, takes the raw path below, where the CPU
  decode raises, so it is skipped and counted in the worker as on the other pipelines;
- kind RAW: what the device decoder cannot take (PNG, WebP, CMYK JPEGs, an already decoded image such as the
  built-in synthetic set's) and progressive JPEGs, which nvJPEG's batched hardware decoder (A100/H100) does not
  take: torchvision would decode them one by one with the Huffman stage on the CPU, serially in the training
  process, where the workers do it in parallel. The fast pipeline's CPU transform, its uint8 [H, W, 3] pixels,
  with (0, 0, H, W).
A batch may mix kinds. `stack_images` stacks the rows zero-padded into a uint8 [B, L_max] tensor, so the
batch's first dimension is B and pinning works as for any tensor.

Device side (`DecodeOnDevice`, the split's `images_to_device`): the header block is read once, the JPEG rows
(views of the CPU batch: nvJPEG takes CPU inputs) are decoded in one `decode_jpeg` call, each decoded image is
cropped to its box and resized to the output size (bicubic, antialiased: `F.interpolate` in float32, rounded
and clamped to grey levels, so its pixels are uint8 pixels like the other pipelines'), raw rows are taken as
they are, and the uint8 [B, H, W, 3] batch is normalised by `NormalizeOnDevice` (ToTensor's and Normalize's
float32 operations in their order) and cast. If the batched decode raises, the rows are decoded one by one; a
row that still fails is decoded on the CPU by PIL (the reference decode) with one warning; a row PIL cannot
decode either stops training with a one-line error (the worker's checks make that unreachable for truncated
files). Validation images are untouched, as with the fast pipeline.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from training.data.fast_images import (INPUT_PIPELINES as HOST_PIPELINES, FastTrainTransform, ImagePipeline,
                                       NormalizeOnDevice, as_hwc, decode_fully, open_image_lazily,
                                       recognise_train_transform)
from training.data.fast_images import train_image_pipeline as host_image_pipeline

log = logging.getLogger(__name__)

KIND_JPEG, KIND_RAW = 0, 1
HEADER_FIELDS = ("kind", "top", "left", "height", "width", "payload_bytes")  # int32 each
HEADER_BYTES = 4 * len(HEADER_FIELDS)
DEVICE_MODES = ("RGB", "L")  # JPEG colour modes nvJPEG decodes to RGB as PIL's convert("RGB") does
JPEG_PADDING = b"\x00\xff\r\n\t "  # what writers leave after the EOI marker
INPUT_PIPELINES = HOST_PIPELINES + ("device",)


def open_encoded(data: bytes) -> Image.Image:
    """The lazily opened image (header read, pixels not decoded), carrying its file's bytes as `encoded`."""
    image = open_image_lazily(data)
    image.encoded = data
    return image


def open_encoded_file(path: str) -> Image.Image:
    with open(path, "rb") as f:  # read now: no file handle stays open in the worker
        return open_encoded(f.read())


def jpeg_is_complete(data: bytes) -> bool:
    """SOI at the start and EOI at the end (after trailing padding): a truncated file fails."""
    return data[:2] == b"\xff\xd8" and data.rstrip(JPEG_PADDING).endswith(b"\xff\xd9")


def pack(kind: int, box: tuple[int, int, int, int], payload: np.ndarray | bytes) -> torch.Tensor:
    """header (six int32s) + payload bytes -> one 1-D uint8 tensor."""
    payload = np.frombuffer(payload, dtype=np.uint8) if isinstance(payload, bytes) else payload.reshape(-1)
    row = np.empty(HEADER_BYTES + payload.size, dtype=np.uint8)
    row[:HEADER_BYTES] = np.array([kind, *box, payload.size], dtype=np.int32).view(np.uint8)
    row[HEADER_BYTES:] = payload
    return torch.from_numpy(row)


class EncodedCropTransform:
    """Worker side: (lazily opened) PIL image -> 1-D uint8 row (a JPEG and its crop box, or raw pixels)."""

    def __init__(self, fast: FastTrainTransform):
        self.fast = fast

    def __call__(self, image: Image.Image) -> torch.Tensor:
        data = getattr(image, "encoded", None)
        if data is not None and self.fast.mode == "RGB" and image.format == "JPEG" and image.mode in DEVICE_MODES \
                and not image.info.get("progressive") and jpeg_is_complete(data):
            return pack(KIND_JPEG, self.fast.crop_box(image), data)
        pixels = self.fast(image)  # draws the box itself; decodes (a truncated file raises here)
        return pack(KIND_RAW, (0, 0, pixels.shape[0], pixels.shape[1]), pixels.contiguous().numpy())

    def __repr__(self) -> str:
        return f"EncodedCropTransform({self.fast!r})"


def stack_images(images) -> torch.Tensor:
    """The batch's images: 1-D rows (this pipeline's) zero-padded into uint8 [B, L_max]; anything else stacked."""
    if images[0].dim() != 1:
        return torch.stack(images)
    out = torch.zeros(len(images), max(len(row) for row in images), dtype=torch.uint8)
    for target, row in zip(out, images):
        target[:len(row)] = row
    return out


class DecodeOnDevice:
    """Device side: uint8 [B, L] rows -> normalised float [B, 3, H, W] on `device` (see the module docstring)."""

    def __init__(self, size: tuple[int, int], mean, std, interpolation: str = "bicubic"):
        self.size, self.interpolation = tuple(size), interpolation  # "bicubic" or "bilinear", antialiased
        self.normalize = NormalizeOnDevice(mean, std)
        self.warned = False

    def __call__(self, images: torch.Tensor, device, dtype) -> torch.Tensor:
        device = torch.device(device)
        header = torch.empty((len(images), HEADER_BYTES), dtype=torch.uint8)  # aligned copy: one read of all headers
        header = header.copy_(images[:, :HEADER_BYTES]).view(torch.int32).tolist()
        rows = [images[i, HEADER_BYTES:HEADER_BYTES + fields[5]] for i, fields in enumerate(header)]
        jpegs = [i for i, fields in enumerate(header) if fields[0] == KIND_JPEG]
        decoded = dict(zip(jpegs, self.decode([rows[i] for i in jpegs], device)))
        out = torch.empty((len(rows), *self.size, 3), dtype=torch.uint8, device=device)
        for i, (kind, top, left, height, width, _) in enumerate(header):
            if kind == KIND_JPEG:
                out[i] = self.crop_resize(decoded[i], top, left, height, width).permute(1, 2, 0)
            elif kind == KIND_RAW and (height, width) == self.size:
                out[i] = rows[i].view(height, width, 3).to(device, non_blocking=True)
            else:
                raise ValueError(f"--input-pipeline device: batch row {i} has kind {kind} and size {height}x{width}, "
                                 f"not a JPEG or {self.size[0]}x{self.size[1]} pixels: the batch was not made by "
                                 "EncodedCropTransform")
        return self.normalize(out, device, dtype)

    def crop_resize(self, image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """uint8 [3, h, w] -> the box resized to the output size, antialiased, as uint8 grey levels. Width
        first, rounded and clamped to grey levels, then height: PIL's (and torch's uint8 kernel's) two passes,
        whose clamp in between cuts the bicubic overshoot at sharp edges (one float pass: 3-6 grey levels off
        PIL's output, within one this way)."""
        out = image[:, top:top + height, left:left + width].float()[None]
        for size in ((height, self.size[1]), self.size):
            out = F.interpolate(out, size=size, mode=self.interpolation, antialias=True, align_corners=False)
            out = out.round_().clamp_(0, 255)
        return out[0].to(torch.uint8)

    def decode(self, jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """All JPEG rows at once; if that raises, one by one (`decode_row`)."""
        if not jpegs:
            return []
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        except Exception:  # noqa: BLE001  (one bad row fails the whole batch: find it row by row)
            return [self.decode_row(row, device) for row in jpegs]

    def decode_row(self, row: torch.Tensor, device: torch.device) -> torch.Tensor:
        try:
            return decode_jpeg(row, mode=ImageReadMode.RGB, device=device)
        except Exception as exn:  # noqa: BLE001
            if not self.warned:
                log.warning("--input-pipeline device: decode_jpeg on %s failed (%s); decoding such images on the "
                            "CPU with PIL (warned once)", device, str(exn).splitlines()[0] if str(exn) else exn)
                self.warned = True
        try:
            pixels = np.array(decode_fully(row.numpy().tobytes()))
        except Exception as exn:
            reason = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
            raise RuntimeError(f"--input-pipeline device: a training JPEG decodes neither on {device} nor with PIL "
                               f"({reason}); check the shards or use --input-pipeline fast") from exn
        return as_hwc(pixels).permute(2, 0, 1).to(device)


def train_image_pipeline(pipeline: str, transform) -> ImagePipeline:
    """--input-pipeline: "device" replaces open_clip's train transform by EncodedCropTransform in the workers
    and DecodeOnDevice in the loop (a transform it does not recognise is kept, as with "fast"); "fast" and
    "open_clip": training.data.fast_images. (Here, not there: this module builds on that one.)"""
    if pipeline not in INPUT_PIPELINES:
        raise ValueError(f"unknown --input-pipeline {pipeline!r}; choose from {', '.join(INPUT_PIPELINES)}")
    if pipeline != "device":
        return host_image_pipeline(pipeline, transform)
    fast = recognise_train_transform(transform)
    if fast is None:
        log.info("--input-pipeline device: the train transform is not open_clip's standard one; using it as "
                 "it is (%s)", type(transform).__name__)
        return ImagePipeline(transform, None)
    images = ImagePipeline(transform, fast)
    images.transform = EncodedCropTransform(fast)
    images.to_device = DecodeOnDevice(fast.size, fast.mean, fast.std, fast.interpolation.value)
    images.open_bytes, images.open_file = open_encoded, open_encoded_file
    return images
