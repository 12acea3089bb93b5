"""Photo-like renderings of the synthetic samples, for measuring the input pipeline on realistic JPEGs.

The shapes images of `training.data.synthetic.samples` are tiny flat-colour squares: their JPEGs decode in
microseconds, and a data loader benchmarked on them measures nothing that a real web image set costs. A
photo rendering keeps the sample's scene (so its caption stays true) at a camera-like 4:3 size and adds
what makes real photos weigh what they do: smooth lighting, texture at several scales, and sensor grain.
At 512x384 the JPEG (quality 90) weighs about 100 KB, as a web photo of that size does.

    render_photo(spec, width=512)  ->  a width x (3/4 width) RGB PIL image, a pure function of the spec
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from training.data.synthetic.samples import SampleSpec, render

#: (grid cells across the width, amplitude in grey levels): lighting, then texture at finer scales.
OCTAVES = ((3, 28.0), (12, 16.0), (48, 10.0), (160, 8.0), (640, 8.0))
SCENE_SIDE = 256
GRAIN_STD = 17.0  # per-pixel sensor noise: what sets the JPEG's weight, as in real photos
PHOTO_SEED_OFFSET = 0x9E37  # the photo's texture stream differs from the shapes image's noise stream


def photo_height(width: int) -> int:
    return max(1, width * 3 // 4)


def _octave_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """[height, width, 3] float32: smooth random fields upsampled (bicubic) from coarse grids, summed."""
    total = np.zeros((height, width, 3), dtype=np.float32)
    for cells, amplitude in OCTAVES:
        cells_x = max(2, min(cells, width))
        cells_y = max(2, round(cells_x * height / width))
        grid = rng.standard_normal((3, cells_y, cells_x), dtype=np.float32)
        grid = grid.mean(axis=0, keepdims=True) * 0.7 + grid * 0.3  # mostly luminance, as real textures are
        for channel in range(3):  # PIL's float resize: fast, and no torch threads to share a busy machine
            field = Image.fromarray(grid[channel], "F").resize((width, height), Image.BICUBIC)
            total[..., channel] += amplitude * np.asarray(field)
    return total


def render_photo(spec: SampleSpec, width: int = 512) -> Image.Image:
    """The sample's scene at width x 3/4 width, with lighting, texture and grain (see the module doc)."""
    height = photo_height(width)
    # square; the 4:3 photo is its middle band (every anchor lies inside it). Drawn at most SCENE_SIDE
    # pixels wide and enlarged: soft edges, like a lens's, at a fraction of the drawing cost.
    scene = render(spec, min(width, SCENE_SIDE)).resize((width, width), Image.BICUBIC)
    top = (width - height) // 2
    # pulled in from pure black and white, as exposure does: noise and texture there are not clipped away
    pixels = 24.0 + 0.8 * np.asarray(scene, dtype=np.float32)[top:top + height]
    rng = np.random.default_rng(spec.noise_seed + PHOTO_SEED_OFFSET)
    pixels = pixels + _octave_noise(rng, width, height)
    pixels += GRAIN_STD * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
