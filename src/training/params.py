"""Command-line flags: open_clip's training flags plus the FastCLIP / NeuCLIP family's.

Flag spellings follow the two references (open_clip uses dashes, FastCLIP and NeuCLIP underscores);
each FastCLIP/NeuCLIP flag also accepts the dashed spelling. Everything that does not fit together
fails here, before any process group or data loader exists.
"""
import argparse
import math
import os
from datetime import datetime

from contrastive import registry
from contrastive.registry import both_spellings as _both

from training.batching import global_batch
from training.startup.threads import default_workers

from training.interop.open_clip_flags import add_open_clip_flags, validate_open_clip_flags

PRECISIONS = ("auto", "fp32", "bf16", "amp", "amp_bf16", "amp_bfloat16", "fp16", "pure_bf16", "pure_fp16")
SYNTHETIC_DEFAULT_SAMPLES = 20000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="training.main", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--train-data", default=None,
                      help="webdataset shards with brace expansion ('a/{000..099}.tar', '::' joins "
                           "several), or a CSV; omitted: the built-in synthetic shapes data set")
    data.add_argument("--train-num-samples", type=int, default=None, help="samples per epoch")
    data.add_argument("--val-data", default=None)
    data.add_argument("--val-num-samples", type=int, default=None)
    data.add_argument("--dataset-type", default="auto", choices=["auto", "webdataset", "csv", "synthetic"])
    data.add_argument("--dataset-resampled", action="store_true", help="sample shards with replacement")
    data.add_argument("--csv-separator", default="\t")
    data.add_argument("--csv-img-key", default="filepath")
    data.add_argument("--csv-caption-key", default="title")
    data.add_argument("--synthetic-num-samples", type=int, default=None,
                      help="size of the built-in synthetic data set (default: --train-num-samples, as "
                           f"open_clip's synthetic data set, else {SYNTHETIC_DEFAULT_SAMPLES})")
    data.add_argument("--synthetic-seed", type=int, default=0)
    data.add_argument("--imagenet-val", default=None, help="ImageFolder for zero-shot evaluation")
    data.add_argument("--no-train-augmentation", action="store_true",
                      help="train on the evaluation transform (no random crop): deterministic inputs")
    data.add_argument("--workers", type=int, default=default_workers(),
                      help="data loader workers per rank (default: this rank's cores - 1, at most 4)")
    data.add_argument("--input-pipeline", default="fast", choices=["fast", "open_clip", "device"],
                      help="training images: fast (DCT-scaled JPEG decode, uint8 crops, normalised on the device; "
                           "training.data.fast_images), device (JPEGs decoded, cropped and normalised on the device "
                           "in batches, nvJPEG on CUDA; training.data.device_decode) or open_clip (its train transform "
                           "exactly, float32 batches)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=64, help="batch size per rank")
    opt.add_argument("--epochs", type=int, default=32)
    opt.add_argument("--lr", type=float, default=5e-4)
    opt.add_argument("--wd", type=float, default=0.2)
    opt.add_argument("--beta1", type=float, default=0.9)
    opt.add_argument("--beta2", type=float, default=None, help="default as open_clip: 0.98 ViT, 0.999 others")
    opt.add_argument("--eps", type=float, default=None, help="default as open_clip: 1e-6 ViT, 1e-8 others")
    opt.add_argument("--warmup", type=int, default=10000, help="warm-up steps")
    opt.add_argument("--lr-scheduler", default="cosine", choices=["cosine", "const", "const-cooldown"])
    opt.add_argument("--epochs-cooldown", type=int, default=None)
    opt.add_argument("--lr-cooldown-end", type=float, default=0.0)
    opt.add_argument(*_both("lr_min"), dest="lr_min", type=float, default=0.0,
                     help="floor of the cosine schedules")
    opt.add_argument("--grad-clip-norm", type=float, default=None)
    opt.add_argument("--accum-freq", type=int, default=1,
                     help="gradient accumulation: k micro-batches of --batch-size make one step")
    opt.add_argument("--max-nonfinite-steps", type=int, default=20,
                     help="stop after this many consecutive steps with a non-finite gradient")
    opt.add_argument(*_both("optimizer"), dest="optimizer", default="adamw", choices=["adamw", "lamb"])

    model = p.add_argument_group("model")
    model.add_argument("--model", default="neuclip-tiny", help="open_clip architecture name")
    model.add_argument("--pretrained", default="", help="open_clip pretrained tag or checkpoint path")
    model.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: amp on CUDA, fp32 on CPU (fp16 autocast is ~40x slower on CPU)")
    model.add_argument("--grad-checkpointing", action="store_true")
    model.add_argument("--torchcompile", action="store_true")
    model.add_argument("--local-loss", action="store_true")
    model.add_argument("--gather-with-grad", action="store_true")

    run = p.add_argument_group("run")
    run.add_argument("--name", default=None,
                     help="run folder name (default: a timestamp and the main flags, open_clip's convention); "
                          "an existing run folder resumes")
    run.add_argument("--logs", default="./logs", help="where run folders go")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--save-frequency", type=int, default=1, help="epochs between epoch_N.pt")
    run.add_argument("--save-most-recent", action="store_true", help="also keep epoch_latest.pt")
    run.add_argument("--delete-previous-checkpoint", action="store_true")
    run.add_argument("--resume", default=None,
                     help="checkpoint path, or 'latest'; an existing run folder resumes by itself")
    run.add_argument("--no-auto-resume", action="store_true",
                     help="refuse to start in an existing run folder (open_clip's behaviour) instead of "
                          "resuming from its newest valid checkpoint")
    run.add_argument("--resume-fresh", action="store_true",
                     help="in an existing run folder, start over from step 0 on purpose: its checkpoints are "
                          "renamed NAME.discarded (without it, a folder whose checkpoints cannot be used stops)")
    run.add_argument("--save-every-n-steps", type=int, default=0,
                     help="also write checkpoints/iter_{step}.pt every N steps (0: off)")
    run.add_argument("--save-every-n-minutes", type=float, default=0.0,
                     help="also write checkpoints/iter_{step}.pt every M minutes (0: off)")
    run.add_argument("--keep-last-k", type=int, default=2, help="iter_{step}.pt files to keep")
    run.add_argument("--no-requeue", action="store_true",
                     help="on SIGUSR1 under slurm, checkpoint and exit without `scontrol requeue`")
    run.add_argument("--dist-timeout-minutes", type=float, default=30.0,
                     help="a collective (or the start-up rendezvous) that waits longer fails; gloo names "
                          "the missing rank at checkpoints")
    run.add_argument("--report-to", default="tensorboard",
                     help="comma-separated: tensorboard, wandb; all: both; none (or ''): neither")
    run.add_argument("--log-every-n-steps", type=int, default=100)
    run.add_argument("--zeroshot-frequency", type=int, default=1)
    run.add_argument("--val-frequency", type=int, default=1)
    run.add_argument("--builtin-eval", action=argparse.BooleanOptionalAction, default=None,
                     help="the built-in shapes evaluation (builtin/ results) at --zeroshot/--val-frequency "
                          "(default: only when training on the built-in synthetic data set)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads per rank (default: OMP_NUM_THREADS if set, else this rank's "
                          "cores minus one per data-loader worker; training.startup.threads)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar with steps, samples/s and ETA (default: when stderr is a terminal)")
    run.add_argument("--verbose", action="store_true",
                     help="also show third-party INFO lines and known-harmless warnings")
    run.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    run.add_argument("--dist-url", default="env://")
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument(*_both("stop_epochs"), dest="stop_epochs", type=int, default=-1,
                     help="stop after this epoch (chained jobs)")
    run.add_argument("--est-err-every", type=int, default=0,
                     help="measure the normalizer estimation error every N steps and at each epoch's end "
                          "(training.eval.estimation_error; TensorBoard diag/, results.jsonl); 0: off")
    run.add_argument("--est-err-samples", type=int, default=2048,
                     help="size of the estimation error's reference set: the first R training samples by key")

    # The methods' and estimators' flags: each registry entry adds its own (contrastive.registry).
    registry.add_arguments(p)
    add_open_clip_flags(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def method_name(args) -> str:
    """The registry name of the training method the flags ask for."""
    return registry.chosen_method(args).name


def validate(args) -> None:
    """Reject flags that do not fit together, naming them; fill derived defaults."""
    registry.validate(args)  # the methods' and estimators' own rules; sets args.method, args.estimator
    for flag, value in (("--batch-size", args.batch_size), ("--epochs", args.epochs),
                        ("--accum-freq", args.accum_freq)):
        if value < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {value}")
    for flag, value in (("--save-every-n-steps", args.save_every_n_steps),
                        ("--save-every-n-minutes", args.save_every_n_minutes)):
        if value < 0:
            raise ValueError(f"{flag} must be ≥ 0 (0: off), got {value}")
    if args.keep_last_k < 1:
        raise ValueError(f"--keep-last-k must be ≥ 1, got {args.keep_last_k}: resuming needs a checkpoint")
    if args.dist_timeout_minutes <= 0:
        raise ValueError(f"--dist-timeout-minutes must be > 0, got {args.dist_timeout_minutes}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
    if args.workers < 0:
        raise ValueError(f"--workers must be ≥ 0, got {args.workers}")
    if args.train_num_samples is not None and args.train_num_samples < 1:
        raise ValueError("--train-num-samples must be positive")
    if args.gather_with_grad and not args.local_loss and args.fastclip:
        pass  # the family never gathers with gradient; accepted for command-line compatibility
    validate_open_clip_flags(args)
    args.uses_per_sample_state = registry.per_sample_state_bytes(args) > 0


def resolve_precision(args, device_type: str) -> str:
    if args.precision != "auto":
        if args.precision == "amp" and device_type == "cpu":
            raise ValueError("--precision amp (fp16 autocast) is about 40x slower than fp32 on CPU; "
                             "use fp32 or amp_bf16")
        return args.precision
    return "amp" if device_type == "cuda" else "fp32"


def default_run_name(args, now: datetime | None = None) -> str:
    """open_clip's convention, plus the method: a timestamp first, so two runs never share a run folder
    by accident (passing the same --name again is how a run is resumed). Under slurm the job id takes the
    timestamp's place: a requeued job (same id) then finds its folder and resumes by itself."""
    method = registry.run_name_tag(args)
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):  # as squeue shows it
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    date = f"slurm_{job}" if job else (now or datetime.now()).strftime("%Y_%m_%d-%H_%M_%S")
    return "-".join([date, method, f"model_{args.model}", f"lr_{args.lr}", f"b_{args.batch_size}",
                     f"j_{args.workers}", f"p_{args.precision}"]).replace("/", "-")


def schedule_numbers(args, steps_per_epoch: int) -> dict:
    """The derived numbers printed at start."""
    total = steps_per_epoch * args.epochs
    return {"world_size": args.world_size, "local_batch": args.batch_size,
            "global_batch": global_batch(args),
            "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup_steps": min(args.warmup, total), "epochs": args.epochs,
            "samples_seen": total * global_batch(args),
            "warmup_epochs": round(args.warmup / max(steps_per_epoch, 1), 2) if steps_per_epoch else math.nan}
