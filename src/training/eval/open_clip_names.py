"""open_clip_train's names for evaluation results, so dashboards and results parsers written for open_clip
find them: TensorBoard/wandb `val/...` beside this project's `eval/...` (which stay the same).

    imagenet/top1, imagenet/top5      -> imagenet-zeroshot-val-top1, imagenet-zeroshot-val-top5
    val/clip_loss                     -> clip_val_loss
    val/{image_to_text,text_to_image}_{R@{1,5,10},mean_rank,median_rank} -> the same without the val/ prefix
    plus epoch (and num_samples when the validation set was evaluated)
"""

_RENAMES = {"imagenet/top1": "imagenet-zeroshot-val-top1", "imagenet/top5": "imagenet-zeroshot-val-top5",
            "val/clip_loss": "clip_val_loss"}


def open_clip_val_names(metrics: dict, epoch: int, num_samples: int | None = None) -> dict:
    out = {}
    for name, value in metrics.items():
        if name in _RENAMES:
            out[_RENAMES[name]] = value
        elif name.startswith("val/") and ("_R@" in name or name.endswith("_rank")):
            out[name.removeprefix("val/")] = value
    if not out:
        return {}
    out["epoch"] = epoch
    if num_samples is not None:
        out["num_samples"] = num_samples
    return out
