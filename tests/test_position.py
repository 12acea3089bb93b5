"""Where a resumed run starts in its data, and what makes a sample's augmentation reproducible."""
import random
from types import SimpleNamespace

import torch

from training.checkpoint import map_position
from training.data.position import PerSampleRandomness, ResumableSampler


def args(batch_size, world_size=1, accum_freq=1):
    return SimpleNamespace(batch_size=batch_size, world_size=world_size, accum_freq=accum_freq)


def ckpt(epoch, batch, global_batch):
    return {"epoch": epoch, "data_position": {"epoch": epoch, "batch": batch, "global_batch": global_batch}}


def test_position_maps_batches_and_rolls_over_at_the_epoch_end():
    """Catches a checkpoint at an epoch's last batch resuming into an empty rest of that epoch (instead of the
    next epoch's start), and a position not converted when the global batch changed (through the samples
    consumed: 6 steps of 8 = 48 samples = 3 steps of 16)."""
    assert map_position(ckpt(2, 5, 8), args(8), steps_per_epoch=10) == (2, 5)
    assert map_position(ckpt(2, 10, 8), args(8), steps_per_epoch=10) == (3, 0)
    assert map_position(ckpt(1, 6, 8), args(4, world_size=2, accum_freq=2), steps_per_epoch=10) == (1, 3)
    assert map_position(ckpt(1, 6, 8), args(8, world_size=2), steps_per_epoch=10) == (1, 3)


def test_resumable_sampler_skips_the_consumed_indices():
    """Catches a resumed map-style pass that ignores its start (it would replay the epoch's first batches)."""
    sampler = ResumableSampler(list(range(20)), num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.start = 6
    assert list(sampler) == full[6:] and len(sampler) == 14


class Epoch:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def draw():
    return torch.rand(3).tolist(), random.random()


def test_per_sample_randomness_depends_on_seed_epoch_sample_only_and_restores_the_caller():
    """Catches an augmentation seed that ignores the epoch (every epoch would crop a sample identically) or the
    sample, and a caller whose own torch / Python streams are changed by augmenting (with --workers 0 that is
    the training process: dropout or anything random there would change on resume)."""
    epoch = Epoch(1)
    randomness = PerSampleRandomness(7, epoch)
    first = randomness(5, draw)
    assert randomness(5, draw) == first
    assert randomness(6, draw) != first
    epoch.value = 2
    assert randomness(5, draw) != first
    assert PerSampleRandomness(8, epoch)(5, draw) != randomness(5, draw)

    torch.manual_seed(11), random.seed(11)
    untouched = draw()
    torch.manual_seed(11), random.seed(11)
    randomness(5, draw)
    assert draw() == untouched
