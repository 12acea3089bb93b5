"""NeuCLIP / FastCLIP / OpenCLIP / SigLIP training, open_clip-style.

Launch recipes (from the repository root):

    # one process, built-in synthetic data, CPU is enough
    PYTHONPATH=src python -u src/training/main.py --fastclip --multiply_tau --npn --epochs 2 ...

    # one node, N processes (gloo on CPU, NCCL on GPUs); '--' keeps torchrun off our --logs
    PYTHONPATH=src torchrun --nproc_per_node N -m training.main -- --train-data 'shards/{00000..00099}.tar' ...

    # slurm: rank/world from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS, MASTER_ADDR/PORT from the script
    srun python -u src/training/main.py ...         (see scripts/slurm/neuclip_dfn14m.sh)

The run folder is open_clip's: logs/NAME/{out.log, params.txt, tensorboard/, checkpoints/}. Launching
the same command with the same --name resumes from the folder's newest valid checkpoint (--no-auto-resume
refuses instead); the default --name is timestamped, so a new run never lands in an old run's folder.
SIGTERM/SIGUSR1 write a checkpoint and exit with status 75, Ctrl-C with 130 (training.preemption); faults
and what each gives: docs/FAULTS.md. Mistakes in the flags print one line and exit with status 2
(training.errors, training.startup.cli).
"""
import argparse
import logging
import os
import random
import sys

if __package__ in (None, ""):  # `python src/training/main.py`: make `training` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "training"  # noqa: A001

from training.params import parse_args  # noqa: E402  (argparse only)
from training.startup.cli import parse_quietly_off_rank_0, quiet_interrupt_while_importing  # noqa: E402

if __name__ == "__main__":  # --help and flag errors answer before torch is imported (seconds, more under load)
    quiet_interrupt_while_importing()  # main() installs the run's own handlers (training.preemption)
    parse_quietly_off_rank_0(parse_args, sys.argv[1:])

import warnings  # noqa: E402
from dataclasses import dataclass

import numpy as np
import open_clip
import torch

import training
from contrastive import build_method, registry

from training.checkpoint import CheckpointManager
from training.checkpoint.resume import resume
from training.data.loader import get_data
from training.distributed import (broadcast_object, init_distributed, is_distributed, report_failure, shutdown,
                                  wrap_ddp)
from training.elastic import elastic_range_refusal
from training.errors import UserError, is_user_error
from training.eval.estimation_error import EstimationErrorMonitor
from training.eval.evaluation import evaluate, evaluation_missing
from training.export import config_from_args, write_config
from training.eval.datacomp_info import write_info_pkl
from training.interop.model_setup import apply_model_flags, create_kwargs
from training.interop.open_clip_flags import apply_logging_flags
from training.interop.remote_sync import RemoteSync
from training.interop.reporting import build_reporters
from training.logger import TrainingLog, record_in_log_files, setup_logging
from training.loop import train_one_epoch
from training.observers import EstimationErrorSteps
from training.optim import build_optimizer
from training.params import parse_args, resolve_precision, schedule_numbers
from training.preemption import Preempted, StepCheckpoints, StopSignals
from training.scheduler import LRScheduler
from training.train_state import TrainState
from training import progress
from training.startup import quiet, schedule_checks
from training.startup.cli import run_cli
from training.startup.data_defaults import fill_data_defaults
from training.startup.input_checks import check_global_batch, check_shard_keys
from training.startup.run_folder import announce_resume, changed_params, prepare_run_folder, write_params
from training.startup.run_name import choose_run_name
from training.startup.preflight import check_before_run_folder
from training.startup.run_lock import die_with_launcher, release_run_folder
from training.startup.threads import apply_thread_policy

training.register_model_configs()

log = logging.getLogger("training")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv=None) -> dict:
    """Train; returns a summary. Raises Preempted (SystemExit(75), 130 for Ctrl-C) after a signal's checkpoint."""
    args = parse_args(argv)
    die_with_launcher()  # torchrun's workers are in sessions of their own: no orphans if the agent dies
    refusal = elastic_range_refusal()
    if refusal:
        raise UserError(refusal)
    info = init_distributed(args.device, args.dist_backend, args.dist_timeout_minutes)
    signals = StopSignals(argv).install()  # before anything slow: a signal during start-up stops at step 1
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():  # quiet.install's warning filters end with the run
            quiet.install(args.verbose)
            return train(args, info, signals)
    except Exception as exc:  # not Preempted: a SystemExit
        reason = f"run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if is_user_error(exc):  # the same on every rank, said once on the console by run_cli
            if not is_distributed():  # one process: the reason belongs in out.log too
                record_in_log_files(logging.ERROR, reason)
        else:
            report_failure(exc)  # distributed runs: names the ranks that failed, and how
            if not is_distributed():
                log.error("%s", reason)
        raise
    finally:
        signals.restore()
        release_run_folder()
        progress.close_all()  # after an exception too: console logging leaves the bar
        torch.set_num_threads(threads)  # the thread policy is this run's, not the calling process's


def train(args, info, signals: StopSignals) -> dict:
    """One run, in the order its side effects happen (tests read out.log and stdout in this order)."""
    run_dir, previous, thread_line = open_run(args, info)
    run = build_model_and_method(args, info, run_dir)
    build_data(run, thread_line)
    build_optimization(run)
    state = TrainState()
    start_epoch, start_batch = resume(run.checkpoints, state, args, run.steps_per_epoch, run_dir, info.device,
                                      lambda: changed_params(args, previous))
    remote = record_params(args, run_dir)
    results, control = train_epochs(run, state, start_epoch, start_batch, signals)
    return finish(run, state, results, control, remote)


def open_run(args, info) -> tuple[str, dict, str]:
    """The flags completed and checked (a refused start leaves no run folder), then the run folder and its
    logging. Returns the folder, its previous params.txt and the thread policy's log line."""
    args.rank, args.local_rank, args.world_size = info.rank, info.local_rank, info.world_size
    args.is_master, args.device = info.is_master, str(info.device)
    try:
        args.precision = resolve_precision(args, info.device.type)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    choose_run_name(args)  # a requeued slurm job or a torchrun restart finds its run folder again
    fill_data_defaults(args)
    schedule_checks.check_data_size(args)
    check_global_batch(args)
    check_before_run_folder(args)  # model name, data paths, --logs: a refused start leaves no run folder
    check_shard_keys(args)
    run_dir, previous = prepare_run_folder(args)
    setup_logging(os.path.join(run_dir, "out.log"), args.is_master)
    apply_logging_flags(args, run_dir)
    quiet.install(args.verbose)
    thread_line = apply_thread_policy(args)
    announce_resume(args, run_dir, previous)
    return run_dir, previous, thread_line


@dataclass
class Run:
    """What a run is built from; filled in the order main.train builds it."""
    args: object
    info: object
    run_dir: str
    model: torch.nn.Module
    method: torch.nn.Module
    tokenizer: object
    preprocess_train: object
    preprocess_val: object
    data: dict | None = None
    steps_per_epoch: int = 0
    global_batch: int = 0
    optimizer: object = None
    scaler: object = None
    scheduler: object = None
    checkpoints: CheckpointManager | None = None


def build_model_and_method(args, info, run_dir: str) -> Run:
    """The model (the same initial weights on every rank), its tokenizer and transforms, and the method;
    then each rank's own random streams."""
    seed_everything(args.seed)  # same model init on every rank
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        args.model, device=info.device, **create_kwargs(args))
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    if args.no_train_augmentation:
        preprocess_train = preprocess_val
    tokenizer = open_clip.get_tokenizer(args.model, context_length=args.force_context_length)
    if args.is_master:  # the model config travels with the run: training.export, open_clip's local-dir:
        write_config(run_dir, config_from_args(args, model))
    method = build_method(args.method, args, model).to(info.device)
    apply_model_flags(model, method, args)
    seed_everything(args.seed + args.rank)
    return Run(args, info, run_dir, model, method, tokenizer, preprocess_train, preprocess_val)


def build_data(run: Run, thread_line: str) -> None:
    """The data loaders and the schedule they give; logs the run's and the model's summary lines."""
    args, model = run.args, run.model
    # With --accum-freq k the loader yields whole steps (k micro-batches); the loop splits them.
    data_args = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size * args.accum_freq})
    run.data = get_data(data_args, run.preprocess_train, run.preprocess_val, run.tokenizer, epoch=0)
    run.steps_per_epoch = run.data["train"].num_batches
    schedule_checks.check_steps(args, run.steps_per_epoch)
    numbers = schedule_numbers(args, run.steps_per_epoch)
    run.global_batch = numbers["global_batch"]
    log.info("Run %s (%s): %s", args.name, registry.description(args),
             " ".join(f"{k}={v}" for k, v in numbers.items()))
    log.info("Model %s: %.2fM parameters, precision %s, device %s, %s, --workers %d", args.model,
             sum(p.numel() for p in model.parameters()) / 1e6, args.precision, args.device, thread_line,
             args.workers)


def build_optimization(run: Run) -> None:
    """Optimizer, loss scaler, schedules, and the checkpoints that hold them with everything else."""
    args, device = run.args, run.info.device
    run.optimizer = build_optimizer(run.model, run.method, args)
    run.scaler = torch.amp.GradScaler(device.type) if args.precision == "amp" else None
    run.scheduler = LRScheduler(run.optimizer, args, run.steps_per_epoch)
    run.checkpoints = CheckpointManager(os.path.join(run.run_dir, "checkpoints"), args, args.is_master,
                                        model=run.model, optimizer=run.optimizer, scaler=run.scaler,
                                        method=run.method)


def record_params(args, run_dir: str) -> RemoteSync | None:
    """params.txt (after the resume: a refused resume leaves the run's own), then --remote-sync's first
    sync; returns the sync (None without --remote-sync)."""
    if args.is_master:
        write_params(args, run_dir)
    return RemoteSync.start(args, run_dir)


def train_epochs(run: Run, state: TrainState, start_epoch: int, start_batch: int, signals: StopSignals):
    """The epochs from the resume position on, each followed by its checkpoint and evaluation (and an
    evaluation a previous launch left unfinished, first). Returns the last evaluation's results and the
    step control, which knows whether a signal stopped the run."""
    args, info, run_dir, data, tokenizer = run.args, run.info, run.run_dir, run.data, run.tokenizer
    model, method, checkpoints, preprocess_val = run.model, run.method, run.checkpoints, run.preprocess_val
    optimizer, scaler, scheduler, steps_per_epoch = run.optimizer, run.scaler, run.scheduler, run.steps_per_epoch
    ddp_model = wrap_ddp(model, info)
    if args.torchcompile:
        ddp_model = torch.compile(ddp_model)
    tb = build_reporters(args, run_dir, purge_step=state.step or None)  # TensorBoard and/or wandb
    diagnostics = EstimationErrorMonitor.from_args(args, preprocess_val, tokenizer, info.device, tb, run_dir)
    control = StepCheckpoints(args, signals, lambda position: checkpoints.save_iter(state, position), info.device)
    last_epoch = args.epochs if args.stop_epochs < 0 else min(args.epochs, args.stop_epochs)
    schedule_checks.warn_if_complete(args, start_epoch, last_epoch)
    results, stopped_in_eval = {}, False
    stop_requested = lambda: signals.code != 0  # noqa: E731  (evaluation checks it between batches)
    if start_batch == 0 and broadcast_object(args.is_master and evaluation_missing(run_dir, start_epoch, args)):
        log.info("epoch %d's evaluation is missing from results.jsonl (the previous launch stopped during it): "
                 "evaluating before training on", start_epoch)
        results = evaluate(model, data, start_epoch, args, tokenizer, preprocess_val, tb, run_dir,
                           stop_requested) or results
        stopped_in_eval = broadcast_object(bool(signals.code)) and control.at_epoch_end(state.step, start_epoch)
    bar = progress.start(args, total_steps=steps_per_epoch * last_epoch, start_step=state.step,
                         samples_per_step=run.global_batch)
    for epoch in range(start_epoch, start_epoch if stopped_in_eval else last_epoch):
        data["train"].set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        method.on_epoch_start(epoch)
        if train_one_epoch(model=ddp_model, method=method, data=data["train"], optimizer=optimizer,
                           scaler=scaler, scheduler=scheduler, state=state, epoch=epoch, args=args,
                           device=info.device,
                           observers=[TrainingLog(state, model, method, data["train"], tb, args),
                                      EstimationErrorSteps(diagnostics, model, method), bar, control]):
            break
        completed = epoch + 1
        written = checkpoints.save_epoch(completed, state)
        if written:  # upstream DataComp finds the checkpoint through info.pkl
            write_info_pkl(run_dir, args.model, written[-1])
        results = evaluate(model, data, completed, args, tokenizer, preprocess_val, tb, run_dir,
                           stop_requested) or results
        # after the last epoch too when rank 0 was signalled: its evaluation may have stopped part-way
        if (completed < last_epoch or broadcast_object(bool(signals.code))) \
                and control.at_epoch_end(state.step, completed):
            break
    progress.close_all()
    tb.close()
    return results, control


def finish(run: Run, state: TrainState, results: dict, control, remote) -> dict:
    """The run's summary; or Preempted when a signal stopped it (after the final sync and, under slurm, the
    requeue)."""
    if control.stopped_at:
        if remote is not None:
            remote.close()  # the final sync: the preemption's checkpoint too
        shutdown()
        control.requeue_if_due()
        raise Preempted(*control.stopped_at, exit_code=control.exit_code, signal_name=control.stop_signal)
    log.info("Done: %d steps; run folder %s", state.step, os.path.abspath(run.run_dir))
    if remote is not None:
        remote.close()  # the final sync, after the last line of out.log
    summary = {"run_dir": run.run_dir, "step": state.step, "history": state.history,
               "skipped_nonfinite": state.skipped_nonfinite, "results": results}
    shutdown()
    return summary


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
