"""Every rank's random streams (torch, CUDA, Python, NumPy) as tensors and Python primitives, so that a
checkpoint holds them and open_clip still loads it with `weights_only=True`; a resumed rank continues its
own streams."""
import random

import numpy as np
import torch
import torch.distributed as dist


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
    # a checkpoint stores Python's state tuple as lists; random.setstate wants the tuples back
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def all_ranks_rng_states() -> list:
    """This rank's rng_state() gathered from every rank, in rank order (a collective: every rank calls it)."""
    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out

