"""One checkpoint manager for everything that has state.

A checkpoint is open_clip's layout — `epoch`, `name`, `state_dict` (exactly the model's keys, so
`open_clip.create_model_and_transforms(arch, pretrained=path)` loads it strictly), `optimizer`,
`scaler` — plus top-level keys for the rest: the method's state (per-sample arrays, NPN and its
AdaGrad accumulators, temperatures), the step counter, the data position and every rank's RNG
states. Only tensors and Python primitives are stored: open_clip loads with `weights_only=True`.
Files are written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint under a real name.
"""
import glob
import logging
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist

from .distributed import unwrap

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _all_ranks(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, checkpoint_dir: str, args, is_master: bool):
        self.dir = checkpoint_dir
        self.args = args
        self.is_master = is_master

    def state(self, *, epoch: int, step: int, model, optimizer, scaler, method, data_position: dict) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "name": self.args.name,
            "state_dict": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "method": method.state_dict(),
            "method_name": self.args.method,
            "step": step,
            "data_position": data_position,
            "world_size": self.args.world_size,
            "batch_size": self.args.batch_size,
            "rng": _all_ranks(rng_state()),  # collective: every rank must call save()
        }

    def save(self, epoch: int, **kwargs) -> list[str]:
        """Write epoch_N.pt (per --save-frequency) and epoch_latest.pt (per --save-most-recent).

        Must be called on every rank (RNG states are gathered); only rank 0 writes.
        """
        ckpt = self.state(epoch=epoch, **kwargs)
        if not self.is_master:
            return []
        written = []
        final = epoch == self.args.epochs
        if epoch > 0 and (final or (self.args.save_frequency > 0 and epoch % self.args.save_frequency == 0)):
            path = os.path.join(self.dir, f"epoch_{epoch}.pt")
            atomic_save(ckpt, path)
            written.append(path)
            if self.args.delete_previous_checkpoint:
                previous = os.path.join(self.dir, f"epoch_{epoch - self.args.save_frequency}.pt")
                if os.path.exists(previous):
                    os.remove(previous)
        if self.args.save_most_recent:
            path = os.path.join(self.dir, "epoch_latest.pt")
            atomic_save(ckpt, path)
            written.append(path)
        return written

    def resolve(self, resume: str | None) -> str | None:
        """The checkpoint path that --resume names ('latest': the newest in this run folder)."""
        if not resume:
            return None
        if resume != "latest":
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
            return resume
        latest = os.path.join(self.dir, "epoch_latest.pt")
        if os.path.isfile(latest):
            return latest
        numbered = sorted(glob.glob(os.path.join(self.dir, "epoch_*.pt")),
                          key=lambda p: int(re.search(r"epoch_(\d+)\.pt$", p).group(1))
                          if re.search(r"epoch_(\d+)\.pt$", p) else -1)
        return numbered[-1] if numbered else None

    def load(self, path: str, *, model, optimizer, scaler, method, device) -> dict:
        """Restore everything; returns {'epoch', 'step', 'data_position'}."""
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        try:
            unwrap(model).load_state_dict(state_dict)
        except RuntimeError as exc:
            raise RuntimeError(f"{path} does not fit --model {self.args.model}: {exc}".split("\n")[0]
                               + " (was it written by a run with another --model?)") from exc
        if "optimizer" in ckpt and ckpt.get("method_name", self.args.method) == self.args.method:
            optimizer.load_state_dict(ckpt["optimizer"])
            if "method" in ckpt:
                method.load_state_dict(ckpt["method"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        elif "optimizer" in ckpt:
            log.warning("checkpoint %s was trained with method %s, this run uses %s: only the model "
                        "weights are restored", path, ckpt.get("method_name"), self.args.method)
        rng = ckpt.get("rng")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rng and len(rng) == self.args.world_size:
            set_rng_state(rng[rank])
        elif rng:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG states not restored "
                        "(the run continues, but not bit-for-bit)", len(rng), self.args.world_size)
        method.to(device)
        return {"epoch": ckpt.get("epoch", 0), "step": ckpt.get("step", 0),
                "data_position": ckpt.get("data_position", {})}
