"""The gcl method's gradients against the objectives they claim to follow (one process, float64)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from contrastive import Features, build_method
from contrastive.moving_average import MiniBatchEstimator, MovingAverageEstimator
from contrastive.gcl import GlobalContrastiveMethod, embed_dim
from contrastive.temperature import GlobalTemperature, IndividualTemperatures, adam_step, per_sample_tau_gradient

N, DIM, RHO = 8, 5, 0.7


def make_args(**overrides):
    args = dict(temperature_scheme="global_learnable", multiply_tau=False, rho=RHO, temperature=0.1,
                fastclip_eps=1e-6, gamma=0.5, gamma_schedule="constant", gamma_decay_epochs=4,
                data_size=32, estimator="minibatch", tau_grad="exact", lr=1e-3, lr_tau=1e-2,
                beta1=0.9, beta2=0.98, eps=1e-6)
    args.update(overrides)
    return SimpleNamespace(**args)


class TinyCLIP(nn.Module):
    """Only what the method reads from an open_clip model: logit_scale and the embedding width."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        self.text_projection = nn.Parameter(torch.zeros(3, DIM))


def leaves(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, DIM, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]


def features(raw_img, raw_txt, logit_scale, keys=None):
    keys = torch.arange(raw_img.shape[0]) if keys is None else keys
    return Features(F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1), logit_scale.exp(), keys)


def log_normalizers(img, txt, scale_img, scale_txt, eps):
    """Direct log(ε + g_i) for image rows and text columns, per-anchor scales allowed."""
    n = img.shape[0]
    sim = img @ txt.T
    off_diagonal = ~torch.eye(n, dtype=torch.bool)

    def side(s, scale):
        diff = (s - s.diagonal()[:, None]) * scale
        return torch.log(eps + (diff.exp() * off_diagonal).sum(1) / (n - 1))

    return side(sim, scale_img), side(sim.T, scale_txt)


def global_objective(raw_img, raw_txt, logit_scale, eps, robust, rho=RHO):
    """v0: Σ_m mean log(ε + g); v3: τ·that + 2ρτ."""
    lam = logit_scale.exp()
    l_img, l_txt = log_normalizers(F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1), lam, lam, eps)
    value = l_img.mean() + l_txt.mean()
    return value / lam + 2 * rho / lam if robust else value


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def run_method(method, raw_img, raw_txt, logit_scale, keys=None):
    feats = features(raw_img, raw_txt, logit_scale, keys)
    method.before_encoder_step(feats)
    out = method(feats)
    wrt = [raw_img, raw_txt] + ([logit_scale] if logit_scale.requires_grad else [])
    return out, grads(out.loss, wrt), feats


def build(args, model=None):
    model = model or TinyCLIP()
    return build_method("gcl", args, model), model


def assert_all_close(actual, expected, rtol=1e-9, atol=1e-11):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------- v0 / v3

@pytest.mark.parametrize("robust", [False, True], ids=["v0", "v3"])
def test_gradient_is_the_global_objectives_with_exact_normalizers(robust):
    method, model = build(make_args(multiply_tau=robust))
    raw_img, raw_txt = leaves()
    out, got, _ = run_method(method, raw_img, raw_txt, model.logit_scale)
    objective = global_objective(raw_img, raw_txt, model.logit_scale, 1e-6, robust)
    assert_all_close(got, grads(objective, [raw_img, raw_txt, model.logit_scale]))
    torch.testing.assert_close(out.terms["loss"], objective.detach())
    # The reference objective itself, by central differences along a random direction.
    direction = [torch.randn_like(t) for t in (raw_img, raw_txt, model.logit_scale)]
    h = 1e-6
    with torch.no_grad():
        def shifted(sign):
            return global_objective(*(t + sign * h * d for t, d in zip((raw_img, raw_txt, model.logit_scale),
                                                                         direction)), 1e-6, robust)
        finite_difference = (shifted(1) - shifted(-1)) / (2 * h)
    analytic = sum((g * d).sum() for g, d in zip(got, direction))
    torch.testing.assert_close(analytic, finite_difference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("robust", [False, True], ids=["v0", "v3"])
def test_moving_average_with_true_normalizers_gives_the_global_gradient(robust):
    args = make_args(multiply_tau=robust, estimator="moving_average")
    model = TinyCLIP()
    temperature = GlobalTemperature(model.logit_scale, args.temperature, True, robust, RHO)
    estimator = MovingAverageEstimator(args.data_size, 0.5, "constant", 4, state_dtype=torch.float64)
    method = GlobalContrastiveMethod(estimator, temperature, args.fastclip_eps)
    raw_img, raw_txt = leaves()
    keys = torch.tensor([3, 1, 4, 15, 9, 2, 6, 5])
    objective = global_objective(raw_img, raw_txt, model.logit_scale, args.fastclip_eps, robust)
    expected = grads(objective, [raw_img, raw_txt, model.logit_scale])

    method.on_epoch_start(0)  # γ = 1: u is the batch's ε + g
    _, first, _ = run_method(method, raw_img, raw_txt, model.logit_scale, keys)
    assert_all_close(first, expected)
    method.on_epoch_start(1)  # γ = 0.5, and u already equals ε + g for these features
    _, second, _ = run_method(method, raw_img, raw_txt, model.logit_scale, keys)
    assert_all_close(second, expected)


@pytest.mark.parametrize("robust", [False, True], ids=["v0", "v3"])
def test_minibatch_estimator_matches_open_clip_cliploss(robust):
    """With ε = 1/(N−1): log(ε + g_i) = CE_i − log(N−1), so GCL = 2·ClipLoss − 2·log(N−1) (ClipLoss
    averages the two directions, GCL sums them) and RGCL-g = τ·GCL + 2ρτ."""
    method, model = build(make_args(multiply_tau=robust, fastclip_eps=1 / (N - 1)))
    raw_img, raw_txt = leaves(seed=1)
    out, got, _ = run_method(method, raw_img, raw_txt, model.logit_scale)

    wrt = [raw_img, raw_txt, model.logit_scale]
    clip = ClipLoss()(F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1), model.logit_scale.exp())
    clip_grads = grads(clip, wrt)
    tau = 1 / model.logit_scale.detach().exp()
    gcl_value = 2 * clip.detach() - 2 * math.log(N - 1)
    if not robust:
        expected = [2 * g for g in clip_grads]
        torch.testing.assert_close(out.terms["loss"], gcl_value)
    else:
        expected = [2 * tau * g for g in clip_grads[:2]]
        # d/dt of τ·(2·ClipLoss − 2 log(N−1)) + 2ρτ with τ = exp(−t)
        expected.append(-tau * (gcl_value + 2 * RHO) + 2 * tau * clip_grads[2])
        torch.testing.assert_close(out.terms["loss"], tau * gcl_value + 2 * RHO * tau)
    assert_all_close(got, expected)


@pytest.mark.parametrize("robust", [False, True], ids=["v0", "v3"])
def test_reference_tau_gradient_counts_the_data_term_twice(robust):
    raw_img, raw_txt = leaves(seed=2)
    exact_method, exact_model = build(make_args(multiply_tau=robust))
    reference_method, reference_model = build(make_args(multiply_tau=robust, tau_grad="reference"))
    exact_out, exact, _ = run_method(exact_method, raw_img, raw_txt, exact_model.logit_scale)
    _, reference, _ = run_method(reference_method, raw_img, raw_txt, reference_model.logit_scale)
    assert_all_close(reference[:2], exact[:2])  # encoders: unchanged
    # ∇_t reference = ∇_t exact + T·∂D/∂t = 2·∇_t exact + τ·Σ_m (mean ℓ + ρ_T), the last being the
    # logged value of v3 and absent for v0 (T = 1 does not depend on t).
    extra = exact_out.terms["loss"] if robust else 0.0
    torch.testing.assert_close(reference[2], 2 * exact[2] + extra)
    assert not torch.allclose(reference[2], exact[2])


# ----------------------------------------------------------------------------- unified objective

class UnifiedMiniBatch(MiniBatchEstimator):
    objective = "unified"


class ShiftedMiniBatch(MiniBatchEstimator):
    """Estimates off by a fixed amount, to see each objective away from its optimum."""

    def __init__(self, shift, objective="log"):
        super().__init__()
        self.shift, self.objective = shift, objective

    def estimate(self, feats, stats):
        est = super().estimate(feats, stats)
        return type(est)(est.a_img + self.shift, est.a_txt - self.shift)


def method_with(estimator, robust=True, tau=0.1):
    model = TinyCLIP()
    temperature = GlobalTemperature(model.logit_scale, tau, True, robust, RHO)
    return GlobalContrastiveMethod(estimator, temperature, 1e-6), model


@pytest.mark.parametrize("robust", [False, True], ids=["v0", "v3"])
def test_unified_objective_equals_rgcl_at_the_true_normalizers(robust):
    raw_img, raw_txt = leaves(seed=3)
    log_method, log_model = method_with(MiniBatchEstimator(), robust)
    unified_method, unified_model = method_with(UnifiedMiniBatch(), robust)
    log_out, log_grads, _ = run_method(log_method, raw_img, raw_txt, log_model.logit_scale)
    unified_out, unified_grads, _ = run_method(unified_method, raw_img, raw_txt, unified_model.logit_scale)
    assert_all_close(unified_grads, log_grads)
    torch.testing.assert_close(unified_out.terms["loss"], log_out.terms["loss"])


def test_unified_objective_gradient_is_eq12s_for_fixed_estimates():
    shift = 0.3
    method, model = method_with(ShiftedMiniBatch(shift, "unified"))
    raw_img, raw_txt = leaves(seed=4)
    out, got, feats = run_method(method, raw_img, raw_txt, model.logit_scale)
    lam = model.logit_scale.exp()
    l_img, l_txt = log_normalizers(F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1), lam, lam, 1e-6)
    a_img, a_txt = l_img.detach() + shift, l_txt.detach() - shift
    eq12 = ((l_img - a_img).exp() + a_img).mean() + ((l_txt - a_txt).exp() + a_txt).mean()
    eq12 = eq12 / lam + 2 * (RHO - 1) / lam
    assert_all_close(got, grads(eq12, [raw_img, raw_txt, model.logit_scale]))
    torch.testing.assert_close(out.terms["loss"], eq12.detach())
    _, log_grads, _ = run_method(method_with(ShiftedMiniBatch(shift, "log"))[0], raw_img, raw_txt,
                                 model.logit_scale)
    assert not torch.allclose(got[2], log_grads[2])  # away from the optimum the two differ in τ


def test_unknown_objective_fails_at_build():
    with pytest.raises(ValueError, match="objective"):
        method_with(ShiftedMiniBatch(0.0, "regression"))


# ------------------------------------------------------------------------------------------ v2

def individual_method(learnable=True, rho=0.1, lr=1e-2, tau=0.1):
    model = TinyCLIP()
    temperature = IndividualTemperatures(32, tau, learnable, rho, lr, (0.9, 0.98), 1e-6,
                                         state_dtype=torch.float64)
    return GlobalContrastiveMethod(MiniBatchEstimator(), temperature, 1e-6), model


def set_taus(method, keys, tau_img, tau_txt):
    method.temperature.table.tau_img[keys] = tau_img
    method.temperature.table.tau_txt[keys] = tau_txt


def rgcl_per_anchor(raw_img, raw_txt, tau_img, tau_txt, rho, eps=1e-6):
    """τ_i·log(ε + g_i(τ_i)) + ρτ_i for every image and text anchor."""
    l_img, l_txt = log_normalizers(F.normalize(raw_img, dim=1), F.normalize(raw_txt, dim=1),
                                   1 / tau_img[:, None], 1 / tau_txt[:, None], eps)
    return tau_img * (l_img + rho), tau_txt * (l_txt + rho)


def test_individual_temperatures_gradients_and_adam_step():
    rho, lr = 0.1, 1e-2
    method, model = individual_method(rho=rho, lr=lr)
    keys = torch.tensor([7, 2, 30, 11, 4, 0, 19, 23])
    g = torch.Generator().manual_seed(5)
    tau_img = (0.05 + 0.3 * torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
    tau_txt = (0.05 + 0.3 * torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
    set_taus(method, keys, tau_img.detach(), tau_txt.detach())
    raw_img, raw_txt = leaves(seed=6)

    out, got, feats = run_method(method, raw_img, raw_txt, model.logit_scale, keys)
    per_img, per_txt = rgcl_per_anchor(raw_img, raw_txt, tau_img, tau_txt, rho)
    objective = per_img.mean() + per_txt.mean()
    assert_all_close(got, torch.autograd.grad(objective, [raw_img, raw_txt], retain_graph=True))
    torch.testing.assert_close(out.terms["loss"], objective.detach())

    # Each τ_i's gradient is that of its own anchor's term (the reference does not divide by N).
    tau_grad_img, tau_grad_txt = grads(per_img.sum() + per_txt.sum(), [tau_img, tau_txt])
    assert tau_grad_img.abs().max() < 5 and tau_grad_txt.abs().max() < 5  # below the clamp

    method.after_encoder_step(feats)
    table = method.temperature.table
    for side, tau0, grad in (("img", tau_img, tau_grad_img), ("txt", tau_txt, tau_grad_txt)):
        zeros = torch.zeros_like(grad)
        expected, m, v, steps = adam_step(tau0.detach(), zeros, zeros, zeros, grad, lr, (0.9, 0.98), 1e-6)
        torch.testing.assert_close(getattr(table, f"tau_{side}")[keys], expected)
        torch.testing.assert_close(getattr(table, f"adam_m_{side}")[keys], m)
        assert (getattr(table, f"adam_steps_{side}")[keys] == 1).all()
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[keys] = False
    assert (table.tau_img[untouched] == 0.1).all() and (table.adam_steps_img[untouched] == 0).all()


def test_per_sample_tau_gradient_matches_autograd_for_the_unified_objective():
    """ℓ = exp(−a)(ε+g) + a − 1 with a fixed off the optimum: the τ-sensitivity term is the same."""
    g = torch.Generator().manual_seed(8)
    raw_img, raw_txt = leaves(seed=8)
    img, txt = F.normalize(raw_img.detach(), dim=1), F.normalize(raw_txt.detach(), dim=1)
    tau = (0.05 + 0.3 * torch.rand(N, generator=g, dtype=torch.float64)).requires_grad_()
    l_img, _ = log_normalizers(img, txt, 1 / tau[:, None], 1 / tau[:, None], 1e-6)
    a = l_img.detach() + 0.2
    per_anchor = tau * ((l_img - a).exp() + a - 1 + RHO)
    (expected,) = grads(per_anchor.sum(), [tau])
    value = (l_img.detach() - a).exp() + a - 1
    got = per_sample_tau_gradient(img @ txt.T, 0, 1 / tau.detach(), a, value, RHO)
    torch.testing.assert_close(got, expected.clamp(-5, 5))


def test_adam_step_is_torch_adam_per_entry_and_keeps_tau_in_bounds():
    betas, eps, lr = (0.9, 0.98), 1e-6, 1e-3
    tau = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)
    param = nn.Parameter(tau.clone())
    reference = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps)
    m = v = steps = torch.zeros(3, dtype=torch.float64)
    for grad in ([1.0, -2.0, 0.5], [0.3, -0.1, 2.0], [-1.5, 0.2, 0.4]):
        grad = torch.tensor(grad, dtype=torch.float64)
        tau, m, v, steps = adam_step(tau, m, v, steps, grad, lr, betas, eps)
        param.grad = grad.clone()
        reference.step()
    torch.testing.assert_close(tau, param.detach())
    low, *_ = adam_step(torch.tensor([0.0105]), torch.zeros(1), torch.zeros(1), torch.zeros(1),
                        torch.tensor([1.0]), 0.1, betas, eps)
    high, *_ = adam_step(torch.tensor([0.99]), torch.zeros(1), torch.zeros(1), torch.zeros(1),
                         torch.tensor([-1.0]), 0.1, betas, eps)
    assert low.item() == pytest.approx(0.01) and high.item() == pytest.approx(1.0)


def test_individual_constant_keeps_taus_and_state_dict_carries_them():
    method, model = individual_method(learnable=False)
    raw_img, raw_txt = leaves()
    _, _, feats = run_method(method, raw_img, raw_txt, model.logit_scale)
    method.after_encoder_step(feats)
    assert (method.temperature.table.tau_img == 0.1).all()

    learnt, learnt_model = individual_method()
    _, _, feats = run_method(learnt, raw_img, raw_txt, learnt_model.logit_scale)
    learnt.after_encoder_step(feats)
    fresh, _ = individual_method()
    fresh.load_state_dict(learnt.state_dict())
    torch.testing.assert_close(fresh.temperature.table.tau_img, learnt.temperature.table.tau_img)
    torch.testing.assert_close(fresh.temperature.table.adam_v_txt, learnt.temperature.table.adam_v_txt)
    assert not torch.equal(fresh.temperature.table.tau_img, torch.full((32,), 0.1, dtype=torch.float64))


# ------------------------------------------------------------------------------ build and guards

@pytest.mark.parametrize("scheme,learnable,per_sample", [
    ("global_learnable", True, False), ("global_constant", False, False),
    ("individual_learnable", False, True), ("individual_constant", False, True)])
def test_build_sets_the_models_temperature(scheme, learnable, per_sample):
    method, model = build(make_args(temperature_scheme=scheme, temperature=0.05))
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))
    assert model.logit_scale.requires_grad is learnable
    assert method.uses_per_sample_state is per_sample
    assert method.objective == "log"
    method_ma, _ = build(make_args(temperature_scheme=scheme, estimator="moving_average"))
    assert method_ma.uses_per_sample_state and "gamma" in method_ma.scalars()


def test_embed_dim_of_open_clip_shapes():
    assert embed_dim(TinyCLIP()) == DIM
    visual_only = nn.Module()
    visual_only.visual = SimpleNamespace(output_dim=12)
    assert embed_dim(visual_only) == 12


class BrokenEstimator(MiniBatchEstimator):
    def estimate(self, feats, stats):
        est = super().estimate(feats, stats)
        a_img = est.a_img.clone()
        a_img[0], a_img[1] = float("nan"), -float("inf")
        return type(est)(a_img, est.a_txt.clone().fill_(float("inf")))


def test_non_finite_estimates_fall_back_to_the_batch_values():
    raw_img, raw_txt = leaves(seed=9)
    broken, model = method_with(BrokenEstimator())
    clean, clean_model = method_with(MiniBatchEstimator())
    out, got, _ = run_method(broken, raw_img, raw_txt, model.logit_scale)
    _, expected, _ = run_method(clean, raw_img, raw_txt, clean_model.logit_scale)
    assert all(torch.isfinite(t).all() for t in (out.loss, *out.terms.values()))
    assert_all_close(got, expected)


def test_small_temperature_and_hard_negatives_stay_finite_in_fp32():
    """τ = 0.01 and a negative 1.6 above its positive: g_i ≈ exp(160) overflows fp32."""
    method, model = build(make_args(multiply_tau=True, estimator="moving_average", temperature=0.01))
    model.float()
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[-0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    raw_img, raw_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    for epoch in (0, 1):  # γ = 1, then the moving average proper
        method.on_epoch_start(epoch)
        out, got, _ = run_method(method, raw_img, raw_txt, model.logit_scale)
        assert torch.isfinite(out.loss) and all(torch.isfinite(t).all() for t in got)
        assert all(torch.isfinite(t) for t in out.terms.values())
    assert out.terms["data_img"].item() == pytest.approx(1.0, rel=1e-5)  # u equals ε + g exactly here


def test_log_normalizers_are_the_estimators_prediction():
    method, model = build(make_args(estimator="moving_average"))
    raw_img, raw_txt = leaves(seed=10)
    _, _, feats = run_method(method, raw_img, raw_txt, model.logit_scale)
    a_img, a_txt = method.log_normalizers(features(raw_img, raw_txt, model.logit_scale))
    lam = model.logit_scale.exp().detach()
    l_img, l_txt = log_normalizers(feats.all_image, feats.all_text, lam, lam, 1e-6)
    torch.testing.assert_close(a_img, l_img, rtol=1e-6, atol=1e-6)  # float32 state
    torch.testing.assert_close(a_txt, l_txt, rtol=1e-6, atol=1e-6)
