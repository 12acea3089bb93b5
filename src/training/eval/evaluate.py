"""Evaluate a saved checkpoint of a run folder, with the DataComp fork's command line.

    PYTHONPATH=src python -m training.eval.evaluate --train_output_dir logs/NAME [--epoch N | --iter N]
        [--arch ARCH] [--data_dir DIR] [--tasks builtin,imagenet] [--imagenet_val PATH] [--batch_size 256]

Loads DIR/checkpoints/epoch_N.pt, iter_N.pt, or by default epoch_latest.pt (else the highest
epoch_N.pt) with `open_clip.create_model_and_transforms(arch, pretrained=path)`; the architecture
comes from --arch or from the `model: ...` line of DIR/params.txt. Writes
DIR/eval_results/epoch_N_builtin_eval_results.jsonl (N: the checkpoint's "epoch"; iter_N_... for --iter:
a name of its own, so the DataComp fork's epoch_N_eval_results.jsonl in the same folder is never touched),
one DataComp-style line per data set, {"key", "dataset", "metrics": {..., "main_metric"}}, where
"{key}/{metric}" are the keys of checkpoints/results.jsonl written during training; refreshes
DIR/info.pkl for upstream DataComp; prints a table.

Tasks: `builtin` (the synthetic data set's held-out classification tasks and retrieval split: no
download) and `imagenet` (zero-shot on an ImageFolder: --imagenet_val, else DATA_DIR/imagenet/val
or DATA_DIR/imagenet; class names from its classnames.txt, ImageNet's names for WordNet-id
folders, else the folder names). Default: builtin, plus imagenet when such a folder is found.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import re
import sys

import open_clip
import torch
from tqdm import tqdm

import training  # noqa: F401  (registers the project's model configs)

from training.eval.evaluation import (
    EvalSettings, builtin_image_count, evaluate_builtin_retrieval, evaluate_builtin_zero_shot,
    evaluate_imagefolder,
)
from training.eval.datacomp_info import write_info_pkl

TASKS = ("builtin", "imagenet")
DATASET_NAMES = {"builtin": "built-in synthetic shapes (mean of the classification tasks)",
                 "builtin/retrieval": "built-in synthetic shapes: image-text retrieval",
                 "builtin/relation": "built-in synthetic shapes: relation (each image's own 4 captions)",
                 "imagenet": "ImageFolder zero-shot (--imagenet_val)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="training.eval.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, **kwargs):  # the fork's underscore spelling, and the dashed one
        p.add_argument(name, *([name.replace("_", "-")] if "_" in name else []), **kwargs)

    add("--train_output_dir", required=True, help="run folder (with checkpoints/ and params.txt)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=int, default=None, help="evaluate checkpoints/epoch_N.pt")
    which.add_argument("--iter", type=int, default=None, help="evaluate checkpoints/iter_N.pt")
    add("--arch", default=None, help="open_clip architecture (default: params.txt's model)")
    add("--data_dir", default=None, help="root of local evaluation data sets (imagenet/val)")
    add("--tasks", default=None, help=f"comma-separated, from {','.join(TASKS)}")
    add("--imagenet_val", default=None, help="ImageFolder for zero-shot classification")
    add("--templates", default="openai", choices=["openai", "simple"],
        help="ImageFolder prompts: open_clip's 80 OpenAI ImageNet templates, or its 7-template subset")
    add("--batch_size", type=int, default=256)
    add("--workers", type=int, default=4, help="data loader workers for ImageFolder sets")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--precision", default=None, choices=["fp32", "amp", "amp_bf16", "bf16"],
        help="default: amp on CUDA, fp32 on CPU")
    add("--synthetic_seed", type=int, default=None, help="built-in tasks' seed (default: params.txt's, else 0)")
    add("--output_dir", default=None, help="where eval_results/ goes (default: --train_output_dir)")
    return p


def read_params(run_dir: str) -> dict[str, str]:
    """params.txt's `name: value` lines (empty when there is none)."""
    path = os.path.join(run_dir, "params.txt")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)


def resolve_checkpoint(run_dir: str, epoch: int | None = None, iteration: int | None = None) -> str:
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if epoch is not None or iteration is not None:
        path = os.path.join(ckpt_dir, f"epoch_{epoch}.pt" if epoch is not None else f"iter_{iteration}.pt")
        if not os.path.isfile(path):
            have = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt_dir, "*.pt")))
            raise FileNotFoundError(f"no checkpoint {path}; {ckpt_dir} has: {', '.join(have) or 'nothing'}")
        return path
    latest = os.path.join(ckpt_dir, "epoch_latest.pt")
    if os.path.isfile(latest):
        return latest
    numbered = {int(m.group(1)): p for p in glob.glob(os.path.join(ckpt_dir, "epoch_*.pt"))
                if (m := re.search(r"epoch_(\d+)\.pt$", p))}
    if not numbered:
        raise FileNotFoundError(f"no epoch_latest.pt or epoch_N.pt in {ckpt_dir}")
    return numbered[max(numbered)]


def result_name(checkpoint: str, iteration: int | None) -> str:
    """iter_N for --iter; else epoch_N, N the checkpoint's "epoch" (the fork's naming)."""
    if iteration is not None:
        return f"iter_{iteration}"
    try:  # mmap: reads the one key, not the optimizer state
        epoch = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except (RuntimeError, AttributeError, pickle.UnpicklingError):
        epoch = None
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    return f"epoch_{epoch}" if isinstance(epoch, int) else stem


def resolve_imagenet(args) -> str | None:
    if args.imagenet_val:
        return args.imagenet_val
    if args.data_dir:
        for candidate in (os.path.join(args.data_dir, "imagenet", "val"), os.path.join(args.data_dir, "imagenet")):
            if os.path.isdir(candidate):
                return candidate
    return None


def dataset_name(key: str) -> str:
    if key in DATASET_NAMES:
        return DATASET_NAMES[key]
    if key.startswith("builtin/"):
        return f"built-in synthetic shapes: {key.removeprefix('builtin/')} (zero-shot)"
    return key


def group_lines(metrics: dict[str, float]) -> list[dict]:
    """Flat "{key}/{metric}" results -> one DataComp-style line per key, with its main_metric."""
    groups: dict[str, dict] = {}
    for name, value in metrics.items():
        key, metric = name.rsplit("/", 1)
        groups.setdefault(key, {})[metric] = value
    lines = []
    for key, values in groups.items():
        if "top1" in values or "mean_top1" in values:
            main = values.get("top1", values.get("mean_top1"))
        elif "image_to_text_R@1" in values:  # retrieval: DataComp's mean of the two recall@1
            main = (values["image_to_text_R@1"] + values["text_to_image_R@1"]) / 2
        else:
            main = next(iter(values.values()))
        lines.append({"key": key, "dataset": dataset_name(key), "metrics": {**values, "main_metric": main}})
    return lines


def format_table(lines: list[dict]) -> str:
    width = max(len(line["key"]) for line in lines)
    rows = [f"{'key':<{width}}  main    metrics"]
    for line in lines:
        others = "  ".join(f"{k} {v:.4f}" for k, v in line["metrics"].items() if k != "main_metric")
        rows.append(f"{line['key']:<{width}}  {line['metrics']['main_metric']:.4f}  {others}")
    return "\n".join(rows)


def main(argv=None) -> dict[str, float]:
    parser = build_parser()
    args = parser.parse_args(argv)
    run_dir = args.train_output_dir
    params = read_params(run_dir)
    arch = args.arch or params.get("model")
    if not arch:
        parser.error(f"no --arch and no 'model: ...' line in {os.path.join(run_dir, 'params.txt')}")
    tasks = args.tasks.split(",") if args.tasks else ["builtin", "imagenet"]
    imagenet = resolve_imagenet(args) if "imagenet" in tasks else None
    if args.tasks is None and imagenet is None:
        tasks.remove("imagenet")
    for task in tasks:
        if task not in TASKS:
            parser.error(f"unknown task {task!r}: choose from {','.join(TASKS)}")
    if "imagenet" in tasks and imagenet is None:
        parser.error("task imagenet needs --imagenet_val, or --data_dir with imagenet/val in it")
    checkpoint = resolve_checkpoint(run_dir, args.epoch, args.iter)
    name = result_name(checkpoint, args.iter)
    seed = args.synthetic_seed if args.synthetic_seed is not None else int(params.get("synthetic_seed", 0))

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("amp" if device.type == "cuda" else "fp32")
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=checkpoint, device=device, precision="bf16" if precision == "bf16" else "fp32")
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    settings = EvalSettings(device, precision, args.batch_size, args.workers)
    write_info_pkl(run_dir, arch, checkpoint)

    total = builtin_image_count() if "builtin" in tasks else 0
    if imagenet:
        from torchvision.datasets import ImageFolder
        total += len(ImageFolder(imagenet).samples)
    templates = open_clip.SIMPLE_IMAGENET_TEMPLATES if args.templates == "simple" else None
    metrics: dict[str, float] = {}
    with torch.no_grad(), tqdm(total=total, unit="img", desc=f"{arch} {name}", file=sys.stderr) as bar:
        if "builtin" in tasks:
            metrics |= evaluate_builtin_zero_shot(model, tokenizer, preprocess, settings, seed, bar.update)
            metrics |= evaluate_builtin_retrieval(model, tokenizer, preprocess, settings, seed, bar.update)
        if imagenet:
            metrics |= {f"imagenet/{k}": v for k, v in
                        evaluate_imagefolder(model, tokenizer, preprocess, imagenet, settings, templates,
                                             progress=bar.update).items()}

    lines = group_lines(metrics)
    out_dir = os.path.join(args.output_dir or run_dir, "eval_results")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, results_file_name(name))
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    print(f"{checkpoint} ({arch})\n{format_table(lines)}\nwritten to {out_path}")
    return metrics


def results_file_name(checkpoint_name: str) -> str:
    """Ours, never the DataComp fork's `{checkpoint_name}_eval_results.jsonl` (which it writes beside)."""
    return f"{checkpoint_name}_builtin_eval_results.jsonl"


if __name__ == "__main__":
    main()
