"""The checkpoint manager: when a checkpoint is written, which one a run resumes from, and restoring
the model, optimizer, scaler, method and RNG from it (the layout and the rest: training.checkpoint)."""
import glob
import logging
import os

import torch
import torch.distributed as dist

from training.checkpoint.files import CHECKPOINT_NAME, atomic_save, read_checkpoint
from training.checkpoint.integrity import (CheckpointDamaged, CheckpointUnreadable, NonFiniteState, nonfinite_entries,
                                           verify_zip)
from training.checkpoint.position import position_state
from training.checkpoint.resume_checks import check_size_flags, method_state_mismatch, size_flags
from training.checkpoint.rng import all_ranks_rng_states, set_rng_state
from training.distributed import all_reduce_max_, barrier, broadcast_object, unwrap
from training.errors import UserError

log = logging.getLogger(__name__)
FORMAT_VERSION = 2


class NoUsableCheckpoint(RuntimeError):
    """The run folder has checkpoints, and none of them can be used."""


class CheckpointManager:
    def __init__(self, checkpoint_dir: str, args, is_master: bool, *, model, optimizer, scaler, method):
        self.dir, self.args, self.is_master = checkpoint_dir, args, is_master
        self.model, self.optimizer, self.scaler, self.method = model, optimizer, scaler, method
        if is_master:  # leftovers of a writer that was killed: never a checkpoint
            for tmp in glob.glob(os.path.join(self.dir, "*.pt.tmp*")):
                log.info("removing %s, left by an interrupted checkpoint write", tmp)
                os.remove(tmp)

    def state(self, *, epoch: int, train_state, position: dict) -> dict:
        barrier()  # gloo: names any rank that does not reach the checkpoint
        model_state, method_state = unwrap(self.model).state_dict(), self.method.state_dict()
        bad = nonfinite_entries(model_state, method_state)
        # every rank decides together: one rank's NaN method state must stop all of them at this checkpoint
        if int(all_reduce_max_(torch.tensor([int(bool(bad))], device=self.args.device)).item()):
            raise NonFiniteState(
                f"not writing a checkpoint at step {train_state.step}: "
                f"{', '.join(bad) if bad else 'another rank’s state'} is not finite, and a checkpoint of it "
                "would replace the good ones; the run stops here (resume from the newest checkpoint with a "
                "lower --lr or --lr_tau, --grad-clip-norm, or --precision fp32/amp_bf16)")
        return {
            "format_version": FORMAT_VERSION,
            "epoch": epoch,
            "name": self.args.name,
            "state_dict": model_state,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "method": method_state,
            "method_name": self.args.method,
            **train_state.state_dict(),  # step, train_state
            "data_position": position_state(position, self.args),
            "size_flags": size_flags(self.args),
            "world_size": self.args.world_size,
            "batch_size": self.args.batch_size,
            "rng": all_ranks_rng_states(),  # collective: every rank must call save
        }

    def save_epoch(self, completed: int, train_state) -> list[str]:
        """epoch_N.pt (per --save-frequency) and epoch_latest.pt (per --save-most-recent), after `completed`
        epochs. Every rank calls it (RNG states are gathered); rank 0 writes."""
        ckpt = self.state(epoch=completed, train_state=train_state, position={"epoch": completed, "batch": 0})
        if not self.is_master:
            return []
        written = []
        final = completed == self.args.epochs
        frequency = self.args.save_frequency
        if completed > 0 and (final or (frequency > 0 and completed % frequency == 0)):
            path = os.path.join(self.dir, f"epoch_{completed}.pt")
            atomic_save(ckpt, path)
            written.append(path)
            if self.args.delete_previous_checkpoint and self.verified(path):
                previous = os.path.join(self.dir, f"epoch_{completed - frequency}.pt")
                if os.path.exists(previous):
                    os.remove(previous)
        if self.args.save_most_recent:
            path = os.path.join(self.dir, "epoch_latest.pt")
            atomic_save(ckpt, path)
            written.append(path)
        return written

    def save_iter(self, train_state, position: dict) -> str:
        """iter_{step}.pt at a step boundary; keeps the newest --keep-last-k. Every rank calls it."""
        ckpt = self.state(epoch=position["epoch"], train_state=train_state, position=position)
        path = os.path.join(self.dir, f"iter_{train_state.step}.pt")
        if self.is_master:
            atomic_save(ckpt, path)
            if self.verified(path):  # retention never deletes the last checkpoint that verified
                for old in self.iter_checkpoints()[:-self.args.keep_last_k]:
                    os.remove(old)
        return path

    def verified(self, path: str) -> bool:
        """The file just written reads back with intact CRCs; else it is set aside and False."""
        try:
            verify_zip(path)
            return True
        except (CheckpointDamaged, OSError) as exc:
            log.error("%s: the checkpoint just written does not read back intact (failing storage?); "
                      "older checkpoints are kept", exc)
            if isinstance(exc, CheckpointDamaged):
                self._set_aside(path, ".corrupt", f"{path} fails verification")
            return False

    def iter_checkpoints(self) -> list[str]:
        """iter_N.pt files, oldest first."""
        found = [(int(m.group(1)), os.path.join(self.dir, name)) for name in os.listdir(self.dir)
                 if (m := CHECKPOINT_NAME.match(name)) and m.group(1)]
        return [path for _, path in sorted(found)]

    def newest_valid(self) -> tuple[str, dict] | tuple[None, None]:
        """The intact, complete checkpoint of this run folder with the highest step, and its contents.
        Damaged files are renamed NAME.corrupt; unreadable ones are left alone. When the folder has
        checkpoints (or earlier .corrupt ones) and none is usable, NoUsableCheckpoint: never a silent
        fresh start."""
        candidates, unreadable = [], []
        for name in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []:
            match = CHECKPOINT_NAME.match(name)
            if not match:
                continue
            path = os.path.join(self.dir, name)
            try:  # mmap: only the pickled metadata is read here, to order by step
                step = int(read_checkpoint(path, mmap=True)["step"])
            except CheckpointUnreadable as exc:
                log.warning("%s: skipping it", exc)
                unreadable.append(name)
                continue
            except ValueError as exc:
                self._set_aside(path, ".corrupt", f"{exc}: skipping it")
                continue
            candidates.append((step, bool(match.group(1)), path))  # same step: iter_N.pt first
        for _, _, path in sorted(candidates, reverse=True):
            try:
                return path, read_checkpoint(path)
            except CheckpointUnreadable as exc:
                log.warning("%s: falling back to the previous checkpoint", exc)
                unreadable.append(os.path.basename(path))
            except ValueError as exc:
                self._set_aside(path, ".corrupt", f"{exc}: falling back to the previous checkpoint")
        damaged = sorted(n for n in os.listdir(self.dir) if n.endswith(".corrupt")) if os.path.isdir(self.dir) else []
        if unreadable or damaged:
            raise NoUsableCheckpoint(
                f"no usable checkpoint in {self.dir}: "
                + "; ".join(filter(None, [unreadable and f"could not be read (left untouched): {', '.join(unreadable)}",
                                          damaged and f"damaged (set aside): {', '.join(damaged)}"]))
                + ". Refusing to start over silently: fix the storage and launch again, restore a checkpoint "
                "into the folder, or pass --resume-fresh to start from step 0 on purpose")
        return None, None

    def discard_all(self) -> None:
        """--resume-fresh: set every checkpoint of the folder aside (NAME.discarded), damaged ones too, so
        that neither this run nor a later automatic resume goes back to them."""
        for name in sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []:
            if CHECKPOINT_NAME.match(name) or (name.endswith(".corrupt") and CHECKPOINT_NAME.match(name[:-8])):
                self._set_aside(os.path.join(self.dir, name), ".discarded", "--resume-fresh: starting over")

    def supersede_newer(self, step: int) -> None:
        """Rank 0, resuming at `step`: this folder's checkpoints from beyond it are another trajectory's."""
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            try:
                newer = CHECKPOINT_NAME.match(name) and read_checkpoint(path, ("step",), mmap=True)["step"] > step
            except (ValueError, OSError):
                continue
            if newer:
                self._set_aside(path, ".superseded", f"{path} is from beyond step {step}, where this run resumes")

    @staticmethod
    def _set_aside(path: str, suffix: str, why: str) -> None:
        log.warning("%s; renamed to %s", why, os.path.basename(path) + suffix)
        os.replace(path, path + suffix)

    def resolve(self, resume: str | None) -> tuple[str | None, dict | None]:
        """(path, contents) that --resume names ('latest': the newest valid in this run folder). Rank 0
        decides and every rank gets its path; contents only on rank 0 (the others read it themselves)."""
        path, ckpt, error = None, None, None
        fresh = getattr(self.args, "resume_fresh", False)
        if self.is_master and (resume or fresh):
            try:
                if fresh and resume not in (None, "latest"):
                    raise ValueError(f"--resume-fresh and --resume {resume}: choose one")
                if fresh:
                    self.discard_all()
                elif resume == "latest":
                    path, ckpt = self.newest_valid()
                elif not os.path.isfile(resume):
                    raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
                else:
                    path, ckpt = resume, read_checkpoint(resume, required=("state_dict",))
                if ckpt is not None:
                    self.supersede_newer(int(ckpt.get("step", 0)))
            except Exception as exc:  # every rank stops with rank 0's reason, rather than waiting for it
                error = exc
        path, reason = broadcast_object((path, f"{type(error).__name__}: {error}" if error else None))
        if error is not None:
            raise error
        if reason is not None:
            raise RuntimeError(f"rank 0 could not resume: {reason}")
        return path, ckpt

    def load(self, path: str, ckpt: dict | None, device) -> dict:
        """Restore model, optimizer, scaler, method and this rank's RNG; returns the checkpoint."""
        if ckpt is None:
            ckpt = read_checkpoint(path, required=("state_dict",))
        check_size_flags(path, ckpt, self.args)  # --model, --npn_num_protos: one line, before any load
        state_dict = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        try:
            unwrap(self.model).load_state_dict(state_dict)
        except RuntimeError as exc:
            raise RuntimeError(f"{path} does not fit --model {self.args.model}: {exc}".split("\n")[0]
                               + " (was it written by a run with another --model?)") from exc
        if "optimizer" in ckpt and ckpt.get("method_name", self.args.method) == self.args.method:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if "method" in ckpt:
                try:  # per-sample tables grow to a larger --data_size by themselves (contrastive.table)
                    self.method.load_state_dict(ckpt["method"])
                except (RuntimeError, ValueError) as exc:
                    raise UserError(method_state_mismatch(path, exc)) from exc
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        elif "optimizer" in ckpt:
            log.warning("checkpoint %s was trained with method %s, this run uses %s: only the model "
                        "weights are restored", path, ckpt.get("method_name"), self.args.method)
        rng = ckpt.get("rng")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rng and len(rng) == self.args.world_size:
            set_rng_state(rng[rank])
        elif rng:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG states not restored (a "
                        "rank's random streams cannot be mapped to another world size; per-sample state is "
                        "indexed by key and carries over): the run continues, but not bit-for-bit",
                        len(rng), self.args.world_size)
        if ckpt.get("batch_size", self.args.batch_size) != self.args.batch_size:
            log.warning("checkpoint was written with --batch-size %s, this run uses %d: the step counter (and "
                        "so the schedules) carries over unchanged", ckpt["batch_size"], self.args.batch_size)
        self.method.to(self.args.device)
        return ckpt
