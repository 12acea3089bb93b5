import io
import json
import os
import re
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.synthetic import samples as synthetic, shards
from training.data.synthetic.samples import (
    ANCHORS, BACKGROUND_COLOURS, COLOUR_WORDS, INVERSE_RELATION, RELATION_PHRASES, SHAPE_COLOURS, SHAPE_WORDS,
    SyntheticCaptions, draw_spec, get_sample, render, sample_spec, stream_rng,
)
from training.data.synthetic.shards import write_shards
from training.data.synthetic.tasks import (
    RETRIEVAL_STREAM, TASK_NAMES, classification_tasks, describe, relation_candidates, retrieval_split,
)

SEED = 7


@pytest.fixture(scope="module")
def tasks():
    return classification_tasks(SEED, n_per_task=120)


def _mentions(text: str, phrase: str) -> int | None:
    """Character offset of `phrase` as whole words in `text`, else None."""
    match = re.search(rf"\b{re.escape(phrase)}\b", text)
    return match.start() if match else None


def _first_mention(text: str, phrases) -> int | None:
    offsets = [o for o in (_mentions(text, p) for p in phrases) if o is not None]
    return min(offsets) if offsets else None


# ------------------------------------------------------------------ purity

def test_sample_is_a_pure_function_of_seed_and_index():
    for i in (0, 1, 12345, 10**7):
        first_image, first_text = get_sample(SEED, i)
        second_image, second_text = get_sample(SEED, i)
        assert first_image.tobytes() == second_image.tobytes()
        assert first_text == second_text
        assert sample_spec(SEED, i) == sample_spec(SEED, i)


def test_global_random_state_does_not_leak_in():
    np.random.seed(0)
    before = get_sample(SEED, 3)
    np.random.seed(1)
    np.random.random(100)
    after = get_sample(SEED, 3)
    assert before[0].tobytes() == after[0].tobytes() and before[1] == after[1]


def test_different_indices_and_seeds_give_different_samples():
    images = {get_sample(SEED, i)[0].tobytes() for i in range(50)}
    assert len(images) == 50
    assert get_sample(SEED, 0)[0].tobytes() != get_sample(SEED + 1, 0)[0].tobytes()


def test_render_is_rgb_at_requested_size():
    spec = sample_spec(SEED, 0)
    for size in (32, 64, 96):
        image = render(spec, size)
        assert image.mode == "RGB" and image.size == (size, size)


def test_captions_vary_across_templates():
    captions = {get_sample(SEED, i)[1] for i in range(300)}
    assert len(captions) > 250


# ----------------------------------------------------------------- captions

def test_captions_name_only_true_colours_and_shapes():
    for i in range(400):
        spec = sample_spec(SEED, i)
        text = get_sample(SEED, i)[1]
        true_colours = {obj.colour for obj in spec.objects}
        true_shapes = {obj.shape for obj in spec.objects}
        for colour, words in COLOUR_WORDS.items():
            if _first_mention(text, words) is not None:
                assert colour in true_colours, (text, spec)
        for shape, words in SHAPE_WORDS.items():
            if _first_mention(text, words) is not None:
                assert shape in true_shapes, (text, spec)
        named_colour = _first_mention(text, [w for c in true_colours for w in COLOUR_WORDS[c]]) is not None
        named_shape = _first_mention(text, [w for s in true_shapes for w in SHAPE_WORDS[s]]) is not None
        assert named_colour or named_shape, text


def test_pair_captions_state_the_true_relation_in_either_order():
    checked = 0
    for i in range(400):
        spec = sample_spec(SEED, i)
        if spec.relation is None or spec.objects[0].colour == spec.objects[1].colour:
            continue
        text = get_sample(SEED, i)[1]
        first, second = (_first_mention(text, COLOUR_WORDS[obj.colour]) for obj in spec.objects)
        stated = {rel for rel, phrases in RELATION_PHRASES.items() if _first_mention(text, phrases) is not None}
        expected = spec.relation if first < second else INVERSE_RELATION[spec.relation]
        assert stated == {expected}, (text, spec.relation)
        checked += 1
    assert checked > 50


def test_canonical_description_names_every_attribute():
    spec = sample_spec(SEED, 0)
    text = describe(spec)
    for obj in spec.objects:
        for word in (obj.colour, obj.shape, obj.size):
            assert word in text
    assert spec.background in text


# ------------------------------------------------------------------ dataset

def test_dataset_returns_image_text_and_offset_key():
    dataset = SyntheticCaptions(10, seed=SEED, offset=100)
    image, text, key = dataset[3]
    assert len(dataset) == 10 and key == 103
    assert isinstance(image, Image.Image) and isinstance(text, str)
    assert (image.tobytes(), text) == (get_sample(SEED, 103)[0].tobytes(), get_sample(SEED, 103)[1])
    with pytest.raises(IndexError):
        dataset[10]


def test_dataset_applies_transform_and_tokenizer():
    def to_tensor(image):
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255

    def tokenizer(texts):
        return torch.tensor([[len(t.split())] for t in texts])

    dataset = SyntheticCaptions(4, seed=SEED, transform=to_tensor, tokenizer=tokenizer, size=32)
    image, tokens, key = dataset[1]
    assert image.shape == (3, 32, 32)
    assert tokens.tolist() == [len(get_sample(SEED, 1)[1].split())]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[2].tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------- shards

def test_shards_round_trip(tmp_path):
    out_dir = str(tmp_path / "shards")
    paths = write_shards(out_dir, num_samples=25, seed=SEED, samples_per_shard=10, size=32)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    with open(os.path.join(out_dir, "info.json")) as f:
        info = json.load(f)
    assert info["pattern"] == os.path.join(out_dir, "{00000..00002}.tar")
    assert (info["num_samples"], info["seed"], info["size"]) == (25, SEED, 32)

    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    assert sorted(samples) == [f"{i:09d}" for i in range(25)]
    for key, members in samples.items():
        attributes = json.loads(members["json"])
        image, text = get_sample(SEED, int(key), size=32)
        assert attributes["key"] == int(key)
        assert attributes == {"key": int(key), "caption": text, **sample_spec(SEED, int(key)).attributes()}
        assert members["txt"].decode() == text
        decoded = Image.open(io.BytesIO(members["jpg"]))
        assert decoded.format == "JPEG" and decoded.size == (32, 32)
        # JPEG is lossy, but at quality 95 the picture must still be the same one.
        difference = np.abs(np.asarray(decoded, dtype=float) - np.asarray(image, dtype=float)).mean()
        assert difference < 6


def test_shards_are_byte_reproducible_with_workers(tmp_path):
    sequential = write_shards(str(tmp_path / "a"), 12, seed=SEED, samples_per_shard=5, size=16)
    parallel = write_shards(str(tmp_path / "b"), 12, seed=SEED, samples_per_shard=5, size=16, workers=2)
    for a, b in zip(sequential, parallel, strict=True):
        assert open(a, "rb").read() == open(b, "rb").read()


def test_cli_prints_brace_pattern(tmp_path, capsys):
    out_dir = str(tmp_path / "cli")
    shards.main(["--out", out_dir, "--num-samples", "7", "--seed", "3", "--samples-per-shard", "4", "--size", "16"])
    assert capsys.readouterr().out.strip() == os.path.join(out_dir, "{00000..00001}.tar")


# --------------------------------------------------------------- held-out

def test_held_out_data_is_disjoint_from_training(tasks):
    training = [sample_spec(SEED, i) for i in range(2000)]
    training_geometry = {(o.x, o.y, o.radius) for spec in training for o in spec.objects}
    held_out = [spec for task in tasks.values() for spec in task.specs]
    held_out += [draw_spec(stream_rng(RETRIEVAL_STREAM, SEED, i)) for i in range(200)]
    assert not training_geometry & {(o.x, o.y, o.radius) for spec in held_out for o in spec.objects}
    for name, task in tasks.items():
        for i in range(5):
            assert task.images[i].tobytes() != render(training[i]).tobytes(), name
    retrieval_images, _ = retrieval_split(SEED, 5)
    for i, image in enumerate(retrieval_images):
        assert image.tobytes() != get_sample(SEED, i)[0].tobytes()


def test_tasks_have_balanced_labels_and_consistent_classes(tasks):
    expected_classes = {"colour": 8, "shape": 6, "size": 2, "position": 5, "background": 3, "relation": 4}
    assert set(tasks) == set(TASK_NAMES) == set(expected_classes)
    for name, task in tasks.items():
        assert len(task.images) == len(task.labels) == 120
        counts = Counter(task.labels)
        assert set(counts) == set(range(expected_classes[name])), name
        assert max(counts.values()) - min(counts.values()) <= 1, name
        if name == "relation":
            assert task.classnames is None and all(len(c) == 4 for c in task.candidates)
        else:
            assert len(task.classnames) == expected_classes[name]
            assert task.templates and all("{}" in t for t in task.templates)


def test_task_labels_match_the_rendered_attributes(tasks):
    for spec, label in zip(tasks["colour"].specs, tasks["colour"].labels):
        assert spec.objects[0].colour == tasks["colour"].classnames[label]
    for spec, label in zip(tasks["shape"].specs, tasks["shape"].labels):
        assert spec.objects[0].shape == tasks["shape"].classnames[label]
    relation = tasks["relation"]
    for spec, label, candidates in zip(relation.specs, relation.labels, relation.candidates):
        assert candidates == relation_candidates(spec)
        assert spec.relation in candidates[label] and len(set(candidates)) == 4


def test_task_generation_is_fast():
    start = time.perf_counter()
    classification_tasks(SEED, n_per_task=500, names=("colour",))
    assert time.perf_counter() - start < 2.0


def test_retrieval_split_is_pure_and_one_caption_per_image():
    images, captions = retrieval_split(SEED, 20)
    again_images, again_captions = retrieval_split(SEED, 20)
    assert len(images) == len(captions) == 20 and captions == again_captions
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again_images]


# ------------------------------------------------------------ learnability

def _foreground(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and mask of everything that differs clearly from the border colour."""
    pixels = np.asarray(image, dtype=float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    return pixels, np.linalg.norm(pixels - background, axis=-1) > 60


def _nearest(value: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda name: np.linalg.norm(value - np.array(palette[name])))


def _accuracy(task, predict) -> float:
    return np.mean([predict(image) == task.classnames[label] for image, label in zip(task.images, task.labels)])


def test_colour_is_learnable_by_a_trivial_classifier(tasks):
    def predict(image):
        pixels, mask = _foreground(image)
        return _nearest(np.median(pixels[mask], axis=0), SHAPE_COLOURS)
    assert _accuracy(tasks["colour"], predict) > 0.9


def test_background_size_and_position_are_learnable_by_trivial_classifiers(tasks):
    def background(image):
        pixels, mask = _foreground(image)
        return _nearest(np.median(pixels[~mask], axis=0), BACKGROUND_COLOURS)

    def size(image):
        # Small shapes cover at most ~125 px at 64x64, large ones at least ~190.
        return "large" if _foreground(image)[1].sum() > 155 else "small"

    def position(image):
        ys, xs = np.nonzero(_foreground(image)[1])
        centroid = np.array([xs.mean(), ys.mean()]) / image.size[0]
        return synthetic.POSITION_PHRASES[_nearest(centroid, ANCHORS)][0]

    assert _accuracy(tasks["background"], background) > 0.9
    assert _accuracy(tasks["size"], size) > 0.9
    assert _accuracy(tasks["position"], position) > 0.9
