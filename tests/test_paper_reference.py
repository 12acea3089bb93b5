"""NeuCLIP's Algorithm 1, step by step, against a slow re-statement of the paper written here in float64.

The method is built as the trainer builds it (flags → `build_method`), fed several steps of fixed
features, and compared after every step with `PaperNeuCLIP` below, which follows the paper literally:

  for each step t:
    3–5  restart when t = 0 or t mod T_r = 0: W_1 := the batch's text embeddings, W_2 := the matching
         image embeddings (rows in sample-key order; m < N: the generator's random subset; m > N: the batch,
         then the most recent rows of earlier batches, then noisy copies), each scaled to norm init·√d,
         AdaGrad state zeroed;
    6–9  T_u AdaGrad steps on eq. 12 with the encoders fixed, gradients by autograd through eqs. 10–11;
    10   α from the UPDATED NPNs;
    11   the encoder gradient of eq. 12 with α held fixed.

Nothing is shared with the implementation except `seeded_generator` (which random subset a restart takes).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import contrastive  # noqa: F401  (registers methods and estimators)
from contrastive import Features, build_method
from contrastive.npn import seeded_generator
from training.params import parse_args

N, DIM, EPS, RHO, DATA_SIZE = 8, 6, 1e-6, 0.5, 40
T_U, T_R, STEPS, LR, INIT = 3, 3, 5, 0.7, 2.0
ADAGRAD_EPS, NOISE = 1e-10, 0.05

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


class TinyCLIP(nn.Module):
    """What the method reads from an open_clip model: logit_scale and the embedding width."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.text_projection = nn.Parameter(torch.zeros(3, DIM))


def build(m: int, per_sample: bool, tau_grad: str = "exact"):
    scheme = "individual_constant" if per_sample else "global_learnable"
    args = parse_args(["--fastclip", "--npn", "--multiply_tau", "--temperature_scheme", scheme,
                       "--rho", str(RHO), "--fastclip_eps", str(EPS), "--data_size", str(DATA_SIZE),
                       "--npn_num_protos", str(m), "--npn_repetition", str(T_U), "--npn_restart_iter", str(T_R),
                       "--npn_lr", str(LR), "--npn-init-scale", str(INIT), "--tau_grad", tau_grad,
                       "--seed", "3"])
    model = TinyCLIP()
    method = build_method(args.method, args, model).double()  # per-sample tables stay float32
    return method, model, args.seed


def step_data(step: int):
    """Raw (unnormalised) leaves and distinct, shuffled sample keys for one step."""
    g = torch.Generator().manual_seed(1000 + step)
    img = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    txt = img + 0.7 * torch.randn(N, DIM, generator=g, dtype=torch.float64)
    keys = torch.randperm(DATA_SIZE, generator=g)[:N]
    return img.requires_grad_(), txt.requires_grad_(), keys


def per_sample_taus():
    """τ per key and modality, float32-representable (the table stores float32); image ≠ text."""
    g = torch.Generator().manual_seed(7)
    tau_img = (0.04 + 0.2 * torch.rand(DATA_SIZE, generator=g)).double()
    tau_txt = (0.04 + 0.2 * torch.rand(DATA_SIZE, generator=g)).double()
    return tau_img, tau_txt


# ------------------------------------------------------------------------------- the paper, literally

def batch_normalizer(sim, lam):
    """g_i = 1/(N−1) Σ_{j≠i} exp((s_ij − s_ii)·λ_i) for the rows of `sim`."""
    n = sim.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    return ((sim - sim.diagonal()[:, None]) * lam[:, None]).exp().mul(off).sum(1) / (n - 1)


def npn_alpha(W, anchors, positive, lam):
    """Eqs. 10–11: α(x_i) = log(ε + 1/m Σ_j exp((cos(e_i, W_j) − s_ii)·λ_i))."""
    cos = anchors @ F.normalize(W, dim=1).T
    return torch.log(EPS + ((cos - positive[:, None]) * lam[:, None]).exp().mean(1))


def eq12(alpha_img, alpha_txt, g_img, g_txt, tau_img, tau_txt):
    """Eq. 12 on the batch: Σ_m mean_i τ_i[exp(−α_i)(ε + g_i) + α_i] + 2τ(ρ − 1) (per-anchor τ allowed)."""
    return ((tau_img * (torch.exp(-alpha_img) * (EPS + g_img) + alpha_img - 1 + RHO)).mean()
            + (tau_txt * (torch.exp(-alpha_txt) * (EPS + g_txt) + alpha_txt - 1 + RHO)).mean())


class PaperNeuCLIP:
    def __init__(self, m: int, seed: int):
        self.m, self.seed = m, seed
        self.W1 = self.W2 = self.G1 = self.G2 = None
        self.history = []  # earlier batches' (image, text) rows in key order, oldest first

    def restart_rows(self, step, img, txt):
        gen = seeded_generator(self.seed, step)
        if self.m <= N:
            pick = torch.randperm(N, generator=gen)[:self.m]
            return txt[pick], img[pick]
        rows_t, rows_i = [txt], [img]
        earlier_i = torch.cat([b[0] for b in self.history]) if self.history else img[:0]
        earlier_t = torch.cat([b[1] for b in self.history]) if self.history else txt[:0]
        take = min(self.m - N, earlier_i.shape[0])
        if take:  # the most recent first
            rows_i.append(earlier_i[-take:].flip(0))
            rows_t.append(earlier_t[-take:].flip(0))
        missing = self.m - N - take
        if missing:
            pick = torch.randint(N, (missing,), generator=gen)
            for rows, source in ((rows_t, txt), (rows_i, img)):
                noise = torch.randn((missing, DIM), generator=gen, dtype=torch.float64)
                rows.append(F.normalize(F.normalize(source[pick], dim=1) + noise * NOISE / math.sqrt(DIM), dim=1))
        return torch.cat(rows_t), torch.cat(rows_i)

    def step(self, step, img, txt, keys, lam_img, lam_txt):
        """Lines 3–10 for one step. `img`, `txt`: detached unit embeddings; λ per anchor ([N])."""
        order = torch.argsort(keys)
        if step == 0 or step % T_R == 0:  # line 3: BEFORE the T_u updates
            rows_t, rows_i = self.restart_rows(step, img[order], txt[order])
            self.W1 = F.normalize(rows_t, dim=1) * INIT * math.sqrt(DIM)  # image side := TEXT rows
            self.W2 = F.normalize(rows_i, dim=1) * INIT * math.sqrt(DIM)
            self.G1, self.G2 = torch.zeros_like(self.W1), torch.zeros_like(self.W2)
        self.history.append((img[order], txt[order]))
        sim = img @ txt.T
        pos = sim.diagonal()
        g_img, g_txt = batch_normalizer(sim, lam_img), batch_normalizer(sim.T, lam_txt)
        alpha_before = self.alphas(img, txt, pos, lam_img, lam_txt)
        for _ in range(T_U):  # lines 6–9
            W1, W2 = self.W1.clone().requires_grad_(), self.W2.clone().requires_grad_()
            objective = eq12(npn_alpha(W1, img, pos, lam_img), npn_alpha(W2, txt, pos, lam_txt),
                             g_img, g_txt, 1 / lam_img, 1 / lam_txt)
            d1, d2 = torch.autograd.grad(objective, [W1, W2])
            self.G1, self.G2 = self.G1 + d1 * d1, self.G2 + d2 * d2
            self.W1 = self.W1 - LR * d1 / (self.G1.sqrt() + ADAGRAD_EPS)
            self.W2 = self.W2 - LR * d2 / (self.G2.sqrt() + ADAGRAD_EPS)
        return alpha_before, self.alphas(img, txt, pos, lam_img, lam_txt)  # line 10: the updated NPNs

    def alphas(self, img, txt, pos, lam_img, lam_txt):
        return npn_alpha(self.W1, img, pos, lam_img), npn_alpha(self.W2, txt, pos, lam_txt)


def encoder_objective(raw_img, raw_txt, logit_scale, lam_img, lam_txt, alpha_img, alpha_txt):
    """Line 11's objective: eq. 12 as a function of the encoders' outputs (and a global τ), α given."""
    img, txt = F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1)
    if logit_scale is not None:  # one learnt τ: λ = exp(logit_scale) everywhere
        lam_img = lam_txt = logit_scale.exp().expand(N)
    sim = img @ txt.T
    return eq12(alpha_img, alpha_txt, batch_normalizer(sim, lam_img), batch_normalizer(sim.T, lam_txt),
                1 / lam_img, 1 / lam_txt)


# ------------------------------------------------------------------------------------------- tests

def run_against_paper(m: int, per_sample: bool, check):
    method, model, seed = build(m, per_sample)
    paper = PaperNeuCLIP(m, seed)
    taus = per_sample_taus()
    if per_sample:
        method.temperature.table.tau_img.copy_(taus[0])
        method.temperature.table.tau_txt.copy_(taus[1])
    for step in range(STEPS):
        raw_img, raw_txt, keys = step_data(step)
        feats = Features(F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1), model.logit_scale.exp(),
                         keys, step=step)
        method.before_encoder_step(feats)
        out = method(feats)
        wrt = [raw_img, raw_txt] + ([] if per_sample else [model.logit_scale])
        got = torch.autograd.grad(out.loss, wrt)

        if per_sample:
            lam_img, lam_txt = 1 / taus[0][keys], 1 / taus[1][keys]
        else:
            lam_img = lam_txt = model.logit_scale.detach().exp().expand(N)
        img, txt = F.normalize(raw_img.detach(), dim=1), F.normalize(raw_txt.detach(), dim=1)
        alpha_before, alpha_after = paper.step(step, img, txt, keys, lam_img, lam_txt)
        logit_scale = None if per_sample else model.logit_scale
        ref_objective = encoder_objective(raw_img, raw_txt, logit_scale, lam_img, lam_txt, *alpha_after)
        expected = torch.autograd.grad(ref_objective, wrt)
        check(step, method, feats, out, got, expected, paper, alpha_before, alpha_after,
              lambda alphas: torch.autograd.grad(
                  encoder_objective(raw_img, raw_txt, logit_scale, lam_img, lam_txt, *alphas), wrt))
        method.after_encoder_step(feats)


@pytest.mark.parametrize("per_sample", [False, True], ids=["global_tau", "per_sample_tau"])
@pytest.mark.parametrize("m", [5, N, N + 4], ids=["m<N", "m=N", "m>N"])
def test_algorithm_1_step_by_step_equals_the_paper(m, per_sample):
    """Catches: a restart seeding an NPN with the wrong modality's embeddings (any m), a restart after the
    T_u steps instead of before, the encoder using α from before the inner loop, the text NPN using the
    image anchors' temperatures (per-sample τ), wrong AdaGrad maths or count of inner steps, a restart
    schedule off by one, wrong ring/resample rows for m > N, a wrong τ gradient of eq. 12."""
    def check(step, method, feats, out, got, expected, paper, alpha_before, alpha_after, grad_at):
        est = method.estimator
        torch.testing.assert_close(est.npn_img.weight, paper.W1, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(est.npn_txt.weight, paper.W2, rtol=1e-9, atol=1e-10)
        a_img, a_txt = method.log_normalizers(feats)  # the estimator's current α (no state change)
        torch.testing.assert_close(a_img, alpha_after[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a_txt, alpha_after[1], rtol=1e-10, atol=1e-10)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
        # The test has power: α from before the inner loop gives a clearly different encoder gradient.
        stale = grad_at(alpha_before)
        assert max((s - e).abs().max() / e.abs().max() for s, e in zip(stale, expected)) > 1e-3
    run_against_paper(m, per_sample, check)


def test_encoder_step_holds_alpha_fixed():
    """Pins the design choice (README): the encoder gradient is eq. 12's with α DETACHED (exact at α = α*,
    what Algorithm 1 line 11 does), not the full derivative through α(W; e_i) — which differs on random
    features. Catches a change that lets the encoders' gradient flow through the NPN's prediction."""
    def check(step, method, feats, out, got, expected, paper, alpha_before, alpha_after, grad_at):
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
        if step != STEPS - 1:
            return
        raw_img, raw_txt = (t.detach().requires_grad_() for t in step_data(step)[:2])
        img, txt = F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1)
        lam = torch.full((N,), 1 / 0.07, dtype=torch.float64)
        pos = (img * txt).sum(1)
        alive = paper.alphas(img, txt, pos, lam, lam)  # α as a function of the embeddings
        full = torch.autograd.grad(encoder_objective(raw_img, raw_txt, None, lam, lam, *alive), [raw_img, raw_txt])
        fixed = torch.autograd.grad(encoder_objective(raw_img, raw_txt, None, lam, lam,
                                                      *(a.detach() for a in alive)), [raw_img, raw_txt])
        torch.testing.assert_close(fixed[0], expected[0], rtol=1e-9, atol=1e-11)
        relative = max((f - x).norm() / x.norm() for f, x in zip(full, fixed))
        assert relative > 0.05, f"full derivative through α differs by only {relative:.3g}"
    run_against_paper(N, False, check)
