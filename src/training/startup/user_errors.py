"""Mistakes in what the user asked for: one line on stderr, from rank 0 only, exit status 2.

`main()` stays a library function that raises (tests and callers catch the exception types they
expect); the command line (`python -m training.main`, `torchrun -m training.main`) goes through
`run_cli`, which turns a user error into one line instead of a traceback repeated by every rank. Exit
status 2 is what argparse uses for flag errors, so scripts see one code for "fix the command".
Anything else is a bug or a fault of the machine and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C


class UserError(ValueError):
    """A setting that cannot work, with a message naming the flag and the fix. A ValueError, as the
    checks it replaces raised one."""


class RunFolderExists(UserError, FileExistsError):
    """A new run would land in an existing run folder."""


class MissingResume(UserError, FileNotFoundError):
    """--resume names no file."""


class ResumeMismatch(UserError, RuntimeError):
    """The checkpoint a run resumes from does not fit its flags."""

    @classmethod
    def of(cls, path: str, exc: BaseException, changes: list[str]) -> "ResumeMismatch":
        """One line from a load error (torch's size-mismatch message runs to a line per tensor): the
        first state entry that does not fit, and the flags that differ from the run folder's params.txt
        (`changes`: main.changed_params's "dest: old -> new")."""
        text = " ".join(str(e) for e in (exc, exc.__cause__) if e is not None)
        key = re.search(r"size mismatch for ([\w.]+): (.*?)(?:\.\s|\n|$)", text) \
            or re.search(r"(Missing key\(s\)|Unexpected key\(s\)) in state_dict: (\"[^\"]+\")", text)
        first = one_line(exc)
        if key:  # torch's first line is a bare "Error(s) in loading state_dict for X:"
            first += f" {key.group(1)}: {key.group(2)}" if first.endswith(":") else \
                f"; first mismatch {key.group(1)}: {key.group(2)}"
        what = first
        flags = "; ".join(f"{flag_spelling(c.split(':', 1)[0])}{c.split(':', 1)[1]}" for c in changes)
        hint = (f"flags that differ from the run folder's params.txt: {flags}; pass the run's own flags to "
                "continue it, or a new --name to start another run") if flags else \
            "no flag differs from the run folder's params.txt: was the checkpoint written by another program?"
        return cls(f"cannot resume from {path}: {what}; {hint}")


def flag_spelling(dest: str) -> str:
    """The command-line spelling of an argparse destination (--batch-size, --npn_num_protos)."""
    from training.params import build_parser  # noqa: PLC0415
    for action in build_parser()._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[0]
    return f"--{dest}"


def is_user_error(exc: BaseException) -> bool:
    # DataConfigError (training.data.checks) is the data pipeline's user error, FirstSyncFailed
    # (training.interop.remote_sync) --remote-sync's; looked up lazily, since this module is used before
    # torch is and the others import it.
    if isinstance(exc, UserError):
        return True
    checks = sys.modules.get("training.data.checks")
    if checks is not None and isinstance(exc, checks.DataConfigError):
        return True
    sync = sys.modules.get("training.interop.remote_sync")  # --remote-sync's first sync (its target)
    return sync is not None and isinstance(exc, sync.FirstSyncFailed)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def env_rank() -> int:
    """This process's global rank from the launcher, before any process group exists."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


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
