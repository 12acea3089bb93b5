"""The loop's step observers and its one non-finite guard, each checked against what it must report:
the StepResult sequence the loop hands its observers (positions, logging cadence, stop), the training log
line's timings averaged since the previous logging step, and the two optimizer paths (skipping on the
device, or deciding on the host) counting, warning and stopping alike."""
import logging
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.logger import TrainingLog
from training.loop import TrainState, _check_nonfinite_limit, _step_optimizer, train_one_epoch
from training.observers import StepResult
from training.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


class LearnedScale(nn.Module):
    """Unit features; only logit_scale learns (a model small enough to train a whole epoch in milliseconds)."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, images, texts):
        return F.normalize(images, dim=1), F.normalize(texts, dim=1), self.logit_scale.exp()


class ScaleLoss(nn.Module):
    """loss = logit_scale, reported as the term `loss`."""

    def before_encoder_step(self, feats):
        return {}

    def forward(self, feats):
        loss = feats.logit_scale.log()
        return SimpleNamespace(loss=loss, terms={"loss": loss.detach()})

    def after_encoder_step(self, feats):
        pass

    def trainable_parameter_groups(self):
        return []

    def scalars(self):
        return {"extra": 2.0}


class Recorder:
    def __init__(self, log: list, name: str, stop_at_step: int | None = None):
        self.log, self.name, self.stop_at_step = log, name, stop_at_step

    def after_step(self, result):
        self.log.append((self.name, result))
        return result.step == self.stop_at_step


def run_epoch(num_batches: int, start_batch: int, log_every: int, observers, state=None):
    model = LearnedScale()
    loader = [(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4)) for _ in range(num_batches - start_batch)]
    data = SimpleNamespace(dataloader=loader, num_batches=num_batches, start_batch=start_batch, skipped=lambda: 0)
    scheduler = SimpleNamespace(needs_tau=False, step=lambda step, tau: {"lr": 0.1})
    args = SimpleNamespace(batch_size=4, world_size=1, accum_freq=1, precision="fp32", log_every_n_steps=log_every,
                           is_master=True, grad_clip_norm=0.0, max_nonfinite_steps=3)
    state = state or TrainState()
    stopped = train_one_epoch(model=model, method=ScaleLoss(), data=data, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), scaler=None, scheduler=scheduler, state=state, epoch=2, args=args,
        device=torch.device("cpu"), observers=observers)
    return stopped, state


def test_every_observer_sees_every_step_in_order_with_its_position_and_the_logging_cadence():
    """Catches the loop numbering a resumed epoch's batches from 0 instead of from the resume position (a
    checkpoint would then record the wrong data position), logged terms outside open_clip's cadence (each
    epoch's first batch, every n-th, the last), an observer skipped or called out of order, and a stop that
    does not end the epoch at once."""
    seen = []
    state = TrainState(step=10)  # resumed: 10 steps done, the epoch resumes at its batch 1
    stopped, state = run_epoch(8, 1, 3, [Recorder(seen, "first"), Recorder(seen, "second", stop_at_step=16)],
                               state)
    assert stopped and state.step == 16
    assert [name for name, _ in seen] == ["first", "second"] * 6
    results = [r for name, r in seen if name == "first"]
    assert [r.step for r in results] == [11, 12, 13, 14, 15, 16]
    assert [r.batch for r in results] == [2, 3, 4, 5, 6, 7]  # batches done, this one included
    assert all(r.epoch == 2 and r.steps_this_epoch == 8 and not r.is_epoch_end for r in results)
    # 0-based batch index i logs when i % 3 == 0: i = 3, 6 (batches 4 and 7)
    assert [r.batch for r in results if r.is_logging_step] == [4, 7]
    assert set(results[2].logged_terms) == {"loss"} and results[0].logged_terms is None
    assert results[-1].epochs_done == pytest.approx(2 + 7 / 8)

    seen = []
    stopped, _ = run_epoch(3, 0, 100, [Recorder(seen, "only")])
    assert not stopped and [(r.batch, r.is_logging_step, r.is_epoch_end) for _, r in seen] == [
        (1, True, False), (2, False, False), (3, True, True)]


def test_training_log_averages_the_timings_since_the_previous_logging_step(caplog):
    """Catches the log line's meters not reset after a logging step (the second line would average over all
    steps so far), the train/ scalars at the wrong step (open_clip's x axis counts from 0: step - 1),
    samples/s from the per-rank instead of the global batch, and a line written on a rank other than 0."""
    written = []
    reporter = SimpleNamespace(scalars=lambda prefix, values, step: written.append((prefix, values, step)))
    state = TrainState()
    model, method = LearnedScale(), ScaleLoss()
    data = SimpleNamespace(skipped=lambda: 5)
    args = SimpleNamespace(batch_size=4, world_size=2, accum_freq=3, is_master=True)
    observer = TrainingLog(state, model, method, data, reporter, args)
    steps = [  # (step, batch seconds, data seconds, logged?)
        (1, 1.0, 0.5, True), (2, 2.0, 0.25, False), (3, 4.0, 0.75, True)]
    caplog.set_level(logging.INFO)
    for step, batch_s, data_s, logged in steps:
        terms = {"loss": float(step)} if logged else None
        observer.after_step(StepResult(step, 0, step, 3, terms, {"lr": torch.tensor(0.5)}, data_s, batch_s))
    assert [w[2] for w in written] == [0, 2] and all(w[0] == "train" for w in written)
    last = written[-1][1]
    global_batch = 4 * 2 * 3
    assert last["batch_time"] == pytest.approx((2.0 + 4.0) / 2) and last["data_time"] == pytest.approx(0.5)
    assert last["samples_per_second"] == pytest.approx(global_batch / 3.0)
    assert last["samples_per_second_per_gpu"] == pytest.approx(global_batch / 3.0 / 2)
    assert last["loss"] == 3.0 and last["lr"] == 0.5 and last["extra"] == 2.0 and last["skipped_samples"] == 5
    assert last["logit_scale"] == pytest.approx(torch.e) and last["scale"] == last["logit_scale"]
    assert state.history == [(1, {"loss": 1.0}), (3, {"loss": 3.0})]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Train Epoch")]
    assert re.match(r"Train Epoch: 0 \[3/3 \(100%\)\] Data \(t\): 0\.500 Batch \(t\): 3\.000, 8\.0/s, loss: 3 "
                    r"lr: 0\.5 Logit Scale: 2\.718 extra: 2 skipped_samples: 5 nonfinite_steps: 0$", lines[-1])

    other_rank = TrainingLog(TrainState(), model, method, data, reporter, SimpleNamespace(**{**vars(args),
                                                                                            "is_master": False}))
    other_rank.after_step(StepResult(1, 0, 1, 3, {"loss": 1.0}, {}, 0.1, 0.2))
    assert len(written) == 2


def guarded_steps(nan_steps: list[bool], on_device: bool, monkeypatch) -> tuple[list, tuple | None]:
    """Steps of `_step_optimizer` on a one-layer model, a NaN planted in the gradient where `nan_steps` says;
    the counters read after each (a logging step every step). Returns (per step: stepped, skipped so far,
    consecutive, weights moved) and (step, message) of the FloatingPointError that stopped the run, if any."""
    import training.loop
    monkeypatch.setattr(training.loop, "steps_on_device", lambda optimizer: on_device)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.logit_scale = nn.Parameter(torch.tensor(1.0))
    args = SimpleNamespace(wd=0.1, lr=0.1, lr_tau=0.1, beta1=0.9, beta2=0.99, eps=1e-8, optimizer="adamw",
                           grad_clip_norm=None, max_nonfinite_steps=3)
    method = SimpleNamespace(trainable_parameter_groups=lambda: [])
    optimizer = build_optimizer(model, method, args)
    state, rows, stop = TrainState(), [], None
    for step, bad in enumerate(nan_steps):
        state.step = step
        state.max_nonfinite = args.max_nonfinite_steps
        optimizer.zero_grad()
        (model(torch.ones(1, 3)).sum() * model.logit_scale).backward()
        if bad:
            model.weight.grad[0, 0] = float("nan")
        before = model.weight.detach().clone()
        try:
            stepped = bool(_step_optimizer(model, method, optimizer, None, args, state))
            if on_device:  # the loop's check at a logging step (here every step); the host path stops by itself
                _check_nonfinite_limit(state, args)
        except FloatingPointError as exc:
            stop = (step, str(exc))
            break
        rows.append((stepped, state.skipped_nonfinite, state.consecutive_nonfinite,
                     not torch.equal(before, model.weight.detach())))
    return rows, stop


@pytest.mark.parametrize("on_device", [True, False], ids=["device_skip", "host_check"])
def test_both_optimizer_paths_skip_count_warn_and_stop_alike(on_device, monkeypatch, caplog):
    """Catches the two optimizer paths (fused AdamW skipping on the device; an optimizer the host must decide
    for, as LAMB) drifting apart: a NaN step that still moves the weights, a finite step that does not reset
    the consecutive count, a skip without its warning, or the --max-nonfinite-steps stop missing or coming
    at another step or with another message (the host path must stop within the step, not wait for the
    next logging step's check). The expected rows are restated from the rule: a NaN step is
    skipped and counted, a finite one resets the run of consecutive skips, the 3rd in a row stops."""
    caplog.set_level(logging.WARNING)
    nan_steps = [False, True, True, False, True, True, True, False]
    rows, stop = guarded_steps(nan_steps, on_device, monkeypatch)
    expected, skipped, consecutive = [], 0, 0
    for bad in nan_steps[:6]:
        skipped, consecutive = skipped + bad, (consecutive + 1) if bad else 0
        expected.append((not bad, skipped, consecutive, not bad))
    assert rows == expected
    assert stop == (6, "3 consecutive non-finite steps: lower --lr or --lr_tau, set --grad-clip-norm, raise "
                       "--fastclip_eps, or use --precision fp32/amp_bf16")
    warned = re.findall(r"non-finite gradient at step (\d+): step skipped \((\d+) so far\)", caplog.text)
    assert warned == [("1", "1"), ("2", "2"), ("4", "3"), ("5", "4"), ("6", "5")]
