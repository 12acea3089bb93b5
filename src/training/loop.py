"""One epoch of training. Method-agnostic: the loop never asks which method it runs.

An epoch may start mid-way (resume): the data yields batches from `data.start_batch` on. After every
step the loop passes one StepResult to each of its observers (training.observers: the log line, the
estimation error, the progress bar, the checkpoints), any of which may stop the run.

Host syncs: with an optimizer that steps on the device (torch's fused AdamW, the default) a step reads
nothing back from the accelerator except at logging steps, so the host runs ahead and the GPU never
idles waiting for Python. τ for --lr_tau_scheduler step_thresh stays on the device (a tensor lr), and a
non-finite gradient skips the step on the device (`found_inf`, as GradScaler does). The skip is exact
(parameters, moments and step counts untouched; methods see `feats.extras[STEP_SKIPPED]`), but it is
*reported* late: the per-step warnings, the counters and the --max-nonfinite-steps stop come at the next
logging step (or epoch end, or when the counters are read for a checkpoint) instead of at the step itself.
Optimizers without that support (LAMB) keep the host check, one sync per step.
"""
import contextlib
import logging
import math
import time
from collections.abc import Sequence

import torch

from contrastive import Features, comm
from contrastive.method_interface import STEP_SKIPPED

from training.data.info import images_to_device
from training.distributed import unwrap
from training.observers import StepObserver, StepResult, notify
from training.optim import steps_on_device
from training.train_state import TrainState

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100.0)
#: Device-side skip flags held before they are counted anyway (one host read per this many steps at most):
#: with a huge --log-every-n-steps the queue would otherwise hold a tensor per step of the epoch.
MAX_PENDING_SKIP_FLAGS = 1000


def autocast(precision: str, device: torch.device):
    dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_dtype(precision: str):
    """open_clip's get_input_dtype: a model cast to bf16/fp16 as a whole takes images of that dtype."""
    return {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16,
            "fp16": torch.float16, "pure_fp16": torch.float16}.get(precision)


def _check_nonfinite_limit(state: TrainState, args) -> None:
    state.max_nonfinite = args.max_nonfinite_steps
    state.settle()
    if state.limit_hit is not None:
        raise FloatingPointError(
            f"{state.limit_hit} consecutive non-finite steps: lower --lr or --lr_tau, "
            "set --grad-clip-norm, raise --fastclip_eps, or use --precision fp32/amp_bf16")


def train_one_epoch(*, model, method, data, optimizer, scaler, scheduler, state: TrainState, epoch: int,
                    args, device, observers: Sequence[StepObserver] = ()) -> bool:
    """Trains the epoch's remaining batches; after each step passes a StepResult to every observer
    (training.observers). Returns True when an observer stopped the run mid-epoch (StepCheckpoints: its
    checkpoint is written)."""
    model.train()
    method.train()
    steps_this_epoch = data.num_batches
    end = time.perf_counter()
    for i, (images, texts, keys) in enumerate(data.dataloader, start=data.start_batch):
        if i >= steps_this_epoch:
            break
        images = images_to_device(data, images, device, input_dtype(args.precision))  # fast pipeline: normalised here
        texts = texts.to(device, non_blocking=True)
        keys = keys.to(device, non_blocking=True)
        data_seconds = time.perf_counter() - end
        _, out, lrs = train_step(model=model, method=method, optimizer=optimizer, scaler=scaler,
                                 scheduler=scheduler, state=state, images=images, texts=texts, keys=keys,
                                 epoch=epoch, args=args, device=device)
        batch_seconds = time.perf_counter() - end
        end = time.perf_counter()
        logged_terms = None  # open_clip's logging steps: each epoch's first batch, every n-th, its last
        if i % args.log_every_n_steps == 0 or i + 1 == steps_this_epoch:
            _check_nonfinite_limit(state, args)
            logged_terms = _mean_over_ranks(out.terms)  # collective: every rank takes part
        result = StepResult(state.step, epoch, i + 1, steps_this_epoch, logged_terms, lrs, data_seconds, batch_seconds)
        if notify(observers, result):
            return True
    return False


def train_step(*, model, method, optimizer, scheduler, state: TrainState, images, texts, keys, epoch: int,
               args, device, scaler=None):
    """One optimizer step, as `train_one_epoch` takes it (the loop calls this): the lrs of step
    `state.step`, forward and backward (micro-batched under --accum-freq), clipping and the optimizer
    step (skipped on a non-finite gradient), the method's after-step update, τ clamped to ≤ 100, and
    `state.step` advanced. `images`, `texts`, `keys` are one global step's batch, already on `device`.
    Needs no data loader, logger or checkpoint objects: `args` supplies --precision, --accum-freq,
    --grad-clip-norm and --max-nonfinite-steps. Returns (the step's Features, the LossOutput, the lrs set)."""
    raw_model = unwrap(model)
    state.max_nonfinite = args.max_nonfinite_steps
    tau = None
    if scheduler.needs_tau:  # a device tensor when the optimizer takes a tensor lr: no host read
        tau = raw_model.logit_scale.detach().neg().exp()
        tau = tau if steps_on_device(optimizer) else tau.item()
    lrs = scheduler.step(state.step, tau)
    optimizer.zero_grad(set_to_none=True)
    feats, out = _compute_gradients(model, method, images, texts, keys, args, device, scaler,
                                    step=state.step, epoch=epoch)
    stepped = _step_optimizer(model, method, optimizer, scaler, args, state)
    if isinstance(stepped, torch.Tensor):  # skipped or not, decided on the device
        feats.extras[STEP_SKIPPED] = stepped.logical_not()
        method.after_encoder_step(feats)
    elif stepped:
        method.after_encoder_step(feats)
    with torch.no_grad():
        raw_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    state.step += 1
    return feats, out, lrs


def _compute_gradients(model, method, images, texts, keys, args, device, scaler, *, step: int, epoch: int):
    """Forward and backward of one step; returns (the step's features, the last LossOutput).

    With --accum-freq k the batch holds k micro-batches. Every method's loss needs the whole effective
    batch (its negatives, the NPN's inner loop, the moving-average update), so the encoders first run
    on all micro-batches without gradient; then each micro-batch is recomputed with gradient and
    spliced into the cached features (`Features.micro_batch`). The k backward passes sum to the
    gradient of one batch k times larger; DDP synchronises only in the last.
    """
    k = args.accum_freq
    if k == 1:
        with autocast(args.precision, device):
            image_features, text_features, logit_scale, logit_bias = encode_batch(model, images, texts)
        feats = Features(image=image_features, text=text_features, logit_scale=logit_scale, keys=keys,
                         step=step, epoch=epoch, logit_bias=logit_bias)
        method.before_encoder_step(feats)
        out = method(feats)
        _backward(out.loss, scaler)
        return feats, out
    micro = images.shape[0] // k
    rows = [slice(j * micro, (j + 1) * micro) for j in range(k)]
    with torch.no_grad(), autocast(args.precision, device):
        cached = [encode_batch(model, images[r], texts[r]) for r in rows]
    feats = Features(image=torch.cat([c[0] for c in cached]), text=torch.cat([c[1] for c in cached]),
                     logit_scale=cached[-1][2], keys=keys, step=step, epoch=epoch, logit_bias=cached[-1][3])
    method.before_encoder_step(feats)
    for j, r in enumerate(rows):
        last = j == k - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(args.precision, device):
                image_features, text_features, logit_scale, logit_bias = encode_batch(model, images[r], texts[r])
            out = method(feats.micro_batch(r, image_features, text_features, logit_scale,
                                           carries_step_gradient=last, logit_bias=logit_bias))
            _backward(out.loss, scaler)
    return feats, out


def encode_batch(model, images, texts):
    """(image, text, logit_scale, logit_bias or None): open_clip models built with init_logit_bias (the
    SigLIP configs) return the bias as a 4th output; whether a method uses it is the method's business."""
    out = model(images, texts)
    return out[0], out[1], out[2], (out[3] if len(out) > 3 else None)


def _backward(loss: torch.Tensor, scaler) -> None:
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()


def _step_optimizer(model, method, optimizer, scaler, args, state: TrainState):
    """Clip, and step unless the gradient is non-finite (skipped and counted). Returns whether it stepped:
    a bool, or a 0-dim bool device tensor when the optimizer decided on the device (no host sync)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    average_method_grads(method)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # DDP has already averaged gradients, so every rank sees the same norm and takes the same branch.
    if args.grad_clip_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm)
    else:  # the norm only (clipping at ∞ would still multiply every gradient by 1)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    on_device = steps_on_device(optimizer)
    nonfinite = _guard_nonfinite(norm, state, args, count_now=not on_device)
    if on_device:
        optimizer.found_inf = nonfinite.float()  # read by the fused kernel; 1 skips the step
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        if scaler is not None:  # its own inf check (from unscale_) sets the next scale
            scaler.update()
        return nonfinite.logical_not()
    if nonfinite:  # a host tensor: read without another sync
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return False
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True


def _guard_nonfinite(norm: torch.Tensor, state: TrainState, args, *, count_now: bool) -> torch.Tensor:
    """The one non-finite guard of both optimizer paths: whether the gradient norm is non-finite, as a 0-dim
    bool tensor, queued in `state.pending`; settling the queue warns, counts, and at --max-nonfinite-steps
    consecutive skips stops the run (_check_nonfinite_limit). On the device the flag stays queued until the
    next logging step (no host sync per step); with `count_now` (an optimizer that cannot skip on the
    device, so the host must decide anyway) it is brought to the host and settled at once: one sync, and
    the warning and the stop come at this very step."""
    nonfinite = torch.isfinite(norm).logical_not()
    if count_now:
        nonfinite = nonfinite.cpu()
    state.pending.append((state.step, nonfinite))
    if count_now:
        _check_nonfinite_limit(state, args)
    elif len(state.pending) >= MAX_PENDING_SKIP_FLAGS:
        state.settle()
    return nonfinite


def _mean_over_ranks(terms: dict) -> dict:
    """Logged values are global-batch values: a method's local terms (ClipLoss with --local-loss)
    are averaged over ranks in one collective."""
    if not terms:
        return {}
    names = sorted(terms)
    values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
    comm.all_reduce_mean_(values)
    return dict(zip(names, values.tolist()))


def average_method_grads(method) -> None:
    """DDP averages the model's gradients; the method's own trainable parameters (SigLIP's bias, an
    NPN trained with the encoders) are outside DDP, so average theirs here in one collective."""
    grads = [p.grad for g in method.trainable_parameter_groups() for p in g["params"] if p.grad is not None]
    comm.average_over_ranks_(grads)
