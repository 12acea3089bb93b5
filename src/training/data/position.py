"""What makes a pass over the training data reproducible, so that a resumed epoch is the same epoch.

A sample's random augmentation runs with the global RNGs seeded from (seed, epoch, sample) and then
restored (`PerSampleRandomness`), so it depends on nothing else: not the worker, the number of workers,
the rank, nor which batches a resumed pass skipped. Map-style data sets skip consumed batches in the
sampler without loading them (`ResumableSampler`).
"""
from __future__ import annotations

import hashlib
import random
from itertools import islice
from typing import Callable

import torch
from torch.utils.data import Dataset, DistributedSampler


def stream_seed(*parts) -> str:
    # random.Random hashes str seeds with SHA-512: streams for neighbouring (epoch, rank, worker)
    # tuples are unrelated, and the same tuple gives the same stream in any process.
    return "/".join(map(str, parts))


def sample_seed(*parts) -> int:
    """A 63-bit integer seed from a tuple, the same in every process (no hash randomisation)."""
    digest = hashlib.blake2b(stream_seed(*parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PerSampleRandomness:
    """Runs a function with torch's CPU generator and Python's `random` seeded from (seed, epoch, sample),
    then puts both back: a sample's random augmentation depends on nothing else (not the worker, the
    number of workers, the rank, or which batches a resumed pass skipped), and the calling process's own
    random streams are untouched (with --workers 0 that is the training process)."""

    def __init__(self, seed: int, shared_epoch):  # shared_epoch.get(): the current epoch, in any process
        self.seed, self.shared_epoch = seed, shared_epoch

    def __call__(self, sample: int, fn: Callable, *args):
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = sample_seed("augment", self.seed, self.shared_epoch.get(), sample)
            torch.default_generator.manual_seed(seed)  # CPU only: CUDA's generator is not touched
            random.seed(seed)
            try:
                return fn(*args)
            finally:
                random.setstate(python_state)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start a pass `start` indices in (resume), without loading the items
    before it. Its global order does not depend on the world size: rank r takes positions r, r + W, ...
    of one permutation, so global batch t is positions [t·B·W, (t+1)·B·W) for any W."""

    start = 0

    def __iter__(self):
        return islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededItems(Dataset):
    """A map-style training set whose item i is loaded (and augmented) under PerSampleRandomness(i)."""

    def __init__(self, dataset: Dataset, randomness: PerSampleRandomness):
        self.dataset, self.randomness = dataset, randomness

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        return self.randomness(idx, self.dataset.__getitem__, idx)
