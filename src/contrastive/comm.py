"""The one place that moves features between ranks.

Every method sees the same global batch in the same order: rank r's local rows occupy
rows [r*b, (r+1)*b) of a gathered tensor. Works unchanged with no process group (world size 1).
"""
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank along dim 0; the result carries no gradient."""
    if not is_distributed():
        return t.detach()
    out = t.new_empty((world_size() * t.shape[0],) + tuple(t.shape[1:]))
    dist.all_gather_into_tensor(out, t.detach().contiguous())
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, t):
        return all_gather_no_grad(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        b = grad.shape[0] // world_size()
        return grad[rank() * b:(rank() + 1) * b]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` from every rank; gradients flow back to each rank's own rows."""
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t)


def local_slice(global_rows: int) -> slice:
    """Rows of the gathered batch that belong to this rank."""
    b = global_rows // world_size()
    return slice(rank() * b, (rank() + 1) * b)


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (identity without a process group)."""
    if is_distributed():
        dist.all_reduce(t)
        t.div_(world_size())
    return t


def average_over_ranks_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor := its mean over ranks, in place, with ONE collective (all flattened together); returns them.

    For state every rank must update identically from averaged gradients: the NPN's inner-loop gradients,
    and the method's own trainable parameters' gradients, which DDP (that averages the model's) never sees.
    """
    if not is_distributed():
        return tensors
    if not tensors:
        return tensors
    flat = all_reduce_mean_(torch.cat([t.reshape(-1) for t in tensors]))
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))
    return tensors
