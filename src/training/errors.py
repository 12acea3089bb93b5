"""The user's mistakes, as one error type: a setting that cannot work, said in one line naming the flag and
the fix. Every start-up check raises it (or a subclass); the command line (training.startup.cli.run_cli)
prints it once and exits with status 2, where any other exception is a bug or a fault of the machine and
keeps its traceback.

Ground floor: imports nothing from the project, so every check, the checkpoint wing and the data pipeline
can raise these without importing each other.
"""
from __future__ import annotations

import os
import re

# The process's exit statuses, one place: scripts and launchers tell "fix the command" (2, argparse's own),
# "stopped by the scheduler, checkpoint written, run again" (75, EX_TEMPFAIL) and Ctrl-C (130 = 128 + SIGINT,
# what a shell reports) apart; anything else is a bug or a fault of the machine.
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130


def env_rank() -> int:
    """This process's global rank from the launcher, before any process group exists: the rank that says a
    mistake or a stop in one line (every rank would repeat it)."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


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
    def of(cls, path: str, exc: BaseException, changes: list[str], parser=None) -> "ResumeMismatch":
        """One line from a load error (torch's size-mismatch message runs to a line per tensor): the
        first state entry that does not fit, and the flags that differ from the run folder's params.txt
        (`changes`: training.startup.run_folder.changed_params's "dest: old -> new", spelled as `parser`
        spells them)."""
        text = " ".join(str(e) for e in (exc, exc.__cause__) if e is not None)
        key = re.search(r"size mismatch for ([\w.]+): (.*?)(?:\.\s|\n|$)", text) \
            or re.search(r"(Missing key\(s\)|Unexpected key\(s\)) in state_dict: (\"[^\"]+\")", text)
        first = one_line(exc)
        if key:  # torch's first line is a bare "Error(s) in loading state_dict for X:"
            first += f" {key.group(1)}: {key.group(2)}" if first.endswith(":") else \
                f"; first mismatch {key.group(1)}: {key.group(2)}"
        what = first
        flags = "; ".join(f"{flag_spelling(c.split(':', 1)[0], parser)}{c.split(':', 1)[1]}" for c in changes)
        hint = (f"flags that differ from the run folder's params.txt: {flags}; pass the run's own flags to "
                "continue it, or a new --name to start another run") if flags else \
            "no flag differs from the run folder's params.txt: was the checkpoint written by another program?"
        return cls(f"cannot resume from {path}: {what}; {hint}")


def flag_spelling(dest: str, parser=None) -> str:
    """The command-line spelling of an argparse destination (--batch-size, --npn_num_protos) in `parser`
    (training.params.build_parser()); --dest when the parser has no such flag or none is given. The parser
    is passed in, not imported: the flags import this module."""
    for action in parser._actions if parser is not None else ():
        if action.dest == dest and action.option_strings:
            return action.option_strings[0]
    return f"--{dest}"


def is_user_error(exc: BaseException) -> bool:
    """The user's mistake (one line, exit status 2), not a bug: every check's error derives from UserError,
    the data pipeline's (training.data.checks.DataConfigError) and --remote-sync's first sync
    (training.interop.remote_sync.FirstSyncFailed) included."""
    return isinstance(exc, UserError)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
