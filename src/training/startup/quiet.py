"""Quiet by default: the console shows the trainer's lines, third-party warnings and errors, and nothing
else. Dropped unless --verbose: third-party INFO/DEBUG lines (open_clip logs ~10 at every model creation),
and warnings known to be harmless here:

- open_clip's "No pretrained weights loaded ... Model initialized randomly": training from scratch is the
  point (with --pretrained a missing checkpoint is an error anyway);
- torch's FutureWarning that `all_gather_into_tensor` is deprecated (contrastive.comm uses it: the name
  torch's own FLOP/communication counters report, which the benchmark reads);
- the DataLoader's "will create N worker processes ... suggested max number of worker" UserWarning: the
  --workers default already follows the cores (training.startup.threads); an explicit --workers is the user's call.
"""
from __future__ import annotations

import logging
import re
import warnings

OWN_LOGGERS = ("training", "contrastive", "__main__")
HARMLESS_LOG_LINES = (re.compile(r"No pretrained weights loaded for model .*Model initialized randomly"),)
HARMLESS_WARNINGS = (
    (r".*all_gather_into_tensor` is deprecated", FutureWarning),
    (r"This DataLoader will create \d+ worker process", UserWarning),
)


class QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN_LOGGERS:
            return True
        if record.levelno < logging.WARNING:
            return False
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in HARMLESS_LOG_LINES)


_FILTER_TAG = "_neuclip_quiet"


def install(verbose: bool, handlers=None) -> None:
    """Filter the root logger's handlers (all of them, or `handlers`) and the warnings. Call inside a
    `warnings.catch_warnings()` block to undo the warning filters afterwards (tests run main() repeatedly)."""
    root = logging.getLogger()
    for handler in handlers if handlers is not None else root.handlers:
        for old in [f for f in handler.filters if getattr(f, _FILTER_TAG, False)]:
            handler.removeFilter(old)
        if not verbose:
            quiet = QuietFilter()
            setattr(quiet, _FILTER_TAG, True)
            handler.addFilter(quiet)
    if not verbose:
        for message, category in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
