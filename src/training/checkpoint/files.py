"""A checkpoint file: written whole or not at all, and read back only when it is intact and complete.

Each file is written to a temporary name, fsynced and renamed, so a crash never leaves a half-written
file under a real name; reading checks the zip CRCs, the keys a resumable checkpoint has and that the
weights are finite (training.checkpoint.integrity says what is damaged and what merely unreadable).
"""
import os
import re

from training.checkpoint.integrity import CheckpointDamaged, load_verified, nonfinite_entries, save_keeping_errno

REQUIRED_KEYS = ("state_dict", "optimizer", "method", "step", "epoch", "data_position", "rng")
CHECKPOINT_NAME = re.compile(r"^(?:iter_(\d+)|epoch_(\d+)|epoch_latest)\.pt$")


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file, fsync, rename over `path`, fsync the directory."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            save_keeping_errno(obj, f, path)  # an OSError keeps its errno (ENOSPC), not `unexpected pos`
    except BaseException:
        if os.path.exists(tmp):  # a failed write must not use up the space a retry needs
            os.remove(tmp)
        raise
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some file systems do not fsync directories
        pass


def read_checkpoint(path: str, required=REQUIRED_KEYS, mmap: bool = False) -> dict:
    """torch.load (CRCs checked unless mmap), checking the keys a resumable checkpoint has and that its
    weights are finite. CheckpointDamaged (a ValueError) naming the file; CheckpointUnreadable (an
    OSError) when it could not be read even after retries."""
    ckpt = load_verified(path, mmap=mmap)
    missing = [key for key in required if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        raise CheckpointDamaged(f"checkpoint {path} lacks {', '.join(missing)}: not a complete training checkpoint")
    if not mmap and isinstance(ckpt.get("state_dict"), dict):
        bad = nonfinite_entries(ckpt["state_dict"], ckpt.get("method") or {})
        if bad:
            raise CheckpointDamaged(f"checkpoint {path} holds non-finite values in {', '.join(bad)}")
    return ckpt
