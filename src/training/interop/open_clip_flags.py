"""open_clip_train's flags: each one is either taken with open_clip's meaning or refused at start-up with
one line saying why and what to use instead. None is accepted and ignored.

`add_open_clip_flags` adds those params.py does not define itself; `validate_open_clip_flags` (called from
params.validate) checks values and fills open_clip's derived defaults. REFUSED is the table of refused
flags (README: "open_clip flags"); tests/test_open_clip_flags.py checks that every flag of the installed
open_clip_train parser is defined here or in params.py, and is not silently accepted.
"""
import argparse
import ast
import importlib.util

from training.errors import UserError
from training.interop.remote_sync import check_remote_sync_flags

#: Refused flags: open_clip_train's spelling -> why, and what to do instead.
REFUSED = {
    "--imagenet-v2": "ImageNet-v2 needs the imagenetv2_pytorch package, which is not installed: evaluate its "
                     "ImageFolder copy with python -m training.eval.evaluate --imagenet_val DIR",
    "--momentum": "only open_clip's timm optimizers (--opt timm/sgd...) use momentum; this trainer builds "
                  "AdamW or LAMB (--optimizer adamw|lamb, --beta1/--beta2)",
    "--torchscript": "a scripted model is not trained here (open_clip scripts only for inference): drop it, "
                     "and use --torchcompile for speed",
    "--trace": "a traced model is not trained here (open_clip traces only for inference): drop it",
    "--copy-codebase": "the trainer does not copy its own source into the run folder: record the version "
                       "with git (params.txt keeps every flag)",
    "--horovod": "launch with torchrun or srun (torch DDP) instead, as README 'Running' shows",
    "--ddp-static-graph": "gradient accumulation recomputes micro-batches under DDP's no_sync, which a static "
                          "graph does not allow: drop it (it is only a speed-up)",
    "--no-set-device-rank": "each process uses cuda:LOCAL_RANK; with one GPU visible per process pass "
                            "--device cuda:0 instead",
    "--coca-caption-loss-weight": "CoCa is not trained here (no caption loss): use a CLIP architecture",
    "--coca-contrastive-loss-weight": "CoCa is not trained here (no caption loss): use a CLIP architecture",
    "--distill-model": "distillation is not implemented: train without a teacher",
    "--distill-pretrained": "distillation is not implemented: train without a teacher",
    "--use-bnb-linear": "no bitsandbytes int8 linear layers here: drop it (--precision amp_bf16 saves memory "
                        "instead)",
}
#: open_clip_train's store_true flags among REFUSED (they take no value).
_REFUSED_SWITCHES = {"--torchscript", "--trace", "--copy-codebase", "--horovod", "--ddp-static-graph",
                     "--no-set-device-rank"}
OPTIMIZERS = ("adamw", "lamb")
REPORTERS = ("tensorboard", "wandb")


class Refuse(argparse.Action):
    """Stops parsing with the flag's one-line reason (argparse's error path: exit status 2)."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported: {REFUSED[option_string]}")


class ParseKwargs(argparse.Action):
    """open_clip's --aug-cfg KEY=VALUE ... (values as Python literals, else strings)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"{option_string} takes KEY=VALUE pairs (e.g. scale='(0.4, 1.0)'), got {item!r}")
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = str(value)
        setattr(namespace, self.dest, kw)


def add_open_clip_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("open_clip_train flags (open_clip's meaning)")
    g.add_argument("--cache-dir", default=None, help="where pretrained weights are downloaded")
    g.add_argument("--pretrained-image", action="store_true", help="ImageNet-pretrained timm image tower")
    g.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    g.add_argument("--lock-image-unlocked-groups", type=int, default=0, help="leave the last N groups trainable")
    g.add_argument("--lock-image-freeze-bn-stats", action="store_true")
    g.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    g.add_argument("--lock-text-unlocked-layers", type=int, default=0)
    g.add_argument("--lock-text-freeze-layer-norm", action="store_true")
    g.add_argument("--image-mean", type=float, nargs="+", default=None, help="override the model's mean")
    g.add_argument("--image-std", type=float, nargs="+", default=None, help="override the model's std")
    g.add_argument("--image-interpolation", default=None, choices=["bicubic", "bilinear", "random"])
    g.add_argument("--image-resize-mode", default=None, choices=["shortest", "longest", "squash"])
    g.add_argument("--aug-cfg", nargs="*", default={}, action=ParseKwargs,
                   help="training augmentation, open_clip's AugmentationCfg: scale='(0.9,1.0)' color_jitter=0.4 ...")
    g.add_argument("--force-context-length", type=int, default=None)
    g.add_argument("--force-image-size", type=int, nargs="+", default=None)
    g.add_argument("--force-quick-gelu", action="store_true")
    g.add_argument("--force-patch-dropout", type=float, default=None)
    g.add_argument("--force-custom-text", action="store_true")
    g.add_argument("--opt", default=None, help=f"open_clip's optimizer flag: {'|'.join(OPTIMIZERS)} (= --optimizer)")
    g.add_argument("--skip-scheduler", action="store_true", help="constant lr, no warm-up (open_clip's meaning)")
    g.add_argument("--lr-cooldown-power", type=float, default=1.0, help="const-cooldown: power of the decay")
    g.add_argument("--use-bn-sync", action="store_true", help="SyncBatchNorm in distributed runs (RN models)")
    g.add_argument("--log-local", action="store_true", help="every rank logs to out-RANK.log too")
    g.add_argument("--debug", action="store_true", help="DEBUG log level")
    g.add_argument("--wandb-notes", default="")
    g.add_argument("--wandb-project-name", default="open-clip")
    g.add_argument("--train-data-upsampling-factors", default=None,
                   help="'f1::f2::...': draw the shards of each '::' source of --train-data with weight f_i "
                        "(needs --dataset-resampled)")
    g.add_argument("--remote-sync", default=None,
                   help="copy the run folder to REMOTE/NAME periodically and at the end (training.interop.remote_sync)")
    g.add_argument("--remote-sync-frequency", type=int, default=300, help="seconds between syncs")
    g.add_argument("--remote-sync-protocol", default="s3", choices=["s3", "fsspec"],
                   help="s3: the aws CLI; fsspec: any fsspec URL or a local path")
    g.add_argument("--loss-dist-impl", default=None, choices=["bidir", "shift", "reduce", "gather"],
                   help="--siglip: how open_clip's SigLipLoss exchanges features between ranks")
    r = p.add_argument_group("open_clip_train flags refused (each says why when given)")
    for flag in REFUSED:
        r.add_argument(flag, action=Refuse, nargs=0 if flag in _REFUSED_SWITCHES else "?",
                       help=f"refused: {REFUSED[flag]}")


def apply_logging_flags(args, run_dir: str) -> None:
    """--debug and --log-local, after training.logger.setup_logging (open_clip's meanings)."""
    import logging
    import os
    root = logging.getLogger()
    if args.debug:
        root.setLevel(logging.DEBUG)
        for handler in root.handlers:
            handler.setLevel(logging.DEBUG)
    if args.log_local and not args.is_master:  # rank 0 already writes out.log
        handler = logging.FileHandler(os.path.join(run_dir, f"out-{args.rank}.log"))
        handler._neuclip_handler = True  # removed by the next setup_logging, like the others
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(message)s"))
        handler.setLevel(logging.DEBUG if args.debug else logging.INFO)
        root.addHandler(handler)


def report_to_names(value: str | None) -> list[str]:
    """--report-to as open_clip reads it: comma-separated tensorboard/wandb, 'all' for both, 'none' or ''
    for neither. A name open_clip does not know is refused (open_clip would silently report nothing)."""
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in (*REPORTERS, "all", "none")]
    if unknown:
        raise UserError(f"--report-to {','.join(unknown)}: choose from {','.join(REPORTERS)} (comma-separated), "
                        "'all', or 'none'")
    return [r for r in REPORTERS if r in names or "all" in names]


def is_project_config(model_name: str) -> bool:
    from training import MODEL_CONFIG_DIR
    return (MODEL_CONFIG_DIR / f"{model_name}.json").is_file()


def validate_open_clip_flags(args) -> None:
    """Raises UserError (one line) for values refused; fills open_clip's derived defaults."""
    if args.opt is not None:
        if args.opt not in OPTIMIZERS:
            raise UserError(f"--opt {args.opt}: this trainer builds {' or '.join(OPTIMIZERS)} only "
                            "(open_clip's timm/... optimizers are not supported)")
        args.optimizer = args.opt
    # open_clip's get_default_params: ViT names get (0.98, 1e-6), all others (RN, convnext, ...) (0.999, 1e-8).
    # This project's own configs (neuclip-tiny) are ViTs whatever their names.
    vit = "vit" in args.model.lower() or is_project_config(args.model)
    if args.beta2 is None:
        args.beta2 = 0.98 if vit else 0.999
    if args.eps is None:
        args.eps = 1e-6 if vit else 1e-8
    if args.skip_scheduler:  # open_clip: no scheduler at all, every group at its base lr from step 0
        args.lr_scheduler, args.lr_tau_scheduler, args.warmup = "const", "const", 0
    if args.precision == "amp_bfloat16":
        args.precision = "amp_bf16"  # open_clip's other spelling
    reporters = report_to_names(args.report_to)
    if "wandb" in reporters and importlib.util.find_spec("wandb") is None:
        raise UserError("--report-to wandb needs the wandb package: pip install wandb (or drop wandb)")
    if args.loss_dist_impl is not None and not args.siglip:
        raise UserError("--loss-dist-impl only applies to --siglip (open_clip's SigLipLoss)")
    if args.lock_image_unlocked_groups and not args.lock_image:
        raise UserError("--lock-image-unlocked-groups needs --lock-image")
    if args.lock_text_unlocked_layers and not args.lock_text:
        raise UserError("--lock-text-unlocked-layers needs --lock-text")
    if args.train_data_upsampling_factors:
        if not args.dataset_resampled or not args.train_data:
            raise UserError("--train-data-upsampling-factors weights the '::' sources of --train-data when "
                            "shards are resampled: add --dataset-resampled (and --train-data)")
        try:
            factors = [float(f) for f in args.train_data_upsampling_factors.split("::")]
        except ValueError:
            raise UserError(f"--train-data-upsampling-factors {args.train_data_upsampling_factors!r}: "
                            "numbers joined by '::', e.g. 1::2") from None
        if len(factors) != len([p for p in args.train_data.split("::") if p.strip()]) or min(factors) < 0:
            raise UserError("--train-data-upsampling-factors needs one factor >= 0 per '::' source of "
                            "--train-data")
    check_remote_sync_flags(args)
    import open_clip
    cfg = open_clip.get_model_config(args.model)
    if cfg is not None and "multimodal_cfg" in cfg:
        raise UserError(f"--model {args.model} is a CoCa model, whose caption loss this trainer does not "
                        "have: train a CLIP architecture (e.g. ViT-B-32), or CoCa with open_clip_train")
