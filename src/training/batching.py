"""The global batch, written once.

Ground floor: imports nothing from the project, so flags, checks, loop, checkpoint and benchmark can all use it.
"""


def global_batch(args) -> int:
    """Samples one optimizer step consumes, and the batch every method's loss contrasts: --batch-size per
    rank, gathered over the ranks, times --accum-freq micro-batches (the loop encodes all k micro-batches
    first and contrasts each against the whole step's batch: training.loop._compute_gradients). Flags
    parsed outside a run (the standalone diagnostics command) have no world size: one process."""
    return args.batch_size * getattr(args, "world_size", 1) * getattr(args, "accum_freq", 1)
