"""Portable checkpoints: a run's model as a folder plain open_clip loads, without this project.

    PYTHONPATH=src python -m training.export --train_output_dir logs/NAME [--epoch N | --iter N] --out DIR

DIR gets what open_clip 3.3's `local-dir:` schema reads (`open_clip.create_model_and_transforms('local-dir:DIR')`,
`open_clip.get_tokenizer('local-dir:DIR')`): `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}, the
layout of open_clip's hub folders) and the weights as `open_clip_model.safetensors`. The model config is
the run folder's own `open_clip_config.json`, written at start-up by the trainer, so architectures that
exist only in this project (`neuclip-tiny`) or only in the training process (a config registered with
`open_clip.add_model_config`) still export. Without --epoch/--iter the checkpoint is the evaluator's
default (epoch_latest.pt, else the highest epoch_N.pt).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import open_clip
import torch

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def model_config(model_name: str, *, force_quick_gelu: bool = False, force_custom_text: bool = False,
                 force_patch_dropout: float | None = None, force_image_size=None,
                 force_context_length: int | None = None) -> dict:
    """The architecture's open_clip config with the --force-* overrides applied the way
    open_clip.create_model applies them, so the exported config builds the model that was trained."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"--model {model_name}: no such open_clip model config (open_clip.list_models() "
                         "lists them; add your own with open_clip.add_model_config)")
    cfg = copy.deepcopy(cfg)
    if force_quick_gelu:
        cfg["quick_gelu"] = True
    if force_custom_text:
        cfg["custom_text"] = True
    if force_patch_dropout is not None:
        cfg["vision_cfg"]["patch_dropout"] = force_patch_dropout
    if force_image_size is not None:
        cfg["vision_cfg"]["image_size"] = force_image_size
    if force_context_length is not None:
        cfg["text_cfg"]["context_length"] = force_context_length
    return cfg


def config_from_args(args, model: torch.nn.Module) -> dict:
    """{"model_cfg", "preprocess_cfg"} of the model the trainer built from its flags."""
    from training.interop.model_setup import create_kwargs
    kwargs = create_kwargs(args)
    model_cfg = model_config(args.model, **{name: kwargs[name] for name in (
        "force_quick_gelu", "force_custom_text", "force_patch_dropout", "force_image_size", "force_context_length")})
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return {"model_cfg": model_cfg, "preprocess_cfg": json.loads(json.dumps(preprocess_cfg, default=list))}


def write_config(folder: str, config: dict) -> str:
    path = os.path.join(folder, CONFIG_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (run folders written before it existed): pass --arch NAME "
                                "to build it from open_clip's config of that name")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def export(run_dir: str, out: str, *, epoch: int | None = None, iteration: int | None = None,
           arch: str | None = None) -> str:
    """Writes the export folder; returns the checkpoint it came from."""
    from safetensors.torch import save_file  # open_clip_torch depends on it

    from training.eval.evaluate import resolve_checkpoint  # heavy: only when exporting

    if arch:
        import training  # noqa: F401  (registers this project's configs, for --arch neuclip-tiny)
        model, _, _ = open_clip.create_model_and_transforms(arch)
        config = {"model_cfg": model_config(arch),
                  "preprocess_cfg": json.loads(json.dumps(dict(open_clip.get_model_preprocess_cfg(model)),
                                                          default=list))}
    else:
        config = read_run_config(run_dir)
    checkpoint = resolve_checkpoint(run_dir, epoch, iteration)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # Own storage per tensor: safetensors refuses tensors that share memory.
    weights = {k.removeprefix("module."): v.detach().clone().contiguous() for k, v in ckpt["state_dict"].items()}
    os.makedirs(out, exist_ok=True)
    save_file(weights, os.path.join(out, WEIGHTS_NAME), metadata={"source": os.path.abspath(checkpoint)})
    write_config(out, config)
    return checkpoint



def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="training.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_output_dir", "--train-output-dir", required=True, help="run folder")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=int, default=None, help="export checkpoints/epoch_N.pt")
    which.add_argument("--iter", type=int, default=None, help="export checkpoints/iter_N.pt")
    p.add_argument("--arch", default=None, help="architecture, for run folders without open_clip_config.json")
    p.add_argument("--out", required=True, help="folder to write (open_clip's local-dir: layout)")
    args = p.parse_args(argv)
    try:
        checkpoint = export(args.train_output_dir, args.out, epoch=args.epoch, iteration=args.iter, arch=args.arch)
    except (FileNotFoundError, ValueError) as exc:
        p.error(str(exc))
    print(f"{checkpoint} -> {os.path.abspath(args.out)}: open_clip.create_model_and_transforms("
          f"'local-dir:{args.out}')")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
