"""--remote-sync: copy the run folder to REMOTE/NAME every --remote-sync-frequency seconds and at the end,
with open_clip_train's meanings: protocol `s3` runs `aws s3 sync`, `fsspec` copies every file whose remote
copy is missing or of another size through fsspec (any fsspec URL: s3://, gs://, a local path, ...).

Rank 0 only. Like open_clip, the first sync runs at start-up and a failure stops the run there (one line,
exit 2); later failures are logged (one line) and retried at the next period. Files are uploaded whole,
checkpoints included.
"""
import logging
import os
import shutil
import subprocess
import threading

from training.errors import UserError

log = logging.getLogger("training")


class FirstSyncFailed(UserError):
    """The start-up sync failed: the user's target or credentials (a user error: one line, exit 2, as
    training.errors.is_user_error says)."""


def sync_fsspec(local_dir: str, remote_dir: str) -> int:
    """Uploads new or resized files; returns how many. Temporary files (*.tmp) are left out."""
    import fsspec  # a dependency of open_clip_torch (via huggingface_hub)
    fs, root = fsspec.core.url_to_fs(remote_dir)
    copied = 0
    for folder, _, files in os.walk(local_dir):
        for name in files:
            if name.endswith(".tmp"):
                continue
            path = os.path.join(folder, name)
            target = f"{root.rstrip('/')}/{os.path.relpath(path, local_dir).replace(os.sep, '/')}"
            try:
                if fs.exists(target) and fs.size(target) == os.path.getsize(path):
                    continue
            except FileNotFoundError:
                pass
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(path, target)
            copied += 1
    return copied


def sync_s3(local_dir: str, remote_dir: str) -> int:
    subprocess.run(["aws", "s3", "sync", local_dir, remote_dir], check=True, capture_output=True)
    return -1  # the aws CLI does not say how many


def check_remote_sync_flags(args) -> None:
    """Start-up checks (params.validate): one line for each mistake."""
    if not args.remote_sync:
        return
    if args.remote_sync_frequency <= 0:
        raise UserError(f"--remote-sync-frequency must be > 0 seconds, got {args.remote_sync_frequency}")
    if args.remote_sync_protocol == "s3" and shutil.which("aws") is None:
        raise UserError("--remote-sync-protocol s3 runs the aws CLI, which is not installed: pip install awscli, "
                        "or use --remote-sync-protocol fsspec")


class RemoteSync:
    def __init__(self, local_dir: str, remote_dir: str, protocol: str, frequency_s: float):
        self.local_dir, self.remote_dir, self.frequency_s = local_dir, remote_dir, frequency_s
        self.sync = sync_fsspec if protocol == "fsspec" else sync_s3
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = None

    @classmethod
    def start(cls, args, run_dir: str):
        """None unless --remote-sync is given (and on ranks other than 0)."""
        if not args.remote_sync or not args.is_master:
            return None
        remote = f"{args.remote_sync.rstrip('/')}/{args.name}"
        self = cls(run_dir, remote, args.remote_sync_protocol, args.remote_sync_frequency)
        try:
            self.run_once()
        except Exception as exc:  # at start-up, as open_clip: the user's target or credentials, one line
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise FirstSyncFailed(f"--remote-sync {remote}: the first sync failed ({type(exc).__name__}: "
                                  f"{reason}); check the path and credentials") from exc
        log.info("remote sync: %s -> %s every %.0f s (%s)", run_dir, remote, self.frequency_s,
                 args.remote_sync_protocol)
        self.thread = threading.Thread(target=self._loop, name="remote-sync", daemon=True)
        self.thread.start()
        return self

    def run_once(self) -> int:
        with self.lock:  # the period and the final sync never overlap
            return self.sync(self.local_dir, self.remote_dir)

    def _loop(self) -> None:
        while not self.stopped.wait(self.frequency_s):
            try:
                self.run_once()
            except Exception as exc:  # a network hiccup must not kill training: retried next period
                log.warning("remote sync to %s failed (%s): retrying in %.0f s", self.remote_dir, exc,
                            self.frequency_s)

    def close(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
        log.info("remote sync: final sync to %s", self.remote_dir)  # logged first: out.log goes too
        self.run_once()
