"""One epoch of training. Method-agnostic: the loop never asks which method it runs.

An epoch may start mid-way (resume): the data yields batches from `data.start_batch` on. After every
step `control.after_step(...)` (training.preemption.StepCheckpoints) may write a checkpoint and stop.

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
from dataclasses import dataclass, field

import torch

from contrastive import Features, comm
from contrastive.method_interface import STEP_SKIPPED

from training.data.info import images_to_device
from training.distributed import unwrap
from training.optim import steps_on_device

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


@dataclass
class TrainState:
    """What the loop advances: the global step and counters the log reports.

    Steps skipped on the device are queued in `pending` ((step, 0-dim bool tensor) each) and counted when
    the counters are read: reading either counter settles the queue (one host sync), so a checkpoint or
    the run summary always sees every skip so far."""
    step: int = 0
    _skipped: int = 0
    _consecutive: int = 0
    history: list = field(default_factory=list)  # (step, logged terms) at each logging step
    pending: list = field(default_factory=list)
    limit_hit: int | None = None  # the consecutive count when it first reached --max-nonfinite-steps
    max_nonfinite: int | None = None

    @property
    def skipped_nonfinite(self) -> int:
        self.settle()
        return self._skipped

    @skipped_nonfinite.setter
    def skipped_nonfinite(self, value: int) -> None:
        self.settle()
        self._skipped = int(value)

    @property
    def consecutive_nonfinite(self) -> int:
        self.settle()
        return self._consecutive

    @consecutive_nonfinite.setter
    def consecutive_nonfinite(self, value: int) -> None:
        self.settle()
        self._consecutive = int(value)

    def settle(self) -> None:
        """Count the queued device-side skips (one host read of all of them), in step order."""
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        flags = torch.stack([f for _, f in self.pending]).tolist()
        self.pending = []
        for step, skipped in zip(steps, flags):
            if skipped:
                self._note_skip(step)
            else:
                self._consecutive = 0

    def _note_skip(self, step: int) -> None:
        self._skipped += 1
        self._consecutive += 1
        log.warning("non-finite gradient at step %d: step skipped (%d so far)", step, self._skipped)
        if self.max_nonfinite is not None and self._consecutive >= self.max_nonfinite and self.limit_hit is None:
            self.limit_hit = self._consecutive


def _check_nonfinite_limit(state: TrainState, args) -> None:
    state.max_nonfinite = args.max_nonfinite_steps
    state.settle()
    if state.limit_hit is not None:
        raise FloatingPointError(
            f"{state.limit_hit} consecutive non-finite steps: lower --lr or --lr_tau, "
            "set --grad-clip-norm, raise --fastclip_eps, or use --precision fp32/amp_bf16")


class Meter:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


def train_one_epoch(*, model, method, data, optimizer, scaler, scheduler, state: TrainState, epoch: int,
                    args, device, tb, control=None, diagnostics=None) -> bool:
    """Returns True when `control` stopped the run mid-epoch (its checkpoint is written)."""
    model.train()
    method.train()
    batches = data.dataloader
    steps_this_epoch = data.num_batches
    batch_time, data_time = Meter(), Meter()
    global_batch = args.batch_size * args.world_size * args.accum_freq
    raw_model = unwrap(model)
    state.max_nonfinite = args.max_nonfinite_steps
    end = time.perf_counter()
    for i, (images, texts, keys) in enumerate(batches, start=data.start_batch):
        if i >= steps_this_epoch:
            break
        images = images_to_device(data, images, device, input_dtype(args.precision))  # fast pipeline: normalised here
        texts = texts.to(device, non_blocking=True)
        keys = keys.to(device, non_blocking=True)
        data_time.add(time.perf_counter() - end)
        _, out, lrs = train_step(model=model, method=method, optimizer=optimizer, scaler=scaler,
                                 scheduler=scheduler, state=state, images=images, texts=texts, keys=keys,
                                 epoch=epoch, args=args, device=device)

        batch_time.add(time.perf_counter() - end)
        end = time.perf_counter()
        last = i + 1 == steps_this_epoch
        if i % args.log_every_n_steps == 0 or last:  # open_clip's: each epoch's first batch, every n-th, its last
            _check_nonfinite_limit(state, args)
            terms = _mean_over_ranks(out.terms)  # collective: every rank takes part
            if args.is_master:
                _log_step(state, epoch, i + 1, steps_this_epoch, terms, lrs, raw_model, method, data,
                          batch_time, data_time, global_batch, tb, args)
            batch_time, data_time = Meter(), Meter()
        if diagnostics is not None:  # normalizer estimation error, every --est-err-every steps
            diagnostics.after_step(raw_model, method, step=state.step, epoch=epoch + (i + 1) / steps_this_epoch,
                                   epoch_end=last)
        if control is not None and control.after_step(state.step, epoch, i + 1, steps_this_epoch):
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
    if steps_on_device(optimizer):
        finite = torch.isfinite(norm)
        optimizer.found_inf = finite.logical_not().float()  # read by the fused kernel; 1 skips the step
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        if scaler is not None:  # its own inf check (from unscale_) sets the next scale
            scaler.update()
        state.pending.append((state.step, finite.logical_not()))
        if len(state.pending) >= MAX_PENDING_SKIP_FLAGS:
            state.settle()
        return finite
    if not torch.isfinite(norm):
        state.skipped_nonfinite += 1
        state.consecutive_nonfinite += 1
        log.warning("non-finite gradient at step %d: step skipped (%d so far)", state.step,
                    state.skipped_nonfinite)
        if state.consecutive_nonfinite >= args.max_nonfinite_steps:
            raise FloatingPointError(
                f"{state.consecutive_nonfinite} consecutive non-finite steps: lower --lr or --lr_tau, "
                "set --grad-clip-norm, raise --fastclip_eps, or use --precision fp32/amp_bf16")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return False
    state.consecutive_nonfinite = 0
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True


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
    if not grads or comm.world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce_mean_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _log_step(state, epoch, batch_in_epoch, steps_this_epoch, terms, lrs, raw_model, method, data,
              batch_time, data_time, global_batch, tb, args) -> None:
    values = {name: float(v) for name, v in terms.items()}
    lrs = {name: float(v) for name, v in lrs.items()}  # a device tensor under step_thresh
    state.history.append((state.step, values))
    logit_scale = raw_model.logit_scale.exp().item()
    extra = {name: float(v) for name, v in method.scalars().items()}
    samples_per_s = global_batch / max(batch_time.avg, 1e-9)
    percent = 100.0 * batch_in_epoch / steps_this_epoch
    loss_str = " ".join(f"{k}: {v:.5g}" for k, v in values.items())
    lr_str = " ".join(f"{k}: {v:.3g}" for k, v in lrs.items())
    extra_str = " ".join(f"{k}: {v:.4g}" for k, v in extra.items())
    skipped = data.skipped()
    log.info(f"Train Epoch: {epoch} [{batch_in_epoch}/{steps_this_epoch} ({percent:.0f}%)] "
             f"Data (t): {data_time.avg:.3f} Batch (t): {batch_time.avg:.3f}, "
             f"{samples_per_s:.1f}/s, {loss_str} {lr_str} Logit Scale: {logit_scale:.3f} "
             f"{extra_str} skipped_samples: {skipped} nonfinite_steps: {state.skipped_nonfinite}")
    # open_clip's names (loss, scale, samples_per_second_per_gpu) beside this project's own.
    tb.scalars("train", {**values, **lrs, **extra, "logit_scale": logit_scale, "scale": logit_scale,
                         "data_time": data_time.avg, "batch_time": batch_time.avg,
                         "samples_per_second": samples_per_s,
                         "samples_per_second_per_gpu": samples_per_s / args.world_size, "skipped_samples": skipped,
                         "nonfinite_steps": state.skipped_nonfinite}, state.step - 1)  # open_clip's step: from 0
