"""Batch arithmetic, written once: how many pairs one loss contrasts and how many samples one step consumes.

Ground floor: imports nothing from the project, so flags, checks, loop, checkpoint and benchmark can all use it.
"""


def contrast_batch(args) -> int:
    """Pairs one loss evaluation contrasts: one micro-batch of --batch-size per rank, gathered over the ranks.
    With --accum-freq k each of the k micro-batches is contrasted on its own (k does not enlarge it)."""
    return args.batch_size * args.world_size


def global_batch(args) -> int:
    """Samples one optimizer step consumes: the contrasted batch times --accum-freq micro-batches per step."""
    return contrast_batch(args) * getattr(args, "accum_freq", 1)
