"""Feature-level synthetic data for the data-to-batch-ratio benchmark (training.bench.regime).

A frozen "backbone" is simulated by fixed feature vectors; only two linear heads and τ train, so one step costs
milliseconds and n can reach 10⁶ on a CPU. The distribution (one synthetic family, not images and captions):

* latent z_i on the unit sphere of R^latent, drawn around one of `clusters` centres whose frequencies follow a
  Zipf law (a few frequent concepts, a long tail): z_i = normalise(c_{k_i} + spread · ξ_i);
* image features x_i = A z_i + N_x u_i + noise, text features t_i = B z_i + N_t v_i + noise, in R^dim, with
  A, B the shared signal maps and u_i, v_i per-modality nuisance the heads must learn to ignore.

Drifting backbone (`drift=True`): a second, independent view (x'_i, t'_i) of the same latents is drawn, and at
training progress p ∈ [0, 1] the backbone emits cos(πp/2)·x_i + sin(πp/2)·x'_i (likewise for text). Every
sample's features move during training whatever the heads do, as an encoder still learning does: a per-sample
estimate made some steps ago is stale by the drift since, not only by the heads' and τ's updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FeatureSpec:
    dim: int = 128          # backbone feature width
    latent: int = 16        # dimension of the shared latent
    clusters: int = 4096    # latent cluster centres
    zipf: float = 1.0       # cluster frequency ∝ rank^−zipf
    spread: float = 0.35    # within-cluster spread of z before normalising
    nuisance: int = 16      # per-modality nuisance dimensions
    nuisance_scale: float = 0.5
    noise: float = 0.2


class FeatureData:
    """n (image, text) feature pairs, [n, dim] fp32 each; `views(progress)` the backbone's output at a point
    of training (the same tensors throughout without drift)."""

    def __init__(self, n: int, seed: int, spec: FeatureSpec = FeatureSpec(), drift: bool = False):
        self.n, self.spec, self.drift = n, spec, drift
        gen = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(spec.clusters, spec.latent, generator=gen), dim=1)
        weights = torch.arange(1, spec.clusters + 1, dtype=torch.float64).pow(-spec.zipf)
        cluster = torch.multinomial(weights, n, replacement=True, generator=gen)
        z = F.normalize(centres[cluster] + spec.spread * torch.randn(n, spec.latent, generator=gen), dim=1)
        self.cluster = cluster
        self.image, self.text = self._view(z, gen)
        self.image2, self.text2 = self._view(z, gen) if drift else (None, None)

    def _view(self, z: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        spec, n = self.spec, z.shape[0]
        out = []
        for _ in range(2):  # image, then text: own signal map, own nuisance
            signal = torch.randn(spec.latent, spec.dim, generator=gen) / math.sqrt(spec.latent)
            mixing = torch.randn(spec.nuisance, spec.dim, generator=gen) / math.sqrt(spec.nuisance)
            nuisance = spec.nuisance_scale * torch.randn(n, spec.nuisance, generator=gen) @ mixing
            out.append((z @ signal + nuisance + spec.noise * torch.randn(n, spec.dim, generator=gen)).float())
        return out[0], out[1]

    def views(self, progress: float, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) features of rows `index` (all rows when None) at training progress `progress`."""
        rows = slice(None) if index is None else index
        if not self.drift:
            return self.image[rows], self.text[rows]
        angle = 0.5 * math.pi * min(max(progress, 0.0), 1.0)
        c, s = math.cos(angle), math.sin(angle)
        return c * self.image[rows] + s * self.image2[rows], c * self.text[rows] + s * self.text2[rows]


class FeatureHeads(nn.Module):
    """Two linear heads on backbone features and open_clip's temperature parameter, with open_clip's model
    interface: `model(image, text)` → (L2-normalised image embeddings, text embeddings, exp(logit_scale)).
    The text head is named `text_projection` (an nn.Linear), which is where `contrastive.gcl.embed_dim` reads
    the joint width; `logit_scale` is where the optimizer builder and the temperature schemes find τ."""

    def __init__(self, dim_in: int, dim_out: int, tau: float):
        super().__init__()
        self.visual = nn.Linear(dim_in, dim_out, bias=False)
        self.text_projection = nn.Linear(dim_in, dim_out, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        return (F.normalize(self.visual(image), dim=-1), F.normalize(self.text_projection(text), dim=-1),
                self.logit_scale.exp())

    @torch.no_grad()
    def embed(self, image: torch.Tensor, text: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of a whole feature set, in chunks (no gradient)."""
        parts = [self(image[s:s + chunk], text[s:s + chunk]) for s in range(0, image.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class EpochSampler:
    """Batches of keys as a data loader draws them: a fresh random permutation of 0..n−1 every epoch, cut into
    batches of `batch` (the last incomplete batch dropped, as training does)."""

    def __init__(self, n: int, batch: int, seed: int):
        if batch > n:
            raise ValueError(f"batch {batch} exceeds the data set ({n})")
        self.n, self.batch = n, batch
        self.steps_per_epoch = n // batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order = None

    def keys(self, step: int) -> tuple[int, torch.Tensor]:
        """(epoch, keys of the batch) of global step `step`; call with consecutive steps."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if i == 0 or self.order is None:
            self.order = torch.randperm(self.n, generator=self.gen)
        return epoch, self.order[i * self.batch:(i + 1) * self.batch]
