"""From flags to the open_clip model: what `open_clip.create_model_and_transforms` is given, and what is
done to the model after (locked towers, a bias no loss uses), with open_clip_train's meanings."""
import logging

import torch

log = logging.getLogger("training")


def create_kwargs(args) -> dict:
    """Keyword arguments of open_clip.create_model_and_transforms for open_clip_train's model flags."""
    kwargs = {
        "pretrained": args.pretrained or None,
        # open_clip's meanings: bf16/fp16 cast the weights as OpenAI did (norms kept fp32), pure_* cast all;
        # the amp* precisions keep fp32 weights under autocast (training.loop.autocast).
        "precision": args.precision if args.precision in ("bf16", "fp16", "pure_bf16", "pure_fp16") else "fp32",
        "force_quick_gelu": args.force_quick_gelu,
        "force_custom_text": args.force_custom_text,
        "force_patch_dropout": args.force_patch_dropout,
        "force_image_size": (args.force_image_size[0] if args.force_image_size and len(args.force_image_size) == 1
                             else args.force_image_size),
        "force_context_length": args.force_context_length,
        "pretrained_image": args.pretrained_image,
        "image_mean": args.image_mean,
        "image_std": args.image_std,
        "image_interpolation": args.image_interpolation,
        "image_resize_mode": args.image_resize_mode,
        "aug_cfg": args.aug_cfg or None,
        "cache_dir": args.cache_dir,
    }
    return kwargs


def apply_model_flags(model: torch.nn.Module, method: torch.nn.Module, args) -> None:
    """Tower locking (open_clip's lock_image_tower / lock_text_tower) and freezing a model's own logit
    bias when the method's loss does not use it: a parameter without gradient would make DDP fail."""
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        if hasattr(model, "text"):  # CustomTextCLIP: the tower implements both meanings itself
            model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers,
                                  freeze_layer_norm=args.lock_text_freeze_layer_norm)
        else:
            # Native CLIP's lock_text_tower asserts freeze_layer_norm (it locks the norms with the layers),
            # so open_clip_train crashes without --lock-text-freeze-layer-norm; give the flag its meaning
            # here instead: the text tower's LayerNorms stay trainable unless it is set.
            model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers, freeze_layer_norm=True)
            if not args.lock_text_freeze_layer_norm:
                for module in [model.transformer, model.ln_final]:
                    for m in module.modules():
                        if isinstance(m, torch.nn.LayerNorm):
                            m.requires_grad_(True)
    if args.use_bn_sync and args.world_size > 1:  # open_clip converts only in distributed runs too
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BatchNorm children in place
    bias = getattr(model, "logit_bias", None)
    if isinstance(bias, torch.nn.Parameter) and not method.uses_logit_bias:
        bias.requires_grad_(False)
        log.info("the model's logit_bias is kept fixed: this method's loss does not use it (--siglip does)")
