"""The main optimizer: open_clip's parameter groups plus the temperature's and the method's own."""
import torch
from torch import nn

_NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "norm")


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    # open_clip's rule: gains, biases and other vectors are not decayed.
    return param.ndim < 2 or any(part in name for part in _NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, method: nn.Module, args) -> list[dict]:
    decay, no_decay, temperature = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("logit_scale"):
            temperature.append(param)
        elif _no_weight_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": args.wd, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if temperature:
        # Its own group: weight decay would pull τ towards 1, and its lr is --lr_tau.
        groups.append({"params": temperature, "weight_decay": 0.0, "name": "temperature",
                       "lr": args.lr_tau})
    groups += method.trainable_parameter_groups()
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, method: nn.Module, args) -> torch.optim.Optimizer:
    groups = param_groups(model, method, args)
    for group in groups:
        group.setdefault("lr", args.lr)
        group.setdefault("initial_lr", group["lr"])
    if args.optimizer == "lamb":
        from timm.optim import Lamb
        return Lamb(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    # Fused where torch has the kernel (CPU and CUDA, floating parameters): one kernel per parameter
    # group instead of a dozen element-wise passes (on CPU torch's default is the per-tensor loop), and
    # it can skip a step on the device (`found_inf`), so the loop's non-finite guard needs no host sync.
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                             fused=fused_supported(groups) or None)


def fused_supported(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW takes every parameter (floating, on a device with the kernel)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # noqa: PLC0415
    devices = set(_get_fused_kernels_supported_devices())
    return all(p.is_floating_point() and p.device.type in devices for g in groups for p in g["params"])


def steps_on_device(optimizer) -> bool:
    """Whether `optimizer.step()` honours `optimizer.found_inf` (skips on the device, as under GradScaler)
    and takes a tensor lr without reading it on the host: torch's fused optimizers do."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))
