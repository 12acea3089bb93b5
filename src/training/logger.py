"""out.log, console and TensorBoard, as open_clip lays them out."""
import logging
import sys

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
