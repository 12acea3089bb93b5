"""Checkpoint integrity: what is damaged, what merely could not be read right now, and what must not be written.

`torch.save` writes a zip archive with a CRC32 per member, but `torch.load` never checks them: random
bytes in the middle of a checkpoint (bit rot, a bad disk, a copy cut and patched) load as garbage weights,
usually NaN, which then spread through training. Two kinds of failure are told apart because they call
for opposite actions:

* damaged (`CheckpointDamaged`): a CRC mismatch, not a zip archive, a pickle that does not parse, a
  missing key, non-finite weights. Reading it again gives the same answer: the file is set aside
  (NAME.corrupt) and the previous checkpoint is used;
* unreadable right now (`CheckpointUnreadable`): an OSError such as EIO or ESTALE from a network file
  system, or a MemoryError. Retried a few times with backoff; if it still fails, the file is left
  exactly where it is, since it may be the only good one.

Writing: a checkpoint whose model parameters are non-finite, or whose method state holds a NaN, is
refused (`NonFiniteState`): it would replace the good ones through retention. A write that fails
keeps its errno (ENOSPC: disk full), which torch's zip writer otherwise turns into `unexpected pos`.
"""
from __future__ import annotations

import logging
import os
import time
import zipfile

import torch

log = logging.getLogger(__name__)
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5  # doubled after each failed attempt: 0.5 s, 1 s
TRANSIENT = (OSError, MemoryError)


class CheckpointDamaged(ValueError):
    """The file's bytes are wrong: reading it again cannot help."""


class CheckpointUnreadable(OSError):
    """The file could not be read (I/O error, out of memory) even after retries; it may be fine."""


class NonFiniteState(FloatingPointError):
    """The state to checkpoint holds NaN/inf where it must not."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:limit]}"


def verify_zip(path: str) -> None:
    """Check every member's CRC32 (reads the whole file once). CheckpointDamaged if one fails."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:  # ValueError: a garbled header field
        raise CheckpointDamaged(f"checkpoint {path} is not a valid zip archive (truncated or corrupt?): "
                                f"{first_line(exc)}") from exc
    except zipfile.LargeZipFile as exc:
        raise CheckpointDamaged(f"checkpoint {path}: {first_line(exc)}") from exc
    if bad is not None:
        raise CheckpointDamaged(f"checkpoint {path} is corrupt: member {bad} fails its CRC32 check "
                                "(the bytes on disk changed after the write)")


def with_retries(read, path: str, attempts: int = READ_ATTEMPTS, backoff_s: float | None = None):
    """read() with transient errors (OSError, MemoryError) retried; CheckpointUnreadable when they persist.
    A FileNotFoundError is not transient: another writer removed it, and that is reported as is."""
    backoff_s = READ_BACKOFF_S if backoff_s is None else backoff_s  # looked up per call (tests shorten it)
    for attempt in range(attempts):
        try:
            return read()
        except FileNotFoundError:
            raise
        except TRANSIENT as exc:
            if attempt + 1 == attempts:
                raise CheckpointUnreadable(f"checkpoint {path} could not be read after {attempts} attempts "
                                           f"({first_line(exc)}); it was left untouched") from exc
            log.warning("reading checkpoint %s failed (%s): retrying in %.1f s", path, first_line(exc),
                        backoff_s * 2 ** attempt)
            time.sleep(backoff_s * 2 ** attempt)


def load_verified(path: str, mmap: bool) -> dict:
    """torch.load with the zip CRCs checked first (a full read; skipped for the memory-mapped metadata
    scan, which reads only the pickle). Damage -> CheckpointDamaged; I/O trouble -> CheckpointUnreadable."""
    def read():
        if not mmap:
            verify_zip(path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except TRANSIENT:
            raise
        except Exception as exc:  # unpickling, zip format and weights_only errors: the bytes are wrong
            raise CheckpointDamaged(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                                    f"{first_line(exc)}") from exc
    return with_retries(read, path)


def nonfinite_entries(model_state: dict, method_state: dict, limit: int = 3) -> list[str]:
    """Names of the tensors that make a checkpoint unfit to keep: any non-finite model parameter or
    buffer; any NaN in the method state (±inf is allowed there: log u = −inf marks a sample never seen)."""
    bad = []
    for prefix, state, allow_inf in (("", model_state, False), ("method.", method_state, True)):
        for name, value in state.items():
            if not (torch.is_tensor(value) and value.is_floating_point()) or value.numel() == 0:
                continue
            broken = value.isnan().any() if allow_inf else ~value.isfinite().all()
            if bool(broken):
                bad.append(prefix + name)
                if len(bad) >= limit:
                    return bad
    return bad


class _ErrnoKeepingFile:
    """File wrapper for torch.save: torch's zip writer reports a failed write as `unexpected pos N vs M`
    and drops the OSError (ENOSPC, EDQUOT, EIO); this keeps the first one so it can be raised instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        return self.f.flush()


def save_keeping_errno(obj, f, path: str) -> None:
    """torch.save(obj, f); a write error is raised as an OSError that keeps its errno and names `path`."""
    wrapped = _ErrnoKeepingFile(f)
    try:
        torch.save(obj, wrapped)
        f.flush()
        os.fsync(f.fileno())
    except Exception as exc:
        cause = wrapped.error or (exc if isinstance(exc, OSError) else None)
        if cause is None:
            raise
        try:  # closing flushes the buffer again, whose error would replace the one raised here
            f.close()
        except OSError:
            pass
        hint = " (disk full? free space or point --logs elsewhere)" if cause.errno in (28, 122) else ""
        raise OSError(cause.errno, f"cannot write checkpoint {path}: {cause.strerror or cause}{hint}") from exc
