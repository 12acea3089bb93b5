"""out.log, console and TensorBoard, as open_clip lays them out; the training log line (TrainingLog)."""
import logging
import sys

from training.batching import global_batch
from training.observers import StepResult

#: The training log line keeps the logger it had when the loop wrote it: a filter or level set on
#: "training.loop" (caplog in a test, a user's logging config) still applies to it.
log = logging.getLogger("training.loop")

_HANDLER_TAG = "_neuclip_handler"


def setup_logging(log_file: str | None, is_master: bool, level=logging.INFO) -> None:
    """Idempotent: calling main() twice in one process (tests) does not duplicate lines."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_TAG, False)]:
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", datefmt="%Y-%m-%d,%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file and is_master:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        setattr(handler, _HANDLER_TAG, True)
        handler.setFormatter(fmt)
        handler.setLevel(level if is_master else logging.WARNING)
        root.addHandler(handler)
    root.setLevel(level)


def record_in_log_files(level: int, message: str) -> None:
    """Write one record to out.log only (not the console): for a reason the console already shows once."""
    record = logging.LogRecord("training", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if getattr(handler, _HANDLER_TAG, False) and isinstance(handler, logging.FileHandler):
            handler.handle(record)


class TensorBoard:
    """A SummaryWriter on rank 0, nothing elsewhere (or when --report-to does not ask for it)."""

    def __init__(self, log_dir: str | None, purge_step: int | None = None):
        self.writer = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter
            # A resumed run rewrites the steps after its checkpoint's step (`purge_step`): TensorBoard drops
            # the old points from the next step on. The checkpoint's own step was logged before the
            # checkpoint was written and is not repeated: purging it too left a gap at every resume.
            self.writer = SummaryWriter(log_dir, purge_step=purge_step + 1 if purge_step else None)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Meter:
    """A running mean (of step and data-wait times between logging steps)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value: float, n: int = 1) -> None:
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


class TrainingLog:
    """A step observer (training.observers): at the loop's logging steps (open_clip's cadence: each epoch's
    first batch, every --log-every-n-steps, its last) rank 0 writes open_clip's "Train Epoch" line and the
    train/ scalars at step - 1 (open_clip's steps count from 0), and appends (step, terms) to
    `state.history` (the run summary's). The timings are averaged over the steps since the last logging
    step. Every rank keeps its meters; only rank 0 writes."""

    def __init__(self, state, raw_model, method, data, reporter, args):
        self.state, self.raw_model, self.method, self.data = state, raw_model, method, data
        self.reporter, self.args = reporter, args
        self.batch_time, self.data_time = Meter(), Meter()

    def after_step(self, result: StepResult) -> bool:
        self.batch_time.add(result.batch_seconds)
        self.data_time.add(result.data_seconds)
        if result.is_logging_step:
            if self.args.is_master:
                self._write(result)
            self.batch_time, self.data_time = Meter(), Meter()
        return False

    def _write(self, result: StepResult) -> None:
        state, batch_time, data_time = self.state, self.batch_time, self.data_time
        values = {name: float(v) for name, v in result.logged_terms.items()}
        lrs = {name: float(v) for name, v in result.lrs.items()}  # a device tensor under step_thresh
        state.history.append((result.step, values))
        logit_scale = self.raw_model.logit_scale.exp().item()
        extra = {name: float(v) for name, v in self.method.scalars().items()}
        samples_per_s = global_batch(self.args) / max(batch_time.avg, 1e-9)
        percent = 100.0 * result.batch / result.steps_this_epoch
        loss_str = " ".join(f"{k}: {v:.5g}" for k, v in values.items())
        lr_str = " ".join(f"{k}: {v:.3g}" for k, v in lrs.items())
        extra_str = " ".join(f"{k}: {v:.4g}" for k, v in extra.items())
        skipped = self.data.skipped()
        log.info(f"Train Epoch: {result.epoch} [{result.batch}/{result.steps_this_epoch} ({percent:.0f}%)] "
                 f"Data (t): {data_time.avg:.3f} Batch (t): {batch_time.avg:.3f}, "
                 f"{samples_per_s:.1f}/s, {loss_str} {lr_str} Logit Scale: {logit_scale:.3f} "
                 f"{extra_str} skipped_samples: {skipped} nonfinite_steps: {state.skipped_nonfinite}")
        # open_clip's names (loss, scale, samples_per_second_per_gpu) beside this project's own.
        self.reporter.scalars("train", {
            **values, **lrs, **extra, "logit_scale": logit_scale, "scale": logit_scale,
            "data_time": data_time.avg, "batch_time": batch_time.avg, "samples_per_second": samples_per_s,
            "samples_per_second_per_gpu": samples_per_s / self.args.world_size, "skipped_samples": skipped,
            "nonfinite_steps": state.skipped_nonfinite}, result.step - 1)  # open_clip's step: from 0
