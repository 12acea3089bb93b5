"""scripts/tau_grad_study.py's re-stated gradients and root finder: the numbers of the --tau_grad decision
(docs/results/tau_grad/report.md) are only as good as these."""
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from contrastive import core

_SPEC = importlib.util.spec_from_file_location(
    "tau_grad_study", Path(__file__).resolve().parents[1] / "scripts" / "tau_grad_study.py")
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)

EPS, RHO = 1e-6, 1.0


def batch(seed=0, n=32, dim=8, noise=0.9):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + noise * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def data_term(img, txt, tau):
    """D = mean log-normalizer of each side, from the loss core (not the script)."""
    scale = torch.tensor(1 / tau, dtype=torch.float64)
    l_img, l_txt = core.batch_log_normalizers(img @ txt.T, scale, scale, EPS)
    return (l_img.mean() + l_txt.mean()).item()


def test_gradients_are_the_objective_derivative_and_the_double_count():
    """Bug: the study's exact gradient is not dF/dτ of F = τ·(D + 2ρ), or its reference gradient is not
    dF/dτ + τ·dD/dτ (e.g. the τ·D′ term dropped, doubled, or taken w.r.t. the logit scale): the report's
    stationary τ would then describe neither mode. Checked by central differences of the loss core's D."""
    img, txt = batch()
    for tau in (0.02, 0.07, 0.3):
        h = tau * 1e-5
        d_prime = (data_term(img, txt, tau + h) - data_term(img, txt, tau - h)) / (2 * h)
        f_prime = data_term(img, txt, tau) + 2 * RHO + tau * d_prime
        exact, reference = study.gradients(img, txt, tau, RHO, EPS)
        assert math.isclose(exact, f_prime, rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(reference, f_prime + tau * d_prime, rel_tol=1e-5, abs_tol=1e-7)


def test_stationary_tau_is_a_minimum_of_each_mode_and_bounds_are_reported():
    """Bug: the root finder reports a maximum (a + to − crossing), interpolates wrongly, or calls a
    gradient that never changes sign a root: the report's 'where τ settles' column would be wrong."""
    img, txt = batch(seed=1)
    exact_tau, reference_tau = study.stationary_taus(img, txt, RHO, points=201)
    assert "*" not in exact_tau + reference_tau and exact_tau != reference_tau
    for which, tau in ((0, float(exact_tau)), (1, float(reference_tau))):
        below = study.gradients(img, txt, tau * 0.97, RHO, EPS)[which]
        above = study.gradients(img, txt, tau * 1.03, RHO, EPS)[which]
        assert below < 0 < above  # F falls, then rises: a minimum
    # A huge ρ makes both gradients positive everywhere: τ is pushed to the lower bound.
    assert study.stationary_taus(img, txt, 50.0, points=41) == (f"{study.TAU_MIN}*", f"{study.TAU_MIN}*")
