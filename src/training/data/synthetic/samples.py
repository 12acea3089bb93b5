"""Procedural image-caption data set with real, learnable structure.

Each image shows one shape, or two shapes in a spatial relation, drawn with
PIL on a plain background; each caption describes it through one of many
templates and synonyms, so a text encoder has to learn words rather than
memorise fixed strings.

Sample ``i`` is a pure function of ``(seed, i)``: any number of samples costs
no storage, DataLoader workers need no shared state, and shards written on one
machine match samples generated on another. Held-out evaluation data (see
``training.data.synthetic.tasks``) comes from separately tagged random streams, so
no evaluation image coincides with a training image.

    python -m training.data.synthetic --out DIR --num-samples N --seed S

writes them as webdataset shards (``training.data.synthetic.shards``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# Hues far apart from each other and from every background, so colour is
# unambiguous even after jitter, noise and JPEG compression.
SHAPE_COLOURS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (35, 65, 210),
    "purple": (135, 50, 185),
    "pink": (245, 125, 190),
}
BACKGROUND_COLOURS: dict[str, RGB] = {
    "black": (22, 22, 26),
    "grey": (128, 128, 128),
    "white": (238, 238, 232),
}
SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left of", "right of", "above", "below")  # objects[0] REL objects[1]
RELATION_POSITIONS = {"left of": ("left", "right"), "right of": ("right", "left"),
                      "above": ("top", "bottom"), "below": ("bottom", "top")}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Caption vocabulary. The first entry is the canonical word (used by the
# zero-shot class names), so captions use it more often than the others.
COLOUR_WORDS = {
    "red": ("red", "scarlet"), "orange": ("orange",), "yellow": ("yellow", "golden"),
    "green": ("green",), "cyan": ("cyan", "turquoise"), "blue": ("blue",),
    "purple": ("purple", "violet"), "pink": ("pink",),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round dot"), "square": ("square", "box"),
    "triangle": ("triangle",), "cross": ("cross", "plus sign"), "star": ("star",),
    "diamond": ("diamond", "rhombus"),
}
GENERIC_NOUNS = ("shape", "object", "figure")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "in the left half"),
    "right": ("on the right", "at the right", "in the right half"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
BACKGROUND_WORDS = {"black": ("black", "dark"), "grey": ("grey", "gray"), "white": ("white", "light")}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
SINGLE_FRAMES = ("{}", "a photo of {}", "an image of {}", "a picture showing {}", "there is {}", "a drawing of {}")
PAIR_FRAMES = ("{}", "a photo of {}", "two shapes: {}", "an image with {}", "a drawing of {}")

# Geometry in image-relative units, so one spec renders at any resolution.
# Anchors and radii leave every shape inside the canvas and keep the two
# shapes of a pair apart, whatever the jitter.
NEAR, FAR = 0.27, 0.73
ANCHORS = {"left": (NEAR, 0.5), "right": (FAR, 0.5), "top": (0.5, NEAR), "bottom": (0.5, FAR), "centre": (0.5, 0.5)}
RADII = {"small": 0.10, "large": 0.19}
POSITION_JITTER = 0.03
PAIR_CROSS_AXIS_JITTER = 0.10  # a pair still reads clearly as horizontal / vertical
RADIUS_JITTER = 0.08  # relative
MAX_ROTATION_DEG = 15.0  # small enough that a square never looks like a diamond
COLOUR_JITTER = 12
BACKGROUND_JITTER = 10
NOISE_STD = 4.0
PAIR_PROBABILITY = 0.4
SUPERSAMPLING = 4  # draw large, then downscale: antialiased edges

# Tags that make each random stream distinct from every other, so e.g. the
# training stream for (seed, i) never equals an evaluation stream.
TRAIN_SPEC_STREAM = 0x7A1
TRAIN_CAPTION_STREAM = 0x7A2
KEY_DIGITS = 9


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    position: str
    x: float  # centre, as a fraction of the image side
    y: float
    radius: float  # fraction of the image side
    angle: float  # degrees
    rgb: RGB

    def attributes(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class SampleSpec:
    """Everything needed to render an image: `render` is a pure function of it."""

    objects: tuple[ShapeSpec, ...]  # one or two
    relation: str | None  # for pairs: objects[0] <relation> objects[1]
    background: str
    background_rgb: RGB
    noise_seed: int

    def attributes(self) -> dict:
        return {
            "background": self.background,
            "relation": self.relation,
            "objects": [obj.attributes() for obj in self.objects],
        }


def stream_rng(*tags: int) -> np.random.Generator:
    """Independent generator for a tuple of non-negative ints; never global state."""
    if any(int(t) < 0 for t in tags):
        raise ValueError(f"seeds and indices must be non-negative, got {tags}")
    return np.random.default_rng([int(t) for t in tags])


def _choose(rng: np.random.Generator, options, fixed=None):
    return fixed if fixed is not None else options[rng.integers(len(options))]


def _jittered_rgb(rng: np.random.Generator, rgb: RGB, jitter: int = COLOUR_JITTER) -> RGB:
    offsets = rng.integers(-jitter, jitter + 1, size=3).tolist()
    return tuple(min(max(c + d, 0), 255) for c, d in zip(rgb, offsets))


def _jittered_tone(rng: np.random.Generator, rgb: RGB) -> RGB:
    # Mostly a brightness shift: a per-channel shift would tint a grey
    # background until it reads as a colour.
    shift = int(rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1))
    return _jittered_rgb(rng, tuple(c + shift for c in rgb), jitter=3)


def _draw_shape(rng, position: str, *, cross_axis_jitter=POSITION_JITTER,
                shape=None, colour=None, size=None) -> ShapeSpec:
    shape, colour, size = _choose(rng, SHAPES, shape), _choose(rng, tuple(SHAPE_COLOURS), colour), _choose(rng, SIZES, size)
    # "along" is the axis that defines the position name, so jitter there
    # stays small; the other axis may wander more without changing the label.
    along, across = rng.uniform(-1, 1, size=2) * (POSITION_JITTER, cross_axis_jitter)
    dx, dy = (along, across) if position in ("left", "right") else (across, along)
    anchor_x, anchor_y = ANCHORS[position]
    return ShapeSpec(
        shape=shape, colour=colour, size=size, position=position,
        x=float(anchor_x + dx), y=float(anchor_y + dy),
        radius=float(RADII[size] * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))),
        angle=float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)),
        rgb=_jittered_rgb(rng, SHAPE_COLOURS[colour]),
    )


def _scene(rng, objects, relation, background) -> SampleSpec:
    background = _choose(rng, tuple(BACKGROUND_COLOURS), background)
    return SampleSpec(
        objects=tuple(objects), relation=relation, background=background,
        background_rgb=_jittered_tone(rng, BACKGROUND_COLOURS[background]),
        noise_seed=int(rng.integers(2**31)),
    )


def draw_single_spec(rng: np.random.Generator, *, shape=None, colour=None, size=None,
                     position=None, background=None) -> SampleSpec:
    """A one-shape scene; any attribute left as None is drawn at random."""
    position = _choose(rng, POSITIONS, position)
    obj = _draw_shape(rng, position, shape=shape, colour=colour, size=size)
    return _scene(rng, [obj], None, background)


def draw_pair_spec(rng: np.random.Generator, *, relation=None, background=None) -> SampleSpec:
    """Two shapes in a relation; they differ in colour or shape so that a
    caption like "a red circle left of a blue square" is never symmetric."""
    relation = _choose(rng, RELATIONS, relation)
    first_position, second_position = RELATION_POSITIONS[relation]
    first = _draw_shape(rng, first_position, cross_axis_jitter=PAIR_CROSS_AXIS_JITTER)
    while True:
        second = _draw_shape(rng, second_position, cross_axis_jitter=PAIR_CROSS_AXIS_JITTER)
        if (second.shape, second.colour) != (first.shape, first.colour):
            break
    return _scene(rng, [first, second], relation, background)


def draw_spec(rng: np.random.Generator) -> SampleSpec:
    return draw_pair_spec(rng) if rng.random() < PAIR_PROBABILITY else draw_single_spec(rng)


def sample_spec(seed: int, i: int) -> SampleSpec:
    """Attributes and geometry of training sample i."""
    return draw_spec(stream_rng(TRAIN_SPEC_STREAM, seed, i))


# ---------------------------------------------------------------- rendering

def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Polygon in units of the shape's radius, centred at 0 (y points down)."""
    if shape == "square":
        return [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    if shape == "triangle":
        return [(1.1 * np.cos(a), 1.1 * np.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "diamond":  # elongated, so it differs from a rotated square
        return [(0, -1.1), (0.7, 0), (0, 1.1), (-0.7, 0)]
    if shape == "cross":
        a, t = 1.0, 0.3
        return [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t), (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]
    if shape == "star":
        angles = np.radians(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.1, 0.48)
        return list(zip(radii * np.cos(angles), radii * np.sin(angles)))
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeSpec, canvas: int) -> None:
    cx, cy, r = obj.x * canvas, obj.y * canvas, obj.radius * canvas
    if obj.shape == "circle":
        draw.ellipse([cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r], fill=obj.rgb)
        return
    cos, sin = np.cos(np.radians(obj.angle)), np.sin(np.radians(obj.angle))
    points = [(cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos)) for u, v in _unit_outline(obj.shape)]
    draw.polygon(points, fill=obj.rgb)


def render(spec: SampleSpec, size: int = 64) -> Image.Image:
    canvas = size * SUPERSAMPLING
    image = Image.new("RGB", (canvas, canvas), spec.background_rgb)
    draw = ImageDraw.Draw(image)
    for obj in spec.objects:
        _draw_object(draw, obj, canvas)
    image = image.reduce(SUPERSAMPLING)
    # Sensor-like noise, so no two images are exactly flat colour fields.
    noise = np.random.default_rng(spec.noise_seed).standard_normal((size, size, 3), dtype=np.float32)
    pixels = np.clip(np.asarray(image, dtype=np.float32) + NOISE_STD * noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# ----------------------------------------------------------------- captions

def _word(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    """Canonical word half of the time, otherwise any synonym."""
    return words[0] if len(words) == 1 or rng.random() < 0.5 else words[rng.integers(len(words))]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(rng, obj: ShapeSpec, *, size_probability: float, can_omit: bool) -> str:
    """E.g. "a small red circle", "a big box coloured cyan", "a green shape"."""
    named_shape = not can_omit or rng.random() < 0.85
    named_colour = not can_omit or not named_shape or rng.random() < 0.85
    noun = _word(rng, SHAPE_WORDS[obj.shape]) if named_shape else _word(rng, GENERIC_NOUNS)
    size = _word(rng, SIZE_WORDS[obj.size]) + " " if rng.random() < size_probability else ""
    if not named_colour:
        return with_article(size + noun)
    colour = _word(rng, COLOUR_WORDS[obj.colour])
    if rng.random() < 0.2:
        return with_article(f"{size}{noun} coloured {colour}")
    return with_article(f"{size}{colour} {noun}")


def _background_phrase(rng, spec: SampleSpec) -> str:
    return f"on {with_article(_word(rng, BACKGROUND_WORDS[spec.background]))} background"


def caption(spec: SampleSpec, rng: np.random.Generator) -> str:
    """A randomly templated caption; attributes may be omitted, as in real alt-text."""
    if spec.relation is None:
        obj = spec.objects[0]
        parts = [_noun_phrase(rng, obj, size_probability=0.6, can_omit=True)]
        if rng.random() < 0.6:
            parts.append(_word(rng, POSITION_PHRASES[obj.position]))
        frame = _choose(rng, SINGLE_FRAMES)
    else:
        first, second, relation = spec.objects[0], spec.objects[1], spec.relation
        if rng.random() < 0.5:  # "A left of B" == "B right of A"
            first, second, relation = second, first, INVERSE_RELATION[relation]
        parts = [
            _noun_phrase(rng, first, size_probability=0.3, can_omit=False),
            _word(rng, RELATION_PHRASES[relation]),
            _noun_phrase(rng, second, size_probability=0.3, can_omit=False),
        ]
        frame = _choose(rng, PAIR_FRAMES)
    if rng.random() < 0.4:
        parts.append(_background_phrase(rng, spec))
    return frame.format(" ".join(parts))


def get_sample(seed: int, i: int, size: int = 64) -> tuple[Image.Image, str]:
    spec = sample_spec(seed, i)
    return render(spec, size), caption(spec, stream_rng(TRAIN_CAPTION_STREAM, seed, i))


class SyntheticCaptions(torch.utils.data.Dataset):
    """Samples offset..offset+num_samples-1 of the procedural stream.

    Returns (image, text, key): image is transform(PIL) or the PIL image, text
    is tokenizer([caption])[0] or the caption, key is the int sample index.
    """

    def __init__(self, num_samples: int, seed: int = 0, transform=None, tokenizer=None,
                 size: int = 64, offset: int = 0):
        if num_samples < 0 or offset < 0:
            raise ValueError("num_samples and offset must be non-negative")
        self.num_samples, self.seed, self.size, self.offset = int(num_samples), int(seed), int(size), int(offset)
        self.transform, self.tokenizer = transform, tokenizer

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int):
        if not -self.num_samples <= idx < self.num_samples:
            raise IndexError(f"index {idx} out of range for {self.num_samples} samples")
        key = self.offset + idx % self.num_samples
        image, text = get_sample(self.seed, key, self.size)
        if self.transform is not None:
            image = self.transform(image)
        if self.tokenizer is not None:
            text = self.tokenizer([text])[0]
        return image, text, key
