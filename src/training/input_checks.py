"""Start-up checks of flags and data that would otherwise fail (or silently mistrain) mid-run."""
from __future__ import annotations


def check_global_batch(args) -> None:
    """Every loss here contrasts a pair against the other pairs of the global batch: with one sample there
    is no negative (OpenCLIP's loss is 0, FastCLIP/NeuCLIP take log(B - 1) = log 0)."""
    global_batch = args.batch_size * args.world_size
    if global_batch < 2:
        raise ValueError(f"--batch-size {args.batch_size} on {args.world_size} process(es) is a global batch of "
                         f"{global_batch}: contrastive losses need at least one negative pair; use --batch-size 2 "
                         "or more")
