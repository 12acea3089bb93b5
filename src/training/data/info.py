"""What the training loop gets from `training.data.get_data`: one `DataInfo` per split.

A `DataInfo` holds the split's loader (a `SkipCountingLoader` yielding (images, texts, keys) batches and adding up
the skip counts the workers attach as a 4th element), its epoch length, the `SharedEpoch` its DataLoader workers
read, the epoch reseeding of samplers and worker seeds, the resume position (`set_epoch(epoch, start_batch)`), and
how a batch's images reach the device (`images_to_device`: the fast input pipeline normalises there).
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader

from training.data.fast_images import move_float_images
from training.data.position import ResumableSampler, sample_seed


class SharedEpoch:
    """The epoch number, readable by DataLoader workers (a shared int: reaches persistent workers too)."""

    def __init__(self, epoch: int = 0):
        self._value = multiprocessing.Value("i", epoch, lock=False)  # one writer; no lock: spawn-safe

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def get(self) -> int:
        return self._value.value


class SkipCountingLoader:
    """Iterates a DataLoader of (images, texts, keys, newly_skipped) as (images, texts, keys), adding up
    the skip counts; items without images carry only a count. With `exact`, an epoch that comes up short
    raises: in DDP the other ranks would wait for the missing steps forever.

    On resume the pass starts at batch `first`: the sampler has already left out the `first - discard`
    batches before it, and the remaining `discard` are read here and dropped (iterable data sets)."""

    def __init__(self, loader: DataLoader, num_batches: int | None, num_samples: int | None, exact: bool):
        self.loader, self.num_batches, self.num_samples, self.exact = loader, num_batches, num_samples, exact
        self.skipped = 0
        self.first, self.discard = 0, 0

    def __iter__(self):
        batches, to_discard = self.first - self.discard, self.discard
        for images, texts, keys, newly_skipped in self.loader:
            self.skipped += int(newly_skipped)
            if images is not None:
                batches += 1
                if to_discard:
                    to_discard -= 1
                    continue
                yield images, texts, keys
        if self.exact and batches != self.num_batches:
            raise RuntimeError(f"this rank got {batches} of its {self.num_batches} batches this epoch "
                               f"({self.skipped} unusable samples skipped so far, see the warnings): some "
                               "DataLoader worker found no usable data, or its shards hold fewer samples "
                               "than one batch")

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the number of batches is unknown: set --val-num-samples")
        return self.num_batches


@dataclass
class DataInfo:
    """One split: its loader (3-tuples), epoch length, epoch reseeding, resume position and skip count."""

    dataloader: SkipCountingLoader
    shared_epoch: SharedEpoch
    sampler: ResumableSampler | None = None
    generator: torch.Generator | None = None  # the DataLoader's: worker base seeds
    seed_parts: tuple = ()  # (seed, rank): with the epoch, what the generator is seeded from
    #: (images, device, dtype) -> the model's input on the device: a move and cast of float images, or the
    #: fast pipeline's uint8 -> normalised float (training.data.fast_images.NormalizeOnDevice)
    images_to_device: Callable = move_float_images

    @property
    def num_samples(self) -> int | None:
        """Samples per epoch over all ranks (None: a validation set of unknown size)."""
        return self.dataloader.num_samples

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch on this rank."""
        return self.dataloader.num_batches

    @property
    def start_batch(self) -> int:
        """The index of the first batch the next pass yields (0, or the resume position)."""
        return self.dataloader.first

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reseed shard order, shuffle buffers, resampling, samplers and worker seeds for `epoch`, and
        start the next pass at its batch `start_batch` (resume), skipping the batches before it."""
        self.shared_epoch.set(epoch)
        if self.generator is not None:
            self.generator.manual_seed(sample_seed("loader", *self.seed_parts, epoch))
        loader = self.dataloader
        loader.first = start_batch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            self.sampler.start = start_batch * loader.loader.batch_size
            loader.discard = 0
        else:
            loader.discard = start_batch

    def skipped(self) -> int:
        """Damaged samples skipped so far by all workers of this rank (counted as batches arrive)."""
        return self.dataloader.skipped


def images_to_device(data, images, device, dtype):
    """The training loop's hand-off of a batch's images: the split's own `images_to_device`; a data object
    without one (a test's stand-in) yields float images, moved and cast as open_clip_train does."""
    return getattr(data, "images_to_device", move_float_images)(images, device, dtype)
