"""NeuCLIP's normalizer-prediction network and the AmorLIP baseline, checked against the maths.

Single process; the multi-rank behaviour is in test_neuclip_distributed.py.
"""
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import contrastive  # noqa: F401  (registers the estimators)
from contrastive.amorlip import AmorLIPEstimator
from contrastive.core import batch_log_normalizers
from contrastive.estimator_interface import BatchStats
from contrastive.registry import build_estimator
from contrastive.features import Features
from contrastive.neuclip import NeuCLIPEstimator
from contrastive.npn import AdaGrad, PrototypeNPN, unified_objective
from training.params import parse_args

EPS = 1e-6


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


def paired_batch(n, d, seed=0, dtype=torch.float32, clusters=4):
    """Clustered, paired unit embeddings (text = image + noise)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(clusters, d, generator=g, dtype=torch.float64), dim=1)
    img = centers[torch.randint(clusters, (n,), generator=g)] + 0.4 * torch.randn(n, d, generator=g,
                                                                                   dtype=torch.float64)
    txt = img + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(img, dim=1).to(dtype), F.normalize(txt, dim=1).to(dtype)


def step_inputs(img, txt, step=0, scale=None):
    scale = torch.tensor(1 / 0.07, dtype=img.dtype) if scale is None else scale
    feats = Features(img, txt, scale, torch.arange(img.shape[0]), step=step)
    log_img, log_txt = batch_log_normalizers(img @ txt.T, scale, scale, EPS)
    return feats, BatchStats(log_img, log_txt, scale, scale, EPS)


def batch_objective(est, feats, stats):
    """The NPN objective (both modalities) of the estimator's current prediction on the batch."""
    a_img, a_txt = est.predict(feats, stats)
    return (unified_objective(a_img, stats.log_norm_img, stats.scale_img)
            + unified_objective(a_txt, stats.log_norm_txt, stats.scale_txt)).item()


# --------------------------------------------------------------------------------------- the maths

@pytest.mark.parametrize("objective", ["unified", "regression"])
@pytest.mark.parametrize("per_anchor_tau", [False, True])
@pytest.mark.parametrize("eps", [EPS, 0.0])
def test_closed_form_npn_gradient_equals_autograd(objective, per_anchor_tau, eps):
    """The inner loop's hand-derived gradient (PrototypeNPN.value_and_grad) = autograd through `forward`
    and the objective, for prototypes of arbitrary norms, per-anchor or global λ, with and without ε."""
    from contrastive.npn import OBJECTIVES
    img, txt = paired_batch(24, 16, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    npn = PrototypeNPN(40, 16).double()
    with torch.no_grad():
        npn.weight.copy_(torch.randn(40, 16, generator=g, dtype=torch.float64) * torch.rand(40, 1, generator=g,
                                                                                               dtype=torch.float64) * 7)
    pos = (img * txt).sum(1)
    scale = (1 / (0.02 + 0.1 * torch.rand(24, 1, generator=g, dtype=torch.float64)) if per_anchor_tau
             else torch.tensor(1 / 0.03, dtype=torch.float64))
    log_norm = torch.randn(24, generator=g, dtype=torch.float64) + 3
    value, (grad,) = npn.value_and_grad(img, pos, scale, eps, log_norm, objective)
    expected = OBJECTIVES[objective](npn(img, pos, scale, eps), log_norm, scale)
    (expected_grad,) = torch.autograd.grad(expected, [npn.weight])
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().max() > 1e-6  # a zero gradient would pass trivially


def test_closed_form_npn_gradient_stays_finite_at_a_tiny_temperature():
    """λ = 1/0.005: raw exp of the logits overflows fp32; the row-max shift must keep α and ∂J/∂W finite."""
    img, txt = paired_batch(32, 16, seed=4)
    npn = PrototypeNPN(64, 16)
    npn.reset_(txt.repeat(2, 1), 20 * 4.0)
    value, (grad,) = npn.value_and_grad(img, (img * txt).sum(1), torch.tensor(200.0), EPS,
                                        torch.zeros(32), "unified")
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_conjugate_objective_is_minimised_at_the_log_normalizer():
    """min_α exp(−α)(ε+g) + α is attained at α* = log(ε+g) with value log(ε+g) + 1 (eq. 5 subtracts 1)."""
    g = torch.tensor([1e-3, 0.2, 1.0, 5.0, 20.0], dtype=torch.float64)
    log_norm = torch.log(EPS + g)
    one = torch.tensor(1.0, dtype=torch.float64)
    alpha = torch.zeros_like(g, requires_grad=True)
    for _ in range(600):  # plain gradient descent on the (convex) per-anchor objectives
        (grad,) = torch.autograd.grad(unified_objective(alpha, log_norm, one) * len(g), alpha)
        with torch.no_grad():
            alpha -= 0.1 * grad
    torch.testing.assert_close(alpha.detach(), log_norm, rtol=0, atol=1e-9)

    at_optimum = log_norm.clone().requires_grad_(True)
    per_anchor = torch.exp(log_norm - at_optimum) + at_optimum
    (stationary,) = torch.autograd.grad(per_anchor.sum(), at_optimum)
    torch.testing.assert_close(stationary, torch.zeros_like(g), rtol=0, atol=1e-12)
    torch.testing.assert_close(per_anchor.detach() - 1, log_norm, rtol=0, atol=1e-12)
    nearby = torch.exp(log_norm - (log_norm + 0.1)) + log_norm + 0.1
    assert (nearby > per_anchor.detach()).all()


@pytest.mark.parametrize("per_anchor_scale", [False, True])
def test_prototypes_equal_to_all_texts_give_the_exact_normalizer_plus_self_term(per_anchor_scale):
    """With W = all n other-modality embeddings, (1/n)Σ_j includes j = i (term exp(0) = 1) while
    g_i = 1/(n−1) Σ_{j≠i}, so exp(α_i) − ε = (1 + (n−1)·g_i)/n exactly."""
    n, d = 12, 8
    img, txt = paired_batch(n, d, seed=3, dtype=torch.float64)
    scale = (torch.linspace(5, 20, n, dtype=torch.float64) if per_anchor_scale
             else torch.tensor(1 / 0.05, dtype=torch.float64))
    log_img, log_txt = batch_log_normalizers(img @ txt.T, scale, scale, EPS)
    pos = (img * txt).sum(-1)
    column = scale[:, None] if per_anchor_scale else scale
    for anchors, others, log_norm in ((img, txt, log_img), (txt, img, log_txt)):
        npn = PrototypeNPN(n, d).double()
        npn.reset_(others, norm=7.0)  # the norm must not matter: α sees directions only
        alpha = npn(anchors, pos, column, EPS)
        g = log_norm.exp() - EPS
        torch.testing.assert_close(alpha.exp() - EPS, (1 + (n - 1) * g) / n, rtol=1e-10, atol=0)


def test_alpha_is_a_log_sum_exp_at_tiny_temperature():
    """exp((cos − s_ii)/τ) overflows fp32 at τ = 0.001; α must stay finite (log-sum-exp)."""
    img, txt = paired_batch(16, 8, seed=1)
    npn = PrototypeNPN(16, 8)
    npn.reset_(-img, norm=1.0)  # far from the anchors: huge negative logits
    pos = torch.full((16,), -1.0)  # positive similarity far below: huge positive logits
    alpha = npn(img, pos, torch.tensor(1000.0), EPS)
    assert torch.isfinite(alpha).all() and (alpha > 50).all()


def test_adagrad_matches_torch_adagrad():
    w = torch.randn(5, 3, dtype=torch.float64)
    ref = w.clone().requires_grad_(True)
    opt = torch.optim.Adagrad([ref], lr=0.3, eps=1e-10)
    mine = AdaGrad([w], lr=0.3).double()
    for k in range(4):
        grad = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        ref.grad = grad.clone()
        opt.step()
        mine.step_([w], [grad])
    torch.testing.assert_close(w, ref.detach(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------- Algorithm 1

def test_inner_loop_lowers_the_npn_objective_on_the_batch():
    img, txt = paired_batch(64, 16, seed=2)
    feats, stats = step_inputs(img, txt)
    est = NeuCLIPEstimator(16, num_protos=32, repetition=10)
    out = est.prepare(feats, stats)
    after = batch_objective(est, feats, stats)
    assert after < out["npn_objective_first"].item() - 1e-3
    assert out["npn_objective_last"].item() < out["npn_objective_first"].item()


def test_default_first_adagrad_step_keeps_the_restart_initialisation():
    """The lr decision: after a restart AdaGrad's first step is ±lr per coordinate. With prototypes of
    RMS coordinate init_scale (default 20) and lr 1.0 it turns each prototype by ≈ lr/init_scale = 0.05
    rad, so the restart's summary of the data survives: the error on held-out anchors (exact normalizers
    over a 512-sample pool, the batch is 64 of them) barely moves. Unit-norm prototypes at lr 1.0 are
    turned by ≈ 45° (cos ≈ 1/√2) and the held-out error roughly doubles."""
    d = 32
    img, txt = paired_batch(512, d, seed=0)
    feats, stats = step_inputs(img[:64], txt[:64])
    pool_feats, pool_stats = step_inputs(img, txt)
    held_out = slice(64, None)

    def held_out_error(est):
        a_img, a_txt = est.predict(pool_feats, pool_stats)
        return ((a_img - pool_stats.log_norm_img)[held_out].square().mean()
                + (a_txt - pool_stats.log_norm_txt)[held_out].square().mean()).item()

    defaults = parse_args(["--fastclip", "--npn", "--npn_num_protos", "32", "--npn_repetition", "1"])
    result = {}
    for name, scale in (("default", defaults.npn_init_scale), ("unit_norm", 1 / math.sqrt(d))):
        est = NeuCLIPEstimator(d, num_protos=32, lr=defaults.npn_lr, repetition=1, init_scale=scale,
                               adagrad_reset=defaults.npn_adagrad_reset)
        est._maybe_restart(feats, stats)
        init, error_at_restart = est.npn_img.weight.detach().clone(), held_out_error(est)
        est._inner_loop(feats, stats)
        cosines = F.cosine_similarity(est.npn_img.weight, init, dim=1)
        result[name] = (cosines, held_out_error(est) / error_at_restart)
    cos_default, ratio_default = result["default"]
    cos_unit, ratio_unit = result["unit_norm"]
    assert cos_default.min() > math.cos(1.5 / defaults.npn_init_scale) and ratio_default < 1.05
    assert cos_unit.mean() < 0.8 and ratio_unit > 1.5


def test_restarts_follow_the_schedule_and_reset_adagrad():
    img, txt = paired_batch(32, 8, seed=5)
    for restart_every, expected in ((3, [0, 3, 6]), (0, [0])):
        est = NeuCLIPEstimator(8, num_protos=16, repetition=2, restart_every=restart_every)
        restarts = [step for step in range(8) if est.prepare(*step_inputs(img, txt, step))["npn_restart"]]
        assert restarts == expected
    for policy in ("restart", "never"):
        est = NeuCLIPEstimator(8, num_protos=16, repetition=2, restart_every=2, adagrad_reset=policy)
        est.prepare(*step_inputs(img, txt, 0))
        est.prepare(*step_inputs(img, txt, 1))
        accumulated = est.optimizer.sum_sq_0.clone()
        assert accumulated.abs().sum() > 0
        est._maybe_restart(*step_inputs(img, txt, 2))
        kept = est.optimizer.sum_sq_0
        assert torch.equal(kept, accumulated) if policy == "never" else (kept == 0).all()


@pytest.mark.parametrize("fill", ["ring", "resample"])
def test_restart_with_more_prototypes_than_the_global_batch(fill):
    n, d, m = 16, 8, 40
    batches = [paired_batch(n, d, seed=10 + s) for s in range(4)]
    est = NeuCLIPEstimator(d, num_protos=m, repetition=1, restart_every=3, fill=fill, init_scale=1.0)
    for step, (img, txt) in enumerate(batches[:3]):
        est.prepare(*step_inputs(img, txt, step))
    est._maybe_restart(*step_inputs(*batches[3], 3))  # inspect the rows before training moves them
    protos_img_side = F.normalize(est.npn_img.weight.detach(), dim=1)  # text embeddings
    protos_txt_side = F.normalize(est.npn_txt.weight.detach(), dim=1)  # the matching images
    assert protos_img_side.shape == (m, d) and protos_txt_side.shape == (m, d)
    img3, txt3 = batches[3]
    torch.testing.assert_close(protos_img_side[:n], txt3, rtol=0, atol=1e-6)  # the whole batch first
    torch.testing.assert_close(protos_txt_side[:n], img3, rtol=0, atol=1e-6)
    if fill == "ring":  # then the most recent earlier batches, newest first, still paired
        earlier_txt = torch.cat([batches[2][1].flip(0), batches[1][1].flip(0)])[:m - n]
        earlier_img = torch.cat([batches[2][0].flip(0), batches[1][0].flip(0)])[:m - n]
        torch.testing.assert_close(protos_img_side[n:], earlier_txt, rtol=0, atol=1e-6)
        torch.testing.assert_close(protos_txt_side[n:], earlier_img, rtol=0, atol=1e-6)
    else:  # noisy copies of this batch's rows, distinct from one another
        nearest = (protos_img_side[n:] @ txt3.T).max(dim=1).values
        assert (nearest > 0.99).all() and (nearest < 1 - 1e-7).all()
    # m > N at the first step too (empty ring): no crash, m rows
    first = NeuCLIPEstimator(d, num_protos=m, repetition=1, fill=fill)
    first.prepare(*step_inputs(*batches[0], 0))
    assert first.npn_img.weight.shape == (m, d) and torch.isfinite(first.npn_img.weight).all()


def test_restart_depends_on_seed_step_and_the_samples_not_their_order():
    img, txt = paired_batch(64, 8, seed=6)
    shuffle = torch.randperm(64, generator=torch.Generator().manual_seed(0))

    def restarted(seed, step, order=torch.arange(64)):
        est = NeuCLIPEstimator(8, num_protos=16, repetition=1, seed=seed)
        feats, stats = step_inputs(img[order], txt[order], step)
        feats.keys = order  # the samples' keys travel with them
        est._maybe_restart(feats, stats)
        return est.npn_img.weight.detach()
    assert torch.equal(restarted(0, 5), restarted(0, 5))
    assert torch.equal(restarted(0, 5), restarted(0, 5, shuffle))  # e.g. dealt differently to ranks
    assert not torch.equal(restarted(0, 5), restarted(1, 5))
    assert not torch.equal(restarted(0, 5), restarted(0, 6))


def test_estimate_covers_every_gathered_anchor_and_is_detached():
    img, txt = paired_batch(24, 8, seed=7)
    feats, stats = step_inputs(img.requires_grad_(True), txt)
    est = NeuCLIPEstimator(8, num_protos=8, repetition=2)
    est.prepare(feats, stats)
    estimate = est.estimate(feats, stats)
    assert estimate.a_img.shape == (24,) and estimate.a_txt.shape == (24,)
    assert not estimate.a_img.requires_grad and estimate.extra_loss is None
    assert est.trainable_parameter_groups() == []
    assert est.scalars()["npn_time_ms"] > 0


# ------------------------------------------------------------------------------------- ablations

def test_simultaneous_update_trains_the_npn_through_extra_loss_only():
    img, txt = paired_batch(32, 8, seed=8)
    img.requires_grad_(True)
    est = NeuCLIPEstimator(8, num_protos=16, update="simultaneous")
    feats, stats = step_inputs(img, txt)
    assert est.prepare(feats, stats)["npn_restart"] == 1.0
    estimate = est.estimate(feats, stats)
    groups = est.trainable_parameter_groups()
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in est.parameters()}
    assert groups[0]["weight_decay"] == 0.0 and not estimate.a_img.requires_grad
    estimate.extra_loss.backward()
    assert img.grad is None  # encoder features are detached in the NPN objective
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in est.parameters())


ABLATIONS = {
    "prototype": {},
    "mlp": {"arch": "mlp"},
    "regression": {"objective": "regression"},
    "simultaneous": {"update": "simultaneous"},
    "never_restart": {"restart_every": 0, "adagrad_reset": "never"},
    "ring_fill": {"num_protos": 48, "restart_every": 2},
}


def run_steps(est, batches, first_step=0, main_optimizer=None):
    for k, (img, txt) in enumerate(batches):
        feats, stats = step_inputs(img, txt, first_step + k)
        feats.epoch = (first_step + k) // 2
        est.on_epoch_start(feats.epoch)
        est.prepare(feats, stats)
        estimate = est.estimate(feats, stats)
        if estimate.extra_loss is not None:
            main_optimizer.zero_grad()
            estimate.extra_loss.backward()
            main_optimizer.step()
    return feats, stats


def only_tensors_and_primitives(value) -> bool:
    if isinstance(value, dict):
        return all(only_tensors_and_primitives(v) for v in value.values())
    return isinstance(value, (torch.Tensor, int, float, bool, str, type(None)))


@pytest.mark.parametrize("name", list(ABLATIONS) + ["amorlip", "amorlip_mix"])
def test_state_round_trips_into_a_fresh_estimator(name):
    d = 8

    def make():
        if name.startswith("amorlip"):
            return AmorLIPEstimator(d, repetition=3, target_mix=0.8 if name == "amorlip_mix" else 0.0,
                                    mix_epochs=2)
        return NeuCLIPEstimator(d, **{"num_protos": 16, "repetition": 3, "restart_every": 3, **ABLATIONS[name]})
    batches = [paired_batch(24, d, seed=20 + s) for s in range(6)]
    est = make()

    def sgd(e):  # the main optimizer's part: only the simultaneous ablation gives it NPN parameters
        groups = e.trainable_parameter_groups()
        return torch.optim.SGD(groups, lr=0.1) if groups else None
    feats, stats = run_steps(est, batches[:4], main_optimizer=sgd(est))

    state = est.state_dict()
    assert only_tensors_and_primitives(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for a, b in zip(est.predict(feats, stats), fresh.predict(feats, stats)):
        assert torch.equal(a, b)
    # ... and the two keep training identically (restart bookkeeping, ring, optimizer state)
    feats, stats = run_steps(est, batches[4:], 4, sgd(est))
    feats2, stats2 = run_steps(fresh, batches[4:], 4, sgd(fresh))
    for a, b in zip(est.predict(feats, stats), fresh.predict(feats2, stats2)):
        assert torch.equal(a, b)
    assert all(torch.isfinite(x).all() for x in est.predict(feats, stats))


# --------------------------------------------------------------------------------------- AmorLIP

def test_amorlip_fits_the_batch_and_serves_the_ema_network():
    d = 8
    img, txt = paired_batch(64, d, seed=30)
    feats, stats = step_inputs(img, txt)
    est = AmorLIPEstimator(d, repetition=20, lr=1e-2)
    est.on_epoch_start(0)
    losses = [est.prepare(feats, stats)["amorlip_loss"].item() for _ in range(5)]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        ema_prediction = est.ema_img(img)
    torch.testing.assert_close(est.estimate(feats, stats).a_img, ema_prediction)
    online_before = est.online_img.fc1.weight.detach().clone()
    ema_before = est.ema_img.fc1.weight.detach().clone()
    est.on_epoch_start(1)  # re-created at the epoch's first batch; the EMA network survives it
    assert torch.equal(est.online_img.fc1.weight, online_before)
    est.prepare(feats, stats)
    assert not torch.equal(est.online_img.fc1.weight, online_before)
    assert (est.ema_img.fc1.weight - ema_before).abs().max() < 0.5
    assert est.adam.steps.item() == 20  # a fresh Adam for the new network


# ------------------------------------------------------------------------------------------ flags

def test_flags_build_both_estimators():
    args = parse_args(["--fastclip", "--npn", "--npn_num_protos", "64", "--npn-init-scale", "5",
                       "--npn_adagrad_reset", "never", "--npn_fill", "resample", "--npn_arch", "prototype"])
    est = build_estimator(args.estimator, args, 16)
    assert isinstance(est, NeuCLIPEstimator) and est.objective == "unified"
    assert (est.init_scale, est.adagrad_reset, est.fill, est.num_protos) == (5.0, "never", "resample", 64)
    args = parse_args(["--fastclip", "--amorlip", "--amorlip_ema", "0.9", "--amorlip_target_mix", "0.5"])
    est = build_estimator(args.estimator, args, 16)
    assert isinstance(est, AmorLIPEstimator) and (est.ema_beta, est.target_mix) == (0.9, 0.5)
    assert getattr(est, "objective", "log") == "log"
    minimal = SimpleNamespace(npn_num_protos=8, npn_lr=1.0, npn_repetition=1, npn_restart_iter=5,
                              npn_arch="mlp", npn_objective="regression", npn_update="alternating")
    assert build_estimator("npn", minimal, 16).arch == "mlp"
