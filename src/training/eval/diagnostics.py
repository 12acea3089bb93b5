"""The standalone command of the normalizer estimation-error diagnostic (`training.eval.estimation_error`).

    PYTHONPATH=src python -m training.eval.diagnostics --train_output_dir logs/NAME [--epoch N | --iter N] ...

rebuilds a run's flags from its params.txt (`run_args`), restores its model and method from a checkpoint
(`load_run`), measures `diagnostics.estimation_error` on the reference set and writes
eval_results/{epoch_N|iter_N}_estimation_error.json. `python -m training.eval.diagnostics` runs `main`.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import time

import open_clip
import torch

from contrastive import build_method, registry

from training.batching import global_batch
from training.eval import estimation_error as diag
from training.eval.evaluate import read_params, resolve_checkpoint, result_name
from training.params import build_parser

log = logging.getLogger("training.eval.diagnostics")


def run_args(run_dir: str) -> argparse.Namespace:
    """The training flags of a run folder, rebuilt from its params.txt (every attribute main() had, with its
    type: parser defaults, overlaid with params.txt's values converted as the parser would; attributes main()
    adds, e.g. world_size or method, by their literal)."""
    params = read_params(run_dir)
    if not params:
        raise FileNotFoundError(f"no params.txt in {run_dir}: is it a run folder?")
    parser = build_parser()
    args = parser.parse_args([])
    actions = {action.dest: action for action in parser._actions}
    for name, text in params.items():
        setattr(args, name, _param_value(text, actions.get(name)))
    return args


def _param_value(text: str, action):
    """params.txt's str(value) back to the value."""
    if text == "None":
        return None
    if action is None:  # set by main(), not a flag
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    if action.nargs == 0:  # store_true / store_false
        return text == "True"
    if isinstance(action.default, dict):  # KEY=VALUE flags (--aug-cfg) store a dict: its repr is a literal
        return ast.literal_eval(text)
    convert = action.type or str
    if action.nargs not in (None, "?"):  # a list of values
        return [convert(item) for item in ast.literal_eval(text)]
    return convert(text)


def load_run(run_dir: str, checkpoint: str, args, device: torch.device):
    """(model, method, preprocess_val, tokenizer, checkpoint dict) restored as main() restores them: the method
    is built from the flags first (it may initialise the model's temperature), then both load their state."""
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        args.model, device=device, precision="bf16" if args.precision == "bf16" else "fp32")
    tokenizer = open_clip.get_tokenizer(args.model)
    method = build_method(args.method, args, model).to(device)
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state_dict = ckpt.get("state_dict", ckpt)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state_dict.items()})
    if "method" in ckpt and ckpt.get("method_name", args.method) == args.method:
        method.load_state_dict(ckpt["method"])
        method.to(device)
    else:
        log.warning("%s holds no state of method %s: its estimates are those of a freshly built method",
                    checkpoint, args.method)
    return model, method, preprocess_val, tokenizer, ckpt


def build_cli() -> argparse.ArgumentParser:
    # `python -m training.eval.diagnostics --help` shows the diagnostic's own docstring, as it did before the split
    p = argparse.ArgumentParser(prog="training.eval.diagnostics", description=diag.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(name: str, **kwargs):  # the DataComp fork's underscore spelling, and the dashed one
        p.add_argument(name, *([name.replace("_", "-")] if "_" in name else []), **kwargs)

    add("--train_output_dir", required=True, help="run folder (with checkpoints/ and params.txt)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--epoch", type=int, default=None, help="checkpoints/epoch_N.pt")
    which.add_argument("--iter", type=int, default=None, help="checkpoints/iter_N.pt")
    add("--samples", type=int, default=None, help="reference samples R (default: the run's --est-err-samples)")
    add("--chunk_size", type=int, default=None,
        help="batch size of mini-batch estimates (default: the run's global batch)")
    add("--train_data", default=None, help="the run's --train-data where it has moved since (default: params.txt's)")
    add("--device", default=None, help="default: cuda if available, else cpu")
    add("--precision", default=None, choices=["fp32", "amp", "amp_bf16", "bf16"],
        help="default: amp on CUDA, fp32 on CPU")
    add("--output_dir", default=None, help="where eval_results/ goes (default: --train_output_dir)")
    return p


def main(argv=None) -> dict:
    opts = build_cli().parse_args(argv)
    run_dir = opts.train_output_dir
    args = run_args(run_dir)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device, args.rank, args.is_master = str(device), 0, True
    args.precision = opts.precision or ("amp" if device.type == "cuda" else "fp32")
    if opts.train_data:
        args.train_data = opts.train_data
    checkpoint = resolve_checkpoint(run_dir, opts.epoch, opts.iter)
    name = result_name(checkpoint, opts.iter)
    model, method, preprocess_val, tokenizer, ckpt = load_run(run_dir, checkpoint, args, device)

    samples = opts.samples or getattr(args, "est_err_samples", diag.DEFAULT_SAMPLES)
    reference = diag.reference_set(args, preprocess_val, tokenizer, samples)
    chunk = opts.chunk_size or global_batch(args)
    step, epoch = int(ckpt.get("step", 0)), ckpt.get("epoch", 0)
    start = time.perf_counter()
    metrics = diag.estimation_error(model, method, reference, args, device, step=step, batch_size=chunk)
    record = {"checkpoint": os.path.abspath(checkpoint), "method": args.method,
              "estimator": registry.estimator_name(args), "step": step, "epoch": epoch,
              "samples_seen": step * global_batch(args), **metrics,
              "est_err_samples": len(reference), "est_err_batch": chunk}
    out_dir = os.path.join(opts.output_dir or run_dir, "eval_results")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, f"{name}_estimation_error.json")
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print(f"{checkpoint}: {len(reference)} reference samples, batches of {chunk} "
          f"({time.perf_counter() - start:.1f} s)")
    print("\n".join(f"  {k:<16}{v:.6g}" for k, v in metrics.items()))
    print(f"written to {out_path}")
    return record



if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s | %(message)s", stream=sys.stderr)
    from training.startup import quiet  # open_clip's INFO lines and its "initialized randomly" (weights load next)
    quiet.install(verbose=False)
    main()
