"""The training state the loop advances — the global step and the non-finite-gradient counters — and
its part of a checkpoint (torchtitan's Stateful: `state_dict()` / `load_state_dict()`), so that writing
and resuming a run never name its fields one by one."""
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)
#: The fault counters a checkpoint keeps under its `train_state` key (the step sits at the top level, where
#: open_clip-style tools read it).
COUNTERS = ("skipped_nonfinite", "consecutive_nonfinite")


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

    def state_dict(self) -> dict:
        """This state's entries of a checkpoint, in the layout every checkpoint has used: `step`, and the
        counters under `train_state` (reading them settles the queued device-side skips)."""
        return {"step": self.step, "train_state": {name: getattr(self, name) for name in COUNTERS}}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint's entries (a whole checkpoint will do: other keys are ignored); a
        checkpoint without them (open_clip's own) starts at step 0 with the counters as they are."""
        self.step = int(state.get("step", 0))
        for name, value in (state.get("train_state") or {}).items():
            if name in COUNTERS:
                setattr(self, name, int(value))
