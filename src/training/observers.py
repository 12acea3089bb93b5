"""What the training loop tells its observers after every optimizer step, and the one way it tells them.

After each step `training.loop.train_one_epoch` builds one `StepResult` and passes it to every observer, in
order, through the same call: `observer.after_step(result)`. An observer that returns True asks the loop to
stop the run now (StepCheckpoints after a signal: its checkpoint is already written); the others return
False or None. A run's observers, in the order main passes them:

1. training.logger.TrainingLog: the log line and the train/ scalars at logging steps (rank 0);
2. EstimationErrorSteps: the normalizer estimation error every --est-err-every steps (rank 0);
3. training.progress.ProgressBar: the bar (rank 0, when shown);
4. training.preemption.StepCheckpoints: mid-epoch checkpoints and the stop on a signal (every rank).

Logging comes first so that a step's log line precedes its checkpoint line and a stop. What every rank must
do at the same steps (the --max-nonfinite-steps check, the mean of the loss terms over ranks, a collective)
the loop does itself before any observer runs, so an observer that exists on rank 0 only cannot hang a run.

Ground floor: imports nothing from the project, so the loop and every observer can import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as the loop reports it. The first four fields locate the step."""
    step: int  # optimizer steps done, this one included (TrainState.step after it)
    epoch: int  # the epoch being trained, from 0
    batch: int  # batches of this epoch done, this one included (from 1)
    steps_this_epoch: int
    #: The step's loss terms averaged over ranks, as floats, at logging steps only (reading them back is a
    #: host sync, which the loop makes only there); None between logging steps.
    logged_terms: dict | None = None
    lrs: dict = field(default_factory=dict)  # the lrs the step used, by group (a device tensor under step_thresh)
    data_seconds: float = 0.0  # waiting for the batch (and moving it to the device)
    batch_seconds: float = 0.0  # the whole step, data wait included

    @property
    def is_logging_step(self) -> bool:
        return self.logged_terms is not None

    @property
    def is_epoch_end(self) -> bool:
        return self.batch >= self.steps_this_epoch

    @property
    def epochs_done(self) -> float:
        """Epochs completed, fractional mid-epoch."""
        return self.epoch + self.batch / self.steps_this_epoch


class StepObserver(Protocol):
    def after_step(self, result: StepResult) -> bool | None:
        """Called by every rank after every step; True asks the loop to stop now."""


def notify(observers: Sequence[StepObserver], result: StepResult) -> bool:
    """Passes `result` to every observer in order (each sees every step, whatever an earlier one answered);
    True when any of them asked to stop."""
    stop = False
    for observer in observers:
        stop = bool(observer.after_step(result)) or stop
    return stop


class EstimationErrorSteps:
    """The normalizer estimation error (training.eval.estimation_error.EstimationErrorMonitor) as a step
    observer: the monitor measures when due (every --est-err-every steps and at epoch ends, rank 0) on the
    model's current encoders and the method's current estimator."""

    def __init__(self, monitor, raw_model, method):
        self.monitor, self.raw_model, self.method = monitor, raw_model, method

    def after_step(self, result: StepResult) -> bool:
        self.monitor.after_step(self.raw_model, self.method, step=result.step, epoch=result.epochs_done,
                                epoch_end=result.is_epoch_end)
        return False
