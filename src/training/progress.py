"""A progress bar on rank 0 (tqdm: steps, samples/s, ETA): one of the loop's step observers.

`ProgressBar.after_step(result)` (training.observers) moves the bar to the step the loop reports; it never
stops the run. While the bar is shown, console log lines go through `tqdm.write` so they print above it
instead of through it. Shown when stderr is a terminal, or with --progress; never in files or tests unless
asked: elsewhere `start` returns an observer that does nothing.
"""
from __future__ import annotations

import logging
import sys

from training.observers import StepResult


def wanted(args, stream=None) -> bool:
    if not args.is_master or args.progress is False:
        return False
    stream = sys.stderr if stream is None else stream
    return bool(args.progress) or (hasattr(stream, "isatty") and stream.isatty())


class ProgressBar:
    """After each step moves the bar (None: no bar shown, nothing to do) to that step."""

    def __init__(self, bar, samples_per_step: int):
        self._bar, self._samples_per_step = bar, samples_per_step

    def after_step(self, result: StepResult) -> bool:
        if self._bar is None:
            return False
        # The rate from the bar's own clock: tqdm's smoothed `rate` stays None until a refresh interval has
        # passed, so a short run (or a fast machine) would never show samples/s.
        steps, elapsed = result.step - self._bar.initial, self._bar.format_dict.get("elapsed", 0.0)
        if steps > 0 and elapsed > 0:
            self._bar.set_postfix_str(f"{steps / elapsed * self._samples_per_step:,.0f} samples/s", refresh=False)
        self._bar.update(result.step - self._bar.n)
        return False


class _TqdmStream:
    """A stream for logging handlers: writes through tqdm.write, which clears and redraws the bar."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm  # noqa: PLC0415
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


_active: list[tuple[object, list]] = []  # (bar, [(console handler, its stream)]) while a bar is shown


def start(args, *, total_steps: int, start_step: int, samples_per_step: int, stream=None) -> ProgressBar:
    """The bar's step observer, to pass to the loop: one that does nothing when no bar is wanted.
    close_all() ends the bar and gives the console its stream back."""
    if not wanted(args, stream):
        return ProgressBar(None, samples_per_step)
    from tqdm import tqdm  # noqa: PLC0415  (only when a bar is shown)
    stream = sys.stderr if stream is None else stream
    bar = tqdm(total=total_steps, initial=start_step, unit="step", file=stream, dynamic_ncols=True,
               desc="train", smoothing=0.1, mininterval=0.5)
    consoles = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    _active.append((bar, [(h, h.setStream(_TqdmStream(h.stream))) for h in consoles]))
    return ProgressBar(bar, samples_per_step)


def close_all() -> None:
    while _active:
        bar, consoles = _active.pop()
        bar.close()
        for handler, stream in consoles:
            handler.setStream(stream)
