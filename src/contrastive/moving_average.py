"""The two estimators with no network: FastCLIP's moving average and the mini-batch one (its γ = 1 case).

* `minibatch`: a_i = log(ε + g(i, B)) of the gathered batch B. With this estimator the family's
  gradient is the mini-batch contrastive loss's (OpenCLIP's InfoNCE up to constants and ε).
* `moving_average` (SogCLR / FastCLIP, paper eq. 3): one u per sample key and modality,
      u_i ← (1 − γ)·u_i + γ·(ε + g(i, B))      for the gathered batch's keys,  a_i = log u_i.
  γ follows `moving_average_gamma` (1 in epoch 0, then a cosine decay to --gamma).

Per-sample state lives in `PerSampleTable`s: float32, indexed by key, a full copy on every rank and on
the host (as the reference keeps it): 414M keys take 3.3 GB, which should not compete with activations
for accelerator memory, and a step touches only N entries. `per_sample_memory.check_memory` refuses to
start a run whose tables would not fit in RAM.

How the moving average differs from the reference FastCLIP code, and why:
  * u is stored as log u. ε + g reaches exp(200) at τ = 0.01 (s_ij − s_ii up to 2), past fp32's
    range; log u holds it, and a = log u needs no log at all (the reference takes log(u), which is
    −inf for u = 0). The update is the same average, formed with logaddexp.
  * u estimates ε + g (the paper's eq. 3); the reference averages g and adds ε when dividing.
  * The reference's guard is kept: an entry never seen (u = 0, i.e. log u = −inf), NaN, ±inf, or
    u < 1e-35 takes the batch value ε + g instead of being averaged with it. It also applies at γ = 1,
    where it changes nothing but NaN.
  * Every rank computes the same update from the same gathered features and keys, so all ranks' new
    u's reach every rank without a collective (the reference all-gathers them).
  * A key that occurs twice in one gathered batch: each occurrence is averaged from the same old u
    and the last occurrence is written (deterministically: writes are de-duplicated first).
"""
import math

import torch

from .estimator_interface import BatchStats, Estimate, NormalizerEstimator
from .features import Features
from .table import PerSampleTable

#: The reference's threshold below which a stored u counts as never set.
LOG_RESET_THRESHOLD = math.log(1e-35)


# ---------------------------------------------------------------------------------------- estimators

class MiniBatchEstimator(NormalizerEstimator):
    """a_i = log(ε + g(i, B)): the gathered batch's own normalizers."""

    def estimate(self, feats: Features, stats: BatchStats) -> Estimate:
        return Estimate(stats.log_norm_img, stats.log_norm_txt)

    def predict(self, feats: Features, stats: BatchStats):
        return stats.log_norm_img, stats.log_norm_txt


def moving_average_gamma(epoch: int, final_gamma: float, schedule: str, decay_epochs: int) -> float:
    """γ of the moving average in `epoch`, as the reference sets it at each epoch's start.

    Epoch 0: 1 whatever the schedule (u is simply the batch value, no stale average yet).
    cosine: 1 → final_gamma over epochs 0..decay_epochs, γ = final + (1 − final)·(1 + cos(π e/E))/2,
    then final_gamma. constant: final_gamma from epoch 1 on.
    """
    if epoch <= 0:
        return 1.0
    if schedule == "constant" or epoch >= decay_epochs:
        return final_gamma
    if schedule != "cosine":
        raise ValueError(f"unknown --gamma_schedule {schedule!r}: cosine or constant")
    return final_gamma + (1.0 - final_gamma) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))


def moving_average_log(log_u: torch.Tensor, log_target: torch.Tensor, gamma: float) -> torch.Tensor:
    """log((1 − γ)·u + γ·target) from log u and log target, with the reference's reset guard:
    entries never set (log u = −inf), non-finite or below 1e-35 take the target."""
    if gamma >= 1.0:
        return log_target.clone()
    unset = ~torch.isfinite(log_u) | (log_u < LOG_RESET_THRESHOLD)
    blended = torch.logaddexp(log_u + math.log1p(-gamma), log_target + math.log(gamma))
    return torch.where(unset, log_target, blended)


class MovingAverageEstimator(NormalizerEstimator):
    """FastCLIP's per-sample moving averages u_img, u_txt (stored as log u; see the module docstring)."""

    uses_per_sample_state = True
    COLUMNS = {"log_u_img": (torch.float32, -math.inf), "log_u_txt": (torch.float32, -math.inf)}

    def __init__(self, data_size: int, final_gamma: float, gamma_schedule: str = "cosine",
                 gamma_decay_epochs: int = 10, state_dtype: torch.dtype = torch.float32):
        super().__init__()
        columns = {name: (state_dtype, fill) for name, (_, fill) in self.COLUMNS.items()}
        self.table = PerSampleTable(data_size, columns, owner="--estimator moving_average")
        self.final_gamma, self.gamma_schedule = final_gamma, gamma_schedule
        self.gamma_decay_epochs = gamma_decay_epochs
        self.gamma = moving_average_gamma(0, final_gamma, gamma_schedule, gamma_decay_epochs)

    def on_epoch_start(self, epoch: int) -> None:
        self.gamma = moving_average_gamma(epoch, self.final_gamma, self.gamma_schedule,
                                          self.gamma_decay_epochs)

    def estimate(self, feats: Features, stats: BatchStats) -> Estimate:
        keys = self.table.host_keys(feats.all_keys)
        a_img = moving_average_log(self.table.read("log_u_img", keys, stats.log_norm_img),
                                   stats.log_norm_img, self.gamma)
        a_txt = moving_average_log(self.table.read("log_u_txt", keys, stats.log_norm_txt),
                                   stats.log_norm_txt, self.gamma)
        self.table.write(keys, log_u_img=a_img, log_u_txt=a_txt)
        return Estimate(a_img, a_txt)

    def predict(self, feats: Features, stats: BatchStats):
        """The stored estimates; an entry never set (or unusable) reads as the batch value."""
        keys = self.table.host_keys(feats.all_keys)

        def stored(name, batch_value):
            log_u = self.table.read(name, keys, batch_value)
            usable = torch.isfinite(log_u) & (log_u >= LOG_RESET_THRESHOLD)
            return torch.where(usable, log_u, batch_value)

        return stored("log_u_img", stats.log_norm_img), stored("log_u_txt", stats.log_norm_txt)

    def scalars(self) -> dict:
        return {"gamma": self.gamma}


def build_moving_average(args, embed_dim: int) -> MovingAverageEstimator:
    return MovingAverageEstimator(args.data_size, args.gamma, args.gamma_schedule, args.gamma_decay_epochs)


def build_minibatch(args, embed_dim: int) -> MiniBatchEstimator:
    return MiniBatchEstimator()
