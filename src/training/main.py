"""NeuCLIP / FastCLIP / OpenCLIP / SigLIP training, open_clip-style.

Launch recipes (from the repository root):

    # one process, built-in synthetic data, CPU is enough
    PYTHONPATH=src python -u src/training/main.py --fastclip --multiply_tau --npn --epochs 2 ...

    # one node, N processes (gloo on CPU, NCCL on GPUs); '--' keeps torchrun off our --logs
    PYTHONPATH=src torchrun --nproc_per_node N -m training.main -- --train-data 'shards/{00000..00099}.tar' ...

    # slurm: rank/world from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, MASTER_ADDR/PORT from the script
    srun python -u src/training/main.py ...         (see scripts/neuclip_dfn14m.slurm)

The run folder is open_clip's: logs/NAME/{out.log, params.txt, tensorboard/, checkpoints/}.
"""
import logging
import math
import os
import random
import sys

if __package__ in (None, ""):  # `python src/training/main.py`: make `training` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "training"  # noqa: A001

import numpy as np
import open_clip
import torch

import training  # noqa: F401  (registers the project's model configs)
from contrastive import build_method

from .checkpoint import CheckpointManager
from .data import get_data
from .distributed import init_distributed, shutdown, wrap_ddp
from .evaluation import evaluate, write_info_pkl
from .logger import TensorBoard, setup_logging
from .loop import TrainState, train_one_epoch
from .optim import build_optimizer
from .params import default_run_name, parse_args, resolve_precision, schedule_numbers
from .scheduler import LRScheduler

log = logging.getLogger("training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_folder(args) -> str:
    run_dir = os.path.join(args.logs, args.name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if args.is_master:
        if os.path.exists(os.path.join(run_dir, "params.txt")) and not args.resume:
            raise FileExistsError(f"run folder {run_dir} already exists: pass --resume latest to continue "
                                  "it, or choose another --name")
        os.makedirs(ckpt_dir, exist_ok=True)
    return run_dir


def write_params(args, run_dir: str) -> None:
    with open(os.path.join(run_dir, "params.txt"), "w") as f:
        for name in sorted(vars(args)):
            f.write(f"{name}: {getattr(args, name)}\n")


def fill_data_defaults(args) -> None:
    """The built-in synthetic data set when no --train-data is given."""
    if args.train_data is None and args.dataset_type in ("auto", "synthetic"):
        args.dataset_type = "synthetic"
        if args.train_num_samples is None:
            args.train_num_samples = args.synthetic_num_samples
        if args.data_size < 0:
            args.data_size = args.synthetic_num_samples
    elif args.train_data is None:
        raise ValueError(f"--dataset-type {args.dataset_type} needs --train-data")
    if args.uses_per_sample_state and args.data_size < 1:
        raise ValueError("this method keeps per-sample state indexed by sample key: set --data_size to the "
                         "largest key + 1 (for img2dataset shards: number of shards x 10000)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = init_distributed(args.device, args.dist_backend)
    args.rank, args.local_rank, args.world_size = info.rank, info.local_rank, info.world_size
    args.is_master, args.device = info.is_master, str(info.device)
    args.precision = resolve_precision(args, info.device.type)
    args.name = args.name or default_run_name(args)
    fill_data_defaults(args)
    run_dir = prepare_run_folder(args)
    setup_logging(os.path.join(run_dir, "out.log"), args.is_master)

    seed_everything(args.seed)  # same model init on every rank
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        args.model, pretrained=args.pretrained or None, device=info.device,
        precision="bf16" if args.precision == "bf16" else "fp32")
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.no_train_augmentation:
        preprocess_train = preprocess_val
    tokenizer = open_clip.get_tokenizer(args.model)
    method = build_method(args.method, args, model).to(info.device)
    seed_everything(args.seed + args.rank)

    data = get_data(args, preprocess_train, preprocess_val, tokenizer, epoch=0)
    steps_per_epoch = data["train"].num_batches
    numbers = schedule_numbers(args, steps_per_epoch)
    log.info("Run %s (%s): %s", args.name, args.method if args.method != "gcl" else
             f"gcl/{args.estimator}", " ".join(f"{k}={v}" for k, v in numbers.items()))
    log.info("Model %s: %.2fM parameters, precision %s, device %s", args.model,
             sum(p.numel() for p in model.parameters()) / 1e6, args.precision, args.device)

    optimizer = build_optimizer(model, method, args)
    scaler = torch.amp.GradScaler(info.device.type) if args.precision == "amp" else None
    scheduler = LRScheduler(optimizer, args, steps_per_epoch)
    checkpoints = CheckpointManager(os.path.join(run_dir, "checkpoints"), args, args.is_master)

    start_epoch, state = 0, TrainState()
    resume_path = checkpoints.resolve(args.resume)
    if resume_path:
        restored = checkpoints.load(resume_path, model=model, optimizer=optimizer, scaler=scaler,
                                    method=method, device=info.device)
        start_epoch, state.step = restored["epoch"], restored["step"]
        log.info("Resumed from %s at epoch %d, step %d", resume_path, start_epoch, state.step)
    elif args.resume:
        log.info("--resume %s: no checkpoint yet in %s, starting fresh", args.resume, run_dir)
    if args.is_master:
        write_params(args, run_dir)

    ddp_model = wrap_ddp(model, info)
    if args.torchcompile:
        ddp_model = torch.compile(ddp_model)
    tb = TensorBoard(os.path.join(run_dir, "tensorboard")
                     if args.is_master and "tensorboard" in (args.report_to or "") else None)
    last_epoch = args.epochs if args.stop_epochs < 0 else min(args.epochs, args.stop_epochs)
    results = {}
    for epoch in range(start_epoch, last_epoch):
        data["train"].set_epoch(epoch)
        method.on_epoch_start(epoch)
        train_one_epoch(model=ddp_model, method=method, data=data["train"], optimizer=optimizer,
                        scaler=scaler, scheduler=scheduler, state=state, epoch=epoch, args=args,
                        device=info.device, tb=tb)
        completed = epoch + 1
        written = checkpoints.save(completed, step=state.step, model=model, optimizer=optimizer, scaler=scaler,
                                   method=method, data_position={"epoch": completed, "batch": 0})
        if written:  # upstream DataComp finds the checkpoint through info.pkl
            write_info_pkl(run_dir, args.model, written[-1])
        results = evaluate(model, data, completed, args, tokenizer, preprocess_val, tb, run_dir) or results
    tb.close()
    log.info("Done: %d steps; run folder %s", state.step, os.path.abspath(run_dir))
    summary = {"run_dir": run_dir, "step": state.step, "history": state.history,
               "skipped_nonfinite": state.skipped_nonfinite, "results": results}
    shutdown()
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
