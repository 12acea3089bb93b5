"""A training step reads nothing back from the accelerator except at logging steps.

On CUDA every `.item()`, `float(t)`, `bool(t)` (an `if` on a tensor), `.tolist()`, `.cpu()` of a device
tensor waits for all queued GPU work: the host stops running ahead and the GPU idles until Python queues the
next kernels. The test runs `training.loop.train_one_epoch` itself for three steps (logging on the third)
with each method's real model, method, optimizer and scheduler, and counts those calls per step.

What counts: every call of Tensor.item / __bool__ / __float__ / __int__ / __index__ / tolist / cpu / numpy
on any tensor, made anywhere (project code, torch's optimizer, open_clip's loss), EXCEPT calls made inside
`contrastive/table.py`: the per-sample tables live on the host by design (FastCLIP's moving average, per-sample
temperatures), so their key lookups and writes are host work, not reads of the model's device. Everything
here runs on the CPU, so the device of the model and of the host are the same; any tensor outside the
table is treated as a device tensor. Syncs inside C++ ops (e.g. boolean-mask indexing, torch.unique) are
not visible here; scripts/gpu_check.sh runs the same steps under torch.cuda.set_sync_debug_mode to see those.
"""
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from training.bench.common import method_spec
from training.bench.cost import build_args, make_batches, make_model

SYNC_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")
HOST_BY_DESIGN = os.path.join("contrastive", "table.py")
BATCH, STEPS = 8, 3


class SyncCounter:
    """Wraps the Tensor methods that read a value back to the host; `count` says how many ran."""

    def __init__(self):
        self.count, self.where, self._saved = 0, [], {}

    def __enter__(self):
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            frame = sys._getframe(1)
            caller = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            while frame is not None:
                if frame.f_code.co_filename.endswith(HOST_BY_DESIGN):
                    break
                frame = frame.f_back
            else:
                counter.count += 1
                counter.where.append(f"{name} at {caller}")
            return original(tensor, *args, **kwargs)
        return counted


class StepMarks:
    """The data loader of the run: calls `mark()` as each step's batch is drawn and after the last step."""

    def __init__(self, batches, mark):
        self.batches, self.mark, self.marks = batches, mark, []
        self.num_batches, self.start_batch = len(batches), 0

    @property
    def dataloader(self):
        for batch in self.batches:
            self.marks.append(self.mark())
            yield batch
        self.marks.append(self.mark())

    def skipped(self) -> int:
        return 0


V2_FLAGS = ("--fastclip", "--temperature_scheme", "individual_learnable", "--temperature", "0.07", "--lr_tau",
            "2.5e-4", "--rho", "6.5", "--fastclip_eps", "1e-6", "--gamma", "0.8", "--gamma_schedule", "cosine")


def run_steps(family: str, device: torch.device, mark, flags=None, precision="fp32") -> list:
    """STEPS steps of `training.loop.train_one_epoch` (logging at the last); returns `mark()` at each
    step boundary (STEPS + 1 values). `flags` replace the family's training flags."""
    from contrastive import build_method
    from training.logger import TrainingLog
    from training.loop import train_one_epoch
    from training.train_state import TrainState
    from training.optim import build_optimizer
    from training.scheduler import LRScheduler

    model, preprocess, tokenizer = make_model("neuclip-tiny", device, precision)
    batches = make_batches(preprocess, tokenizer, BATCH, STEPS, device)
    spec = method_spec(family, protos=16)
    if flags is not None:  # a variant the benchmark does not name
        spec = type(spec)(spec.key, spec.family, spec.label, tuple(flags))
    args = build_args(spec, "neuclip-tiny", BATCH, precision, BATCH * STEPS, device)
    args.log_every_n_steps = STEPS  # open_clip's cadence: step 1 (the epoch's first) and 3 log, step 2 does not
    method = build_method(args.method, args, model).to(device)
    optimizer = build_optimizer(model, method, args)
    scheduler = LRScheduler(optimizer, args, STEPS)
    tb = SimpleNamespace(scalars=lambda *a, **k: None)
    data, state = StepMarks(batches, mark), TrainState()
    train_one_epoch(model=model, method=method, data=data, optimizer=optimizer, scaler=None,
                    scheduler=scheduler, state=state, epoch=0, args=args, device=device,
                    observers=[TrainingLog(state, model, method, data, tb, args)])
    return data.marks


def per_step_syncs(family: str, flags=None):
    with SyncCounter() as counter:
        marks = run_steps(family, torch.device("cpu"), lambda: (counter.count, len(counter.where)), flags)
    counts = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    where = [counter.where[a[1]:b[1]] for a, b in zip(marks, marks[1:])]
    return counts, where


@pytest.mark.parametrize("family,flags", [("openclip", None), ("fastclip", None), ("neuclip", None),
                                          ("fastclip", V2_FLAGS)],
                         ids=["openclip", "fastclip-v3", "neuclip", "fastclip-individual-tau"])
def test_a_non_logging_step_makes_no_host_sync(family, flags, single_torch_thread):
    """Catches a per-step `.item()` / `if tensor` / `.tolist()` on the hot path: the step-threshold τ
    read, the non-finite branch, a method hook's host read, torch's non-fused optimizer reading a tensor lr
    — each stalls a CUDA pipeline once per step. The logging step must read (else the test counts nothing)."""
    counts, where = per_step_syncs(family, flags)
    assert len(counts) == STEPS
    assert counts[1] == 0, f"host syncs in a non-logging step: {where[1]}"
    assert counts[2] > 0, "the logging step read nothing back: the counter does not see syncs"


def test_the_counter_sees_a_host_sync_in_a_step(single_torch_thread, monkeypatch):
    """Catches a counter that cannot fail: with the non-finite check forced back to the host (an
    optimizer without device-side skipping) the same non-logging steps must count a sync each."""
    import training.loop
    monkeypatch.setattr(training.loop, "steps_on_device", lambda optimizer: False)
    counts, where = per_step_syncs("fastclip")
    assert counts[0] > 0 and counts[1] > 0, where
    assert any("loop.py" in w for w in where[1]), where[1]


def test_step_threshold_lr_on_the_device_equals_the_host_choice():
    """Catches the device-side step_thresh picking the other branch (≤ vs <, the ratio) than the host one."""
    from training.scheduler import StepThreshold
    schedule = StepThreshold()
    for tau in (0.01, 0.03, 0.0300001, 0.07):
        assert float(schedule(2.5e-4, 0, torch.tensor(tau, dtype=torch.float64))) == pytest.approx(
            schedule(2.5e-4, 0, tau), rel=1e-6)


def test_a_step_skipped_on_the_device_changes_nothing_and_is_counted(caplog):
    """Catches a device-side skip that still moves the weights, AdamW's moments or its step count (a zeroed
    gradient would: momentum and weight decay), or that loses the per-step warning and the counters."""
    import logging

    from training.loop import _check_nonfinite_limit, _step_optimizer
    from training.train_state import TrainState
    from training.optim import build_optimizer
    model = torch.nn.Linear(3, 2)
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    args = SimpleNamespace(wd=0.1, lr=0.1, lr_tau=0.1, beta1=0.9, beta2=0.99, eps=1e-8, optimizer="adamw",
                           grad_clip_norm=None, max_nonfinite_steps=2)
    method = SimpleNamespace(trainable_parameter_groups=lambda: [])
    optimizer = build_optimizer(model, method, args)
    state = TrainState()
    for step, bad in enumerate((False, True)):
        state.step = step
        model.zero_grad()
        (model(torch.ones(1, 3)).sum() * model.logit_scale).backward()
        if bad:
            model.weight.grad[0, 0] = float("nan")
            before = {k: v.clone() for k, v in model.state_dict().items()}
            moments = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
        stepped = _step_optimizer(model, method, optimizer, None, args, state)
        assert isinstance(stepped, torch.Tensor) and bool(stepped) is not bad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, saved in zip(model.parameters(), moments):
        for k, v in optimizer.state[p].items():
            assert torch.equal(v, saved[k]), k
    caplog.set_level(logging.WARNING)
    _check_nonfinite_limit(state, args)  # one skip: below the limit of 2
    assert state.skipped_nonfinite == 1 and state.consecutive_nonfinite == 1
    assert "non-finite gradient at step 1: step skipped (1 so far)" in caplog.text
