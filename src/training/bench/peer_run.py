"""One training run of the peer comparison (training.bench.peer), timed step by step from inside the process.

    python -m training.bench.peer_run MARKS.json {peer,ours} TRAINER-FLAGS...

`peer` runs open_clip's own trainer (`open_clip_train.main.main(flags)`), `ours` this project's
(`training.main.main(flags)`), in this process, after registering this project's model configs with open_clip
(open_clip_train reads model configs only from open_clip's registry) and setting torch's threads from
OMP_NUM_THREADS. Both trainers log one "Train Epoch: ..." line at the end of every step (--log-every-n-steps 1);
a logging handler stamps each with the wall clock, this process's CPU time (all threads) and its data loader
workers' CPU time (read from /proc), and MARKS.json gets the stamps: per-step times are the differences
between consecutive stamps, so start-up, the first batch's wait and the end of the run are not in them.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of the live descendants of this process: the data loader workers."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid in seen:
                    continue
                seen.add(kid)
                todo.append(kid)
                try:
                    with open(f"/proc/{kid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
                except (OSError, IndexError, ValueError):
                    pass
    return total


class StepStamps(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.stamps = []

    def emit(self, record) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record is not a step)
            return
        if message.startswith("Train Epoch:"):
            t = os.times()
            self.stamps.append({"wall": time.perf_counter(), "cpu": t.user + t.system,
                                "workers_cpu": _children_cpu_seconds()})


def _webdataset_1_shim() -> None:
    """open_clip_train 3.3.0 with webdataset 1.0.2 (the pinned pair) fails at the end of its first shard: webdataset
    1.0's tar_file_expander yields an end-of-shard marker `{}` that open_clip_train's group_by_keys_nothrow indexes
    by "fname" (KeyError). The peer gets the expander without the marker: the 0.2 behaviour it was written for."""
    import functools  # noqa: PLC0415

    import open_clip_train.data as peer_data  # noqa: PLC0415
    peer_data.tar_file_expander = functools.partial(peer_data.tar_file_expander, eof_value=None)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    marks_path, trainer, flags = argv[0], argv[1], argv[2:]
    import torch  # noqa: PLC0415
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import open_clip  # noqa: PLC0415

    from training import MODEL_CONFIG_DIR  # noqa: PLC0415
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    stamps = StepStamps()
    logging.getLogger().addHandler(stamps)
    start = time.perf_counter()
    if trainer == "peer":
        _webdataset_1_shim()
        from open_clip_train.main import main as train  # noqa: PLC0415
    elif trainer == "ours":
        from training.main import main as train  # noqa: PLC0415
    else:
        raise SystemExit(f"peer_run: trainer must be 'peer' or 'ours', not {trainer!r}")
    train(flags)
    t = os.times()
    with open(marks_path, "w") as f:
        json.dump({"trainer": trainer, "flags": flags, "stamps": stamps.stamps, "threads": torch.get_num_threads(),
                   "run_wall": time.perf_counter() - start, "run_cpu": t.user + t.system}, f)


if __name__ == "__main__":
    main()
