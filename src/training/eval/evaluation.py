"""Evaluation: zero-shot classification, per-image candidate choice, retrieval and the CLIP loss.

`evaluate(...)` runs after every epoch of training (main.py calls it on every rank); the standalone
`python -m training.eval.evaluate` reuses the same functions on a saved checkpoint. In training, the
built-in shapes evaluation runs only on the built-in data set or with --builtin-eval (on the user's data
its numbers mean nothing, and rank 0 would spend minutes on them while the others wait); --val-data and
--imagenet-val are evaluated when given, as open_clip does. Rank 0's part checks the stop flag
(training.preemption.StopSignals) between batches: a signal stops it within a batch, and the evaluation
is made up when the run is launched again (`evaluation_missing`).

The metrics themselves (ties count against the model; identical captions match each other) are in
training.eval.metrics.

Result keys (flat; metric names never contain "/"):
    builtin/{colour,shape,size,position,background,relation}/top1, .../top5 (tasks of > 5 classes),
    builtin/mean_top1, builtin/retrieval/{image_to_text,text_to_image}_R@{1,5,10},
    builtin/retrieval/clip_loss, val/... (the same retrieval keys, --val-data), imagenet/top1, imagenet/top5.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.loop import autocast
from training.data.synthetic.tasks import TASK_NAMES, classification_tasks, retrieval_split

from training.eval.metrics import candidate_accuracy, class_embeddings, pair_metrics, zero_shot_accuracy
from training.eval.open_clip_names import open_clip_val_names

log = logging.getLogger(__name__)

BUILTIN_N_PER_TASK = 500  # images per built-in classification task
BUILTIN_RETRIEVAL_N = 1000
BUILTIN_IMAGE_SIZE = 64  # training.data.synthetic.samples's default image side
Progress = Callable[[int], object] | None  # called with the number of images just encoded



# ------------------------------------------------------------------------------------ encoders

class EvaluationStopped(Exception):
    """A stop signal arrived during the evaluation (EvalSettings.should_stop)."""


@dataclass
class EvalSettings:
    device: torch.device
    precision: str = "fp32"
    batch_size: int = 256
    workers: int = 0
    should_stop: Callable[[], bool] | None = None  # checked before every batch

    def check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise EvaluationStopped

    @classmethod
    def from_args(cls, args) -> "EvalSettings":
        return cls(torch.device(args.device), args.precision, args.batch_size, args.workers)


def _input_dtype(model) -> torch.dtype:
    """fp32 inputs, except for a model cast to bf16/fp16 as a whole (--precision bf16)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def encode_images(model, batches: Iterable[torch.Tensor], settings: EvalSettings,
                  progress: Progress = None) -> torch.Tensor:
    dtype, features = _input_dtype(model), []
    for images in batches:
        settings.check_stop()
        with autocast(settings.precision, settings.device):
            features.append(model.encode_image(images.to(settings.device, dtype), normalize=True).float())
        if progress is not None:
            progress(len(images))
    return torch.cat(features)


@torch.no_grad()
def encode_texts(model, tokens: torch.Tensor, settings: EvalSettings) -> torch.Tensor:
    features = []
    for start in range(0, tokens.shape[0], settings.batch_size):
        settings.check_stop()
        with autocast(settings.precision, settings.device):
            features.append(model.encode_text(tokens[start:start + settings.batch_size].to(settings.device),
                                              normalize=True).float())
    return torch.cat(features)


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence,
                         settings: EvalSettings) -> torch.Tensor:
    """[classes, d]; templates are format strings with "{}" or callables (open_clip's lists)."""
    texts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    embeddings = encode_texts(model, tokenizer(texts), settings)
    return class_embeddings(embeddings.view(len(classnames), len(templates), -1))


def _logit_scale(model) -> float:
    return model.logit_scale.detach().float().exp().item()


# ------------------------------------------------------------------------------------- data sets

@functools.lru_cache(maxsize=2)
def builtin_tasks(seed: int, n_per_task: int, size: int = BUILTIN_IMAGE_SIZE) -> dict:
    """Generated once per process (~0.4 s a task); shared: do not modify."""
    return classification_tasks(seed, n_per_task, size)


@functools.lru_cache(maxsize=2)
def builtin_retrieval(seed: int, n: int, size: int = BUILTIN_IMAGE_SIZE) -> tuple:
    return retrieval_split(seed, n, size)


_PREPROCESSED: dict = {}  # (name, id(preprocess)) -> (preprocess, tensor); holding preprocess pins its id
PREPROCESSED_CACHE_BYTES = 512 * 2**20  # a 32-px model's 4000 built-in images take 50 MB; 224 px: 2.4 GB


def preprocessed(name: tuple, images: Sequence, preprocess) -> torch.Tensor:
    """The built-in images `name` through `preprocess`, stacked; kept for the next epoch while the
    cache stays under PREPROCESSED_CACHE_BYTES (preprocessing costs about as much as encoding)."""
    hit = _PREPROCESSED.get((name, id(preprocess)))
    if hit is not None and hit[0] is preprocess:
        return hit[1]
    stacked = torch.stack([preprocess(image) for image in images])
    if sum(t.nbytes for _, t in _PREPROCESSED.values()) + stacked.nbytes <= PREPROCESSED_CACHE_BYTES:
        _PREPROCESSED[(name, id(preprocess))] = (preprocess, stacked)
    return stacked


def tensor_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    return (images[start:start + batch_size] for start in range(0, images.shape[0], batch_size))


def builtin_image_count(zero_shot: bool = True, retrieval: bool = True) -> int:
    """Images the built-in evaluations encode (for progress bars)."""
    return len(TASK_NAMES) * BUILTIN_N_PER_TASK * zero_shot + BUILTIN_RETRIEVAL_N * retrieval


def evaluate_builtin_zero_shot(model, tokenizer, preprocess, settings: EvalSettings, seed: int = 0,
                               progress: Progress = None) -> dict[str, float]:
    out, top1 = {}, []
    for name, task in builtin_tasks(seed, BUILTIN_N_PER_TASK).items():
        labels = torch.tensor(task.labels, device=settings.device)
        pixels = preprocessed(("task", seed, BUILTIN_N_PER_TASK, name), task.images, preprocess)
        images = encode_images(model, tensor_batches(pixels, settings.batch_size), settings, progress)
        if task.is_zero_shot:
            classes = zero_shot_classifier(model, tokenizer, task.classnames, task.templates, settings)
            metrics = zero_shot_accuracy(images, classes, labels)
        else:
            per_image = {len(c) for c in task.candidates}
            if len(per_image) != 1:
                raise ValueError(f"task {name}: images have different numbers of candidates {sorted(per_image)}")
            flat = [caption for candidates in task.candidates for caption in candidates]
            candidates = encode_texts(model, tokenizer(flat), settings).view(len(task.images), per_image.pop(), -1)
            metrics = {"top1": candidate_accuracy(images, candidates, labels)}
        out |= {f"builtin/{name}/{metric}": value for metric, value in metrics.items()}
        top1.append(metrics["top1"])
    out["builtin/mean_top1"] = sum(top1) / len(top1)
    return out


def evaluate_builtin_retrieval(model, tokenizer, preprocess, settings: EvalSettings, seed: int = 0,
                               progress: Progress = None) -> dict[str, float]:
    images, captions = builtin_retrieval(seed, BUILTIN_RETRIEVAL_N)
    tokens = tokenizer(captions)
    pixels = preprocessed(("retrieval", seed, BUILTIN_RETRIEVAL_N), images, preprocess)
    image_emb = encode_images(model, tensor_batches(pixels, settings.batch_size), settings, progress)
    text_emb = encode_texts(model, tokens, settings)
    metrics = pair_metrics(image_emb, text_emb, tokens.to(settings.device), _logit_scale(model))
    return {f"builtin/retrieval/{k}": v for k, v in metrics.items()}


def imagefolder_classnames(root: str, folders: Sequence[str]) -> list[str]:
    """`classnames.txt` in the root (one per line, in sorted-folder order) when present; ImageNet's
    names for its 1000 WordNet-id folders; else the folder names, underscores as spaces."""
    listed = os.path.join(root, "classnames.txt")
    if os.path.isfile(listed):
        with open(listed, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"{listed} has {len(names)} names for {len(folders)} class folders")
        return names
    from open_clip import IMAGENET_CLASSNAMES
    if len(folders) == len(IMAGENET_CLASSNAMES) and all(f[0] == "n" and f[1:].isdigit() for f in folders):
        return list(IMAGENET_CLASSNAMES)
    return [f.replace("_", " ") for f in folders]


def evaluate_imagefolder(model, tokenizer, preprocess, root: str, settings: EvalSettings,
                         templates: Sequence | None = None, progress: Progress = None) -> dict[str, float]:
    """Zero-shot top-1/top-5 on a torchvision ImageFolder (open_clip's 80 ImageNet templates by default)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(root, transform=preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers,
                                         shuffle=False)
    classes = zero_shot_classifier(model, tokenizer, imagefolder_classnames(root, dataset.classes),
                                   templates or OPENAI_IMAGENET_TEMPLATES, settings)
    images = encode_images(model, (batch for batch, _ in loader), settings, progress)
    return zero_shot_accuracy(images, classes, torch.tensor(dataset.targets))


# ----------------------------------------------------------------------- validation set, sharded

def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` over ranks along dim 0 (sizes may differ; an empty rank may send any shape)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    shape = torch.tensor(t.shape, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    padded_shape = torch.stack(shapes).amax(dim=0).tolist()
    padded = t.new_zeros(padded_shape)
    padded[tuple(slice(0, s) for s in t.shape)] = t
    parts = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(s[0])] for part, s in zip(parts, shapes)])


def unique_by_key(keys: torch.Tensor) -> torch.Tensor:
    """Indices of the first row of each key, in key order (DistributedSampler pads ranks by repeating
    items; sorting makes the result independent of the number of ranks and of loader order)."""
    order = torch.sort(keys, stable=True).indices
    ordered = keys[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


@torch.no_grad()
def gather_pairs(model, batches: Iterable, settings: EvalSettings) -> tuple[torch.Tensor, ...]:
    """Collective: every rank encodes its shard of (images, texts, keys) batches; every rank gets
    (image_emb, text_emb, tokens, keys) of all ranks, one row per key, sorted by key."""
    columns = ([], [], [], [])  # image_emb, text_emb, tokens, keys
    for images, texts, keys in batches:
        row = (encode_images(model, [images], settings), encode_texts(model, texts, settings),
               texts.to(settings.device), keys.to(settings.device))
        for column, value in zip(columns, row):
            column.append(value)
    # a rank may have had no batch: it sends empty tensors of the right dtype and number of dimensions
    empty = [torch.empty(shape, dtype=dtype, device=settings.device) for shape, dtype in
             (((0, 0), torch.float32), ((0, 0), torch.float32), ((0, 0), torch.long), ((0,), torch.long))]
    gathered = [_gather_rows(torch.cat(column) if column else e) for column, e in zip(columns, empty)]
    keep = unique_by_key(gathered[3])
    return tuple(part[keep] for part in gathered)


# ----------------------------------------------------------------------------- in training

def _due(epoch: int, frequency: int, last_epoch: int) -> bool:
    return frequency > 0 and (epoch % frequency == 0 or epoch == last_epoch)


def builtin_eval_on(args) -> bool:
    """--builtin-eval, by default on only when training on the built-in synthetic data set."""
    asked = getattr(args, "builtin_eval", None)
    return asked if asked is not None else args.dataset_type == "synthetic"


def due_parts(epoch: int, args, has_val: bool) -> tuple[bool, bool]:
    """(zero-shot due, validation due) after epoch `epoch`: due by frequency and something to evaluate."""
    builtin = builtin_eval_on(args)
    return (_due(epoch, args.zeroshot_frequency, args.epochs) and (builtin or bool(args.imagenet_val)),
            _due(epoch, args.val_frequency, args.epochs) and (builtin or has_val))


def evaluation_missing(run_dir: str, epoch: int, args) -> bool:
    """True when an evaluation is due after epoch `epoch` and results.jsonl has no line of it: the launch
    that finished the epoch (and checkpointed it) was killed before its evaluation ended, and nothing else
    would ever run it. Lines with a "step" are the estimation error's, not evaluate's."""
    if epoch < 1 or not any(due_parts(epoch, args, bool(getattr(args, "val_data", None)))):
        return False
    try:
        with open(os.path.join(run_dir, "checkpoints", "results.jsonl"), encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return True
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("epoch") == epoch and "step" not in record:
            return False
    return True


@contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def evaluate(model, data: dict, epoch: int, args, tokenizer, preprocess_val, tb=None, run_dir: str | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict:
    """After epoch `epoch` (1-based): zero-shot every --zeroshot-frequency epochs, retrieval and
    CLIP loss every --val-frequency epochs, both at the last epoch. Call on every rank (the
    validation set is sharded over ranks and gathered); rank 0 returns {"epoch": N, **metrics}, logs
    them, writes them to TensorBoard under eval/ and appends them to checkpoints/results.jsonl;
    the other ranks return {}. When `should_stop()` turns true during rank 0's part, it stops there and
    returns {} without a results line."""
    zero_shot_due, val_due = due_parts(epoch, args, "val" in data)
    if not (zero_shot_due or val_due):
        return {}
    settings, seed, start = EvalSettings.from_args(args), args.synthetic_seed, time.perf_counter()
    with eval_mode(model), torch.no_grad():
        # every rank encodes its shard of the validation set and gathers: no rank may leave early
        val = gather_pairs(model, data["val"].dataloader, settings) if val_due and "val" in data else None
        if not args.is_master:
            return {}
        settings.should_stop = should_stop
        try:
            metrics = _rank_0_metrics(model, tokenizer, preprocess_val, args, settings, seed, zero_shot_due,
                                      val_due, val, epoch)
        except EvaluationStopped:
            log.warning("Eval Epoch: %d stopped by a signal after %.1f s: it runs when the run is launched "
                        "again", epoch, time.perf_counter() - start)
            return {}
    log.info("Eval Epoch: %d (%.1f s%s) %s", epoch, time.perf_counter() - start,
             f", {val[0].shape[0]} val samples" if val is not None else "",
             "\t".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    if tb is not None:
        tb.scalars("eval", metrics, epoch)
        tb.scalars("val", open_clip_val_names(metrics, epoch, val[0].shape[0] if val is not None else None), epoch)
    record = {"epoch": epoch, **metrics}
    if run_dir is not None:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        with open(os.path.join(run_dir, "checkpoints", "results.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _rank_0_metrics(model, tokenizer, preprocess_val, args, settings: EvalSettings, seed: int, zero_shot_due: bool,
                    val_due: bool, val, epoch: int) -> dict:
    metrics, builtin = {}, builtin_eval_on(args)
    if zero_shot_due:
        if builtin:
            metrics |= evaluate_builtin_zero_shot(model, tokenizer, preprocess_val, settings, seed)
        if args.imagenet_val:
            metrics |= {f"imagenet/{k}": v for k, v in
                        evaluate_imagefolder(model, tokenizer, preprocess_val, args.imagenet_val, settings).items()}
    if val_due and builtin:
        metrics |= evaluate_builtin_retrieval(model, tokenizer, preprocess_val, settings, seed)
    if val is not None and val[0].shape[0] == 0:
        log.warning("Eval Epoch: %d: the validation set yielded no samples", epoch)
    elif val is not None:
        metrics |= {f"val/{k}": v for k, v in pair_metrics(*val[:3], _logit_scale(model)).items()}
    return metrics
