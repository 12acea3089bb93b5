"""Per-sample state: named float columns indexed by sample key, one full copy per rank, kept on the host.

Shared by FastCLIP's moving average (`estimators`) and the per-sample temperatures (`temperature`).
"""
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class PerSampleTable(nn.Module):
    """Named columns of per-sample values indexed by sample key, kept on the host in their own dtype.

    The columns are buffers, so `state_dict()` checkpoints them; `.to(device)` / `.double()` on an
    enclosing module leave them where and as they are (see `_apply`).
    """

    def __init__(self, size: int, columns: dict[str, tuple[torch.dtype, float]], owner: str):
        super().__init__()
        if size < 1:
            raise ValueError(f"{owner} keeps one entry per sample key: set --data_size to the size of "
                             f"the key space (largest key + 1); got {size}")
        self.size, self.owner = size, owner
        self.fills = {name: fill for name, (_, fill) in columns.items()}
        for name, (dtype, fill) in columns.items():
            self.register_buffer(name, torch.full((size,), fill, dtype=dtype))

    @staticmethod
    def bytes_per_sample(columns: dict[str, tuple[torch.dtype, float]]) -> int:
        return sum(torch.empty((), dtype=dtype).element_size() for dtype, _ in columns.values())

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .double / .half all go through _apply: per-sample state stays on the
        # host in its own dtype whatever device or precision the rest of the method moves to.
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A larger --data_size (keys beyond the old range were added) resumes: the saved columns are padded
        # with their fill value, so the new keys start as never seen. A smaller one is refused unless the
        # entries it drops were never set.
        for name, fill in self.fills.items():
            saved = state_dict.get(prefix + name)
            if saved is None or saved.dim() != 1 or saved.shape[0] == self.size:
                continue
            old = saved.shape[0]
            if old > self.size and not torch.equal(saved[self.size:], torch.full((old - self.size,), fill,
                                                                                 dtype=saved.dtype)):
                raise ValueError(f"{self.owner}: the checkpoint holds per-sample state for {old} keys, this run "
                                 f"has --data_size {self.size}: the state of keys ≥ {self.size} would be lost; "
                                 f"set --data_size {old} (or more)")
            resized = torch.full((self.size,), fill, dtype=saved.dtype)
            resized[:min(old, self.size)] = saved[:min(old, self.size)]
            state_dict[prefix + name] = resized
            if name == next(iter(self.fills)):
                log.info("%s: per-sample state resized from %d to %d keys (--data_size); new keys start as "
                         "never seen", self.owner, old, self.size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def host_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys as host int64 indices, checked against the table's size."""
        keys = keys.detach().to("cpu", torch.int64)
        if keys.numel() and (int(keys.min()) < 0 or int(keys.max()) >= self.size):
            bad = int(keys.max()) if int(keys.max()) >= self.size else int(keys.min())
            raise IndexError(f"{self.owner}: sample key {bad} is outside [0, {self.size}): --data_size "
                             "must be at least the largest key + 1")
        return keys

    def read(self, name: str, keys: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Column `name` at host `keys`, on `like`'s device and in its dtype."""
        return getattr(self, name)[keys].to(device=like.device, dtype=like.dtype)

    def write(self, keys: torch.Tensor, **columns: torch.Tensor) -> None:
        """Store values by host key; of repeated keys the last occurrence wins."""
        last = last_occurrences(keys)
        keys = keys[last]
        for name, values in columns.items():
            column = getattr(self, name)
            column[keys] = values.detach()[last.to(values.device)].to("cpu", column.dtype)


def last_occurrences(keys: torch.Tensor) -> torch.Tensor:
    """Positions of each distinct key's last occurrence (index_put with repeated indices is undefined)."""
    if keys.numel() == 0:
        return keys
    distinct, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.numel(), device=keys.device)
    last = torch.full((distinct.numel(),), -1, dtype=positions.dtype, device=keys.device)
    return last.scatter_reduce(0, inverse, positions, reduce="amax")
