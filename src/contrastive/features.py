"""What the training loop hands to a method each step."""
from dataclasses import dataclass, field
from functools import cached_property

import torch

from . import comm


@dataclass
class Features:
    """One step's embeddings. Local tensors carry gradient; gathered ones never do.

    `image` and `text` are the encoders' L2-normalised outputs for this rank's samples,
    `logit_scale` is exp(model.logit_scale) = 1/τ (with gradient when the temperature is learnt),
    `keys` the samples' integer keys. The gathered views are computed on first use, so a method
    that does not need them (open_clip's ClipLoss gathers on its own) costs no collective.

    Gradient accumulation (`micro_batch`) hands a method the whole effective batch k times, each
    time with one micro-batch's rows carrying gradient; the gradients of the k passes sum to the
    effective batch's. Quantities of the step rather than of rows — the temperature, an estimator's
    network, SigLIP's bias — must be differentiated in exactly one pass: the one whose
    `carries_step_gradient` is True. `extras` is shared by all passes of a step, so a method caches
    per-step work there (estimates, moving-average updates) and does it once.
    """

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    keys: torch.Tensor
    step: int = 0
    epoch: int = 0
    extras: dict = field(default_factory=dict)
    carries_step_gradient: bool = True
    logit_bias: torch.Tensor | None = None  # the model's own bias (open_clip configs with init_logit_bias)

    @cached_property
    def all_image(self) -> torch.Tensor:
        return comm.all_gather_no_grad(fp32(self.image))

    @cached_property
    def all_text(self) -> torch.Tensor:
        return comm.all_gather_no_grad(fp32(self.text))

    @cached_property
    def all_keys(self) -> torch.Tensor:
        return comm.all_gather_no_grad(self.keys)

    @property
    def local(self) -> slice:
        return comm.local_slice(self.all_image.shape[0])

    @property
    def global_batch_size(self) -> int:
        return self.image.shape[0] * comm.world_size()

    def micro_batch(self, rows: slice, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    carries_step_gradient: bool, logit_bias: torch.Tensor | None = None) -> "Features":
        """This step's features with `rows` of the local batch replaced by a recomputation that carries
        gradient (gradient accumulation). Gathered views and `extras` are shared, not recomputed."""
        def splice(cached: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
            return torch.cat([cached[:rows.start].detach(), fresh, cached[rows.stop:].detach()])

        pass_feats = type(self)(image=splice(self.image, image), text=splice(self.text, text),
                                logit_scale=logit_scale if carries_step_gradient else logit_scale.detach(),
                                keys=self.keys, step=self.step, epoch=self.epoch, extras=self.extras,
                                carries_step_gradient=carries_step_gradient,
                                logit_bias=logit_bias if logit_bias is None or carries_step_gradient
                                else logit_bias.detach())
        pass_feats.__dict__.update(all_image=self.all_image, all_text=self.all_text, all_keys=self.all_keys)
        return pass_feats

    @classmethod
    def precomputed(cls, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                    keys: torch.Tensor, step: int = 0, epoch: int = 0) -> "Features":
        """A world-size-1 view of tensors that already hold a whole (global) batch.

        The gathered views are the given tensors (detached; fp32 as ever) and `local` covers every row,
        so nothing built on it ever enters a collective, whatever process group exists: any subset of
        ranks, or rank 0 alone, may use it (the estimation-error diagnostic does).
        """
        feats = _Precomputed(image=image, text=text, logit_scale=logit_scale, keys=keys, step=step,
                             epoch=epoch)
        # cached_property reads the instance dict first: pre-filling it replaces the all-gathers.
        feats.__dict__.update(all_image=fp32(image.detach()), all_text=fp32(text.detach()),
                              all_keys=keys.detach())
        return feats


class _Precomputed(Features):
    """`Features.precomputed`: every row is local, the batch is the whole batch."""

    @property
    def local(self) -> slice:
        return slice(0, self.all_image.shape[0])

    @property
    def global_batch_size(self) -> int:
        return self.image.shape[0]


def fp32(t: torch.Tensor) -> torch.Tensor:
    """Loss maths runs in fp32 whatever autocast gave the encoders (float64 is kept, for tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
