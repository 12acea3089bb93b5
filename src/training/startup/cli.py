"""The command line: a user's mistake is one line on stderr, from rank 0 only, exit status 2.

`main()` stays a library function that raises (tests and callers catch the exception types they
expect); the command line (`python -m training.main`, `torchrun -m training.main`) goes through
`run_cli`, which turns a user error into one line instead of a traceback repeated by every rank. Exit
status 2 is what argparse uses for flag errors, so scripts see one code for "fix the command".
Anything else is a bug or a fault of the machine and keeps its traceback. What counts as a user's
mistake: training.errors.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import sys

from training.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, env_rank, is_user_error, one_line  # noqa: F401


def parse_quietly_off_rank_0(parse, argv):
    """argparse prints its whole usage (70 lines here) before a flag error, on every rank: keep only the
    error line, on rank 0 only (exit status unchanged). --help still prints in full."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            if env_rank() == 0:
                return parse(argv)
            with contextlib.redirect_stdout(io.StringIO()):
                return parse(argv)
    except SystemExit as exc:
        lines = captured.getvalue().strip().splitlines()
        if env_rank() == 0 and lines:
            print(f"{lines[-1]} (--help lists the flags)", file=sys.stderr, flush=True)
        raise SystemExit(exc.code) from None


def quiet_interrupt_while_importing() -> None:
    """Ctrl-C during the seconds of `import torch` and open_clip, or of the process group's rendezvous (before
    main() installs the run's own handlers), printed a 40-line traceback through importlib. Nothing is
    written yet: one line and exit 130."""
    def stop(signum, frame):  # noqa: ARG001
        if env_rank() == 0:
            print("\ninterrupted while starting up, before the run folder was made: nothing was written",
                  file=sys.__stderr__, flush=True)  # not sys.stderr: the quiet flag parsing may be capturing it
        os._exit(EXIT_INTERRUPTED)  # no interpreter teardown half-way through an import
    signal.signal(signal.SIGINT, stop)


def run_cli(main, argv) -> None:
    """Run `main(argv)`; a user error prints `error: MESSAGE` once (rank 0) and exits with status 2. A
    KeyboardInterrupt (the second Ctrl-C, training.preemption) is one line too, exit status 130: the
    person who pressed it knows where they were, and a traceback would hide the line above it."""
    try:
        main(argv)
    except KeyboardInterrupt:
        if env_rank() == 0:
            print("\nstopped at once by a second Ctrl-C, without a checkpoint: the same command resumes from "
                  "the run's newest checkpoint", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001  (re-raised unless it is the user's mistake)
        if not is_user_error(exc):
            raise
        if env_rank() == 0:
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
