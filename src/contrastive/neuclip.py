"""NeuCLIP's normalizer estimator ("npn"): Algorithm 1 of Wei, Lin & Yang (ICLR 2026).

Per encoder step t, with the encoders' embeddings of the gathered batch B fixed:
  1. restart (t = 0 and every T_r steps): the image-side prototypes W_1 := the batch's text embeddings,
     the text-side W_2 := the matching image embeddings (`--npn_fill` says how m > |B| rows are found);
  2. T_u AdaGrad steps on the NPN objective (unified, eq. 12, or the regression ablation) on B;
  3. the encoders weight each anchor's negatives by exp(−α_i) of the updated NPN.

Distributed: every rank holds the same NPN. Each rank differentiates the objective over its own anchors
(rows `feats.local` of the gathered batch), ONE all-reduce per NPN step averages the flattened gradient
of both NPNs, and every rank applies the same AdaGrad update: weights and accumulators stay
bit-identical. Restarts read only gathered (identical) features, in sample-key order, and a generator
seeded by (seed, step).

Parameterisation (the "AdaGrad first step" decision, see scripts/npn_lr_study.py): AdaGrad's first step
after its state is reset is ±lr on every coordinate, whatever the gradient's size. A prototype's norm
does not enter α (cosine), so we store each restarted prototype with norm `init_scale·√d`, i.e. RMS
coordinate `init_scale`: the first step then turns it by about lr/init_scale radians for any d, and
`--npn_lr` is a relative step size. Defaults: lr 1.0 (the paper's), init_scale 20 (≈ 0.05 rad, 3°), AdaGrad
state zeroed at each restart (`--npn_adagrad_reset restart`): the lowest error of the study across
τ = 0.07 and 0.02, while unit-norm prototypes at lr 1.0 (≈ 45° first step) were 3–20× worse.

Ablations: `--npn_arch mlp` (random residual MLP, initialised once: restarts have no embeddings to copy
into it), `--npn_objective regression`, `--npn_update simultaneous` (Algorithm 3: no inner loop; the
main optimizer trains the NPN through `Estimate.extra_loss`), `--npn_restart_iter 0` (never restart).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .comm import average_over_ranks_
from .estimator_interface import BatchStats, Estimate, NormalizerEstimator
from .features import Features
from .npn import OBJECTIVES, AdaGrad, PrototypeNPN, ResidualMLPNPN, Stopwatch, per_anchor, seeded_generator
from .builtin_entries import NPN_DEFAULTS as DEFAULTS

#: Std of the noise (relative to a unit embedding) that keeps `--npn_fill resample` duplicates apart;
#: identical prototypes get identical gradients and would never separate.
RESAMPLE_NOISE = 0.05


@dataclass
class Side:
    """One modality's anchors as its NPN sees them."""
    anchors: torch.Tensor        # [n, d] embeddings e_i
    positive_sim: torch.Tensor   # [n] s_ii
    scale: torch.Tensor          # λ = 1/τ: scalar or [n, 1]
    log_norm: torch.Tensor       # [n] batch estimate log(ε + g_i), the objective's data
    eps: float


class NeuCLIPEstimator(NormalizerEstimator):
    #: gcl builds eq. 12's encoder objective τ·mean[exp(−α)(ε+g) + α] + 2τ(ρ−1) for this estimator.
    objective = "unified"

    def __init__(self, embed_dim: int, *, num_protos: int = DEFAULTS["npn_num_protos"],
                 lr: float = DEFAULTS["npn_lr"], repetition: int = DEFAULTS["npn_repetition"],
                 restart_every: int = DEFAULTS["npn_restart_iter"], arch: str = DEFAULTS["npn_arch"],
                 objective: str = DEFAULTS["npn_objective"], update: str = DEFAULTS["npn_update"],
                 fill: str = DEFAULTS["npn_fill"], adagrad_reset: str = DEFAULTS["npn_adagrad_reset"],
                 init_scale: float = DEFAULTS["npn_init_scale"], mlp_lr: float = DEFAULTS["npn_mlp_lr"],
                 seed: int = 0, gemm: str = "fp32"):
        super().__init__()
        if arch == "prototype":
            self.npn_img, self.npn_txt = PrototypeNPN(num_protos, embed_dim), PrototypeNPN(num_protos, embed_dim)
        else:
            self.npn_img, self.npn_txt = ResidualMLPNPN(embed_dim, embed_dim), ResidualMLPNPN(embed_dim, embed_dim)
        self.arch, self.update, self.fill, self.adagrad_reset = arch, update, fill, adagrad_reset
        self.num_protos, self.repetition, self.restart_every = num_protos, repetition, restart_every
        self.init_scale, self.seed, self.dim = init_scale, seed, embed_dim
        self.gemm = gemm  # the inner loop's GEMMs: "fp32", or "bf16x3" under bf16 autocast (npn.split_bf16_mm)
        self.objective_name, self.npn_objective = objective, OBJECTIVES[objective]
        self.optimizer = AdaGrad(self._params(), lr if arch == "prototype" else mlp_lr) \
            if update == "alternating" else None
        ring_rows = num_protos if arch == "prototype" and fill == "ring" else 0
        self.register_buffer("ring_img", torch.zeros(ring_rows, embed_dim))
        self.register_buffer("ring_txt", torch.zeros(ring_rows, embed_dim))
        self._initialized, self._last_restart = False, -1
        self._ring_next, self._ring_count = 0, 0
        self._stopwatch = Stopwatch()

    # ------------------------------------------------------------------------------- the interface

    def prepare(self, feats: Features, stats: BatchStats) -> dict:
        restarted = self._maybe_restart(feats, stats)
        self._remember(feats)
        if self.update == "simultaneous":
            return {"npn_restart": float(restarted)}
        self._stopwatch.start(feats.all_image.device)
        first, last = self._inner_loop(feats, stats)
        self._stopwatch.stop()
        return {"npn_restart": float(restarted), "npn_objective_first": first, "npn_objective_last": last}

    def estimate(self, feats: Features, stats: BatchStats) -> Estimate:
        a_img, a_txt = self.predict(feats, stats)
        if self.update != "simultaneous":
            return Estimate(a_img, a_txt)
        # Algorithm 3: one backward trains the NPN with the encoders. Like the inner loop, the loss covers
        # this rank's anchors (features and λ detached: only the NPN learns from it); the training loop
        # averages the gradients of `trainable_parameter_groups()` over ranks, as DDP does the encoders'.
        with torch.enable_grad():
            img, txt = self._sides(feats, stats, rows=feats.local)
            extra = self._objective(*self._alphas(img, txt), img, txt)
        return Estimate(a_img, a_txt, extra_loss=extra)

    @torch.no_grad()
    def predict(self, feats: Features, stats: BatchStats):
        if not self._initialized:  # no prototypes before the first prepare: the batch is all we know
            return stats.log_norm_img, stats.log_norm_txt
        return self._alphas(*self._sides(feats, stats))

    def trainable_parameter_groups(self) -> list[dict]:
        if self.update != "simultaneous":
            return []
        return [{"params": self._params(), "weight_decay": 0.0}]  # paper Table 4: NPN wd 0

    def scalars(self) -> dict:
        return {} if self.update == "simultaneous" else {"npn_time_ms": self._stopwatch.elapsed_ms()}

    # The Python-side counters (restart bookkeeping, ring position) ride along in state_dict() as one
    # CPU int64 tensor, built only when a checkpoint is taken: no per-step device traffic.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([self._initialized, self._last_restart, self._ring_next, self._ring_count])

    def set_extra_state(self, state: torch.Tensor) -> None:
        initialized, self._last_restart, self._ring_next, self._ring_count = state.tolist()
        self._initialized = bool(initialized)

    # ------------------------------------------------------------------------------ the NPN step

    def _inner_loop(self, feats: Features, stats: BatchStats):
        """T_u AdaGrad steps on this rank's anchors, gradients averaged over ranks. Returns the
        (rank-local, detached) objective before the first and before the last step."""
        img, txt = self._sides(feats, stats, rows=feats.local)
        params, values = self._params(), []
        for _ in range(self.repetition):
            value, grads = 0.0, []
            for npn, side in ((self.npn_img, img), (self.npn_txt, txt)):  # params order: image NPN first
                side_value, side_grads = npn.value_and_grad(side.anchors, side.positive_sim, side.scale, side.eps,
                                                            side.log_norm, self.objective_name, self.gemm)
                value, grads = value + side_value, grads + side_grads
            self.optimizer.step_(params, average_over_ranks_(grads))
            values.append(value)
        return values[0], values[-1]

    def _objective(self, a_img, a_txt, img: Side, txt: Side) -> torch.Tensor:
        return (self.npn_objective(a_img, img.log_norm, img.scale)
                + self.npn_objective(a_txt, txt.log_norm, txt.scale))

    def _alphas(self, img: Side, txt: Side):
        return (self.npn_img(img.anchors, img.positive_sim, img.scale, img.eps),
                self.npn_txt(txt.anchors, txt.positive_sim, txt.scale, txt.eps))

    def _sides(self, feats: Features, stats: BatchStats, rows: slice = slice(None)):
        dtype = self._params()[0].dtype
        img, txt = feats.all_image.to(dtype), feats.all_text.to(dtype)
        pos = (img * txt).sum(-1)

        def side(anchors, scale, log_norm):
            return Side(anchors[rows], pos[rows], per_anchor(scale.to(dtype), rows), log_norm[rows].to(dtype),
                        stats.eps)
        return side(img, stats.scale_img, stats.log_norm_img), side(txt, stats.scale_txt, stats.log_norm_txt)

    def _params(self) -> list[torch.Tensor]:
        return list(self.npn_img.parameters()) + list(self.npn_txt.parameters())

    # ---------------------------------------------------------------------------------- restarts

    def _maybe_restart(self, feats: Features, stats: BatchStats) -> bool:
        step = feats.step
        due = not self._initialized or (self.restart_every > 0 and step % self.restart_every == 0)
        if not due or step == self._last_restart:
            return False
        generator = seeded_generator(self.seed, step)
        if self.arch == "prototype":
            self._restart_prototypes(feats, generator)
        elif not self._initialized:
            # A random MLP, initialised once; its output bias starts at the batch's mean log-normalizer
            # (a device tensor: no host sync) so that AdaGrad need not first walk α to the right level.
            self.npn_img.reset_(generator, stats.log_norm_img.mean())
            self.npn_txt.reset_(generator, stats.log_norm_txt.mean())
        else:
            return False
        if self.optimizer is not None and (self.adagrad_reset == "restart" or not self._initialized):
            self.optimizer.reset_()
        self._initialized, self._last_restart = True, step
        return True

    def _restart_prototypes(self, feats: Features, generator: torch.Generator) -> None:
        """W_img-side := text embeddings, W_txt-side := the matching image embeddings (paired rows)."""
        images, texts = _in_key_order(feats)
        txt_rows, img_rows = self._prototype_rows(texts, images, generator)
        norm = self.init_scale * math.sqrt(self.dim)
        self.npn_img.reset_(txt_rows, norm)
        self.npn_txt.reset_(img_rows, norm)

    def _prototype_rows(self, texts, images, generator):
        """m paired rows: a random subset of the batch when m ≤ N; otherwise the whole batch, then the
        most recent rows of earlier batches (`fill=ring`), then noisy resamples of this batch."""
        n, m, device = texts.shape[0], self.num_protos, texts.device
        if m <= n:
            pick = torch.randperm(n, generator=generator)[:m].to(device)
            return texts[pick], images[pick]
        parts_txt, parts_img = [texts], [images]
        recent = self._recent_ring_rows(m - n)
        if recent is not None:
            parts_txt.append(self.ring_txt[recent])
            parts_img.append(self.ring_img[recent])
        missing = m - sum(p.shape[0] for p in parts_txt)
        if missing > 0:
            pick = torch.randint(n, (missing,), generator=generator).to(device)
            parts_txt.append(_jitter(texts[pick], generator))
            parts_img.append(_jitter(images[pick], generator))
        return torch.cat(parts_txt), torch.cat(parts_img)

    def _recent_ring_rows(self, wanted: int):
        take = min(wanted, self._ring_count)
        if take == 0:
            return None
        capacity = self.ring_img.shape[0]
        return (self._ring_next - 1 - torch.arange(take, device=self.ring_img.device)) % capacity

    @torch.no_grad()
    def _remember(self, feats: Features) -> None:
        """Push the gathered batch into the ring of recent embeddings (needed only when m > N)."""
        capacity, n = self.ring_img.shape[0], feats.all_image.shape[0]
        if capacity == 0 or n >= self.num_protos:
            return
        images, texts = _in_key_order(feats)
        where = (self._ring_next + torch.arange(n, device=self.ring_img.device)) % capacity
        self.ring_img[where] = images.to(self.ring_img.dtype)
        self.ring_txt[where] = texts.to(self.ring_txt.dtype)
        self._ring_next = (self._ring_next + n) % capacity
        self._ring_count = min(capacity, self._ring_count + n)


def _in_key_order(feats: Features):
    """The gathered batch sorted by sample key. Restarts and the ring then depend on which samples form
    the global batch, not on how they were dealt to ranks: 1 and W processes build the same NPN."""
    order = torch.argsort(feats.all_keys, stable=True)
    return feats.all_image[order], feats.all_text[order]


def _jitter(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(rows.shape, generator=generator, dtype=torch.float64).to(rows)
    return F.normalize(F.normalize(rows, dim=1) + noise * (RESAMPLE_NOISE / math.sqrt(rows.shape[1])), dim=1)


def build_neuclip(args, embed_dim: int) -> NeuCLIPEstimator:
    def option(name):  # flags a caller's namespace may lack take NeuCLIP's defaults
        return getattr(args, name, DEFAULTS[name])
    return NeuCLIPEstimator(
        embed_dim, num_protos=args.npn_num_protos, lr=args.npn_lr, repetition=args.npn_repetition,
        restart_every=args.npn_restart_iter, arch=args.npn_arch, objective=args.npn_objective,
        update=args.npn_update, fill=option("npn_fill"), adagrad_reset=option("npn_adagrad_reset"),
        init_scale=option("npn_init_scale"), mlp_lr=option("npn_mlp_lr"),
        seed=getattr(args, "seed", 0), gemm="bf16x3" if getattr(args, "precision", "") == "amp_bf16" else "fp32")
