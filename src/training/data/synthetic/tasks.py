"""Held-out evaluation tasks for the procedural data set in `training.data.synthetic.samples`.

Evaluation images come from random streams tagged differently from the
training streams, so no evaluation image (exact geometry, colour jitter,
noise) is ever a training image. Attribute *combinations* do recur, by
design: the tasks test whether the model learned the words for colours,
shapes, sizes, positions and relations, not whether it saw a given pixel
layout before.

Classification tasks follow open_clip's zero-shot convention (class names
plus "{}" templates); "relation" instead gives each image its own four
candidate captions, because its objects differ from image to image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from training.data.synthetic.samples import (
    BACKGROUND_COLOURS, POSITION_PHRASES, POSITIONS, RELATIONS, SHAPE_COLOURS, SHAPES, SIZES,
    SampleSpec, ShapeSpec, draw_pair_spec, draw_single_spec, draw_spec, render, stream_rng, with_article,
)

EVAL_STREAM = 0xE7A1
RETRIEVAL_STREAM = 0xE7A2


@dataclass
class Task:
    images: list[Image.Image]
    labels: list[int]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    candidates: list[list[str]] | None = None  # per-image captions; label indexes into them
    specs: list[SampleSpec] = field(default_factory=list, repr=False)

    @property
    def is_zero_shot(self) -> bool:
        return self.classnames is not None


@dataclass(frozen=True)
class _AttributeTask:
    attribute: str  # keyword of draw_single_spec
    values: tuple[str, ...]
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


# Templates avoid an article right before "{}" ("a orange shape") and echo
# the phrasing of training captions without copying any one of them.
_ATTRIBUTE_TASKS = {
    "colour": _AttributeTask(
        "colour", tuple(SHAPE_COLOURS), tuple(SHAPE_COLOURS),
        ("a photo of a shape coloured {}.", "something {}.", "{} shape.", "an image of a {} object.")),
    "shape": _AttributeTask(
        "shape", SHAPES, SHAPES,
        ("a photo of a {}.", "a {}.", "a drawing of a {}.", "there is a {}.")),
    "size": _AttributeTask(
        "size", SIZES, SIZES,
        ("a photo of a {} shape.", "a {} object.", "something {}.", "a drawing of a {} figure.")),
    "position": _AttributeTask(
        "position", POSITIONS, tuple(POSITION_PHRASES[p][0] for p in POSITIONS),
        ("a shape {}.", "a photo of an object {}.", "something {}.", "there is a figure {}.")),
    "background": _AttributeTask(
        "background", tuple(BACKGROUND_COLOURS), tuple(BACKGROUND_COLOURS),
        ("a shape on a {} background.", "a photo of an object on a {} background.", "{} background.")),
}
TASK_NAMES = (*_ATTRIBUTE_TASKS, "relation")


def _attribute_task(seed: int, task_id: int, spec: _AttributeTask, n: int, size: int) -> Task:
    # label = i mod #classes keeps the classes balanced; everything else is random.
    labels = [i % len(spec.values) for i in range(n)]
    specs = [draw_single_spec(stream_rng(EVAL_STREAM, seed, task_id, i), **{spec.attribute: spec.values[label]})
             for i, label in enumerate(labels)]
    return Task(images=[render(s, size) for s in specs], labels=labels, classnames=list(spec.classnames),
                templates=list(spec.templates), specs=specs)


def object_description(obj: ShapeSpec, with_size: bool = True) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"


def describe(spec: SampleSpec) -> str:
    """The canonical caption naming every attribute, e.g. "a small red circle
    on the left on a grey background"."""
    background = f"on a {spec.background} background"
    if spec.relation is None:
        obj = spec.objects[0]
        return f"{with_article(object_description(obj))} {POSITION_PHRASES[obj.position][0]} {background}"
    first, second = (with_article(object_description(obj)) for obj in spec.objects)
    return f"{first} {spec.relation} {second} {background}"


def relation_candidates(spec: SampleSpec) -> list[str]:
    """The image's own two objects in each of the four relations, in RELATIONS order."""
    first, second = (with_article(object_description(obj, with_size=False)) for obj in spec.objects)
    return [f"{first} {relation} {second}" for relation in RELATIONS]


def _relation_task(seed: int, task_id: int, n: int, size: int) -> Task:
    labels = [i % len(RELATIONS) for i in range(n)]
    specs = [draw_pair_spec(stream_rng(EVAL_STREAM, seed, task_id, i), relation=RELATIONS[label])
             for i, label in enumerate(labels)]
    return Task(images=[render(s, size) for s in specs], labels=labels,
                candidates=[relation_candidates(s) for s in specs], specs=specs)


def classification_tasks(seed: int = 0, n_per_task: int = 500, size: int = 64,
                         names: tuple[str, ...] = TASK_NAMES) -> dict[str, Task]:
    """Held-out tasks: colour, shape, size, position, background (zero-shot
    class names + templates) and relation (per-image candidate captions)."""
    unknown = set(names) - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASK_NAMES}")
    tasks = {}
    for name in names:
        task_id = TASK_NAMES.index(name)  # stable per name: a task never shares a stream with another
        if name == "relation":
            tasks[name] = _relation_task(seed, task_id, n_per_task, size)
        else:
            tasks[name] = _attribute_task(seed, task_id, _ATTRIBUTE_TASKS[name], n_per_task, size)
    return tasks


def retrieval_split(seed: int = 0, n: int = 1000, size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """Held-out images with one caption each, naming every attribute."""
    specs = [draw_spec(stream_rng(RETRIEVAL_STREAM, seed, i)) for i in range(n)]
    return [render(s, size) for s in specs], [describe(s) for s in specs]


def chance_top1() -> dict[str, float]:
    """Top-1 accuracy of a random guess on each held-out task (balanced classes: 1 / number of classes)."""
    chance = {name: 1.0 / len(spec.values) for name, spec in _ATTRIBUTE_TASKS.items()}
    chance["relation"] = 1.0 / len(RELATIONS)
    return {name: chance[name] for name in TASK_NAMES}
