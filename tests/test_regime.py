"""The pieces the data-to-batch-ratio benchmark (training.bench.regime) is built from, usable on their own: the
exact log-normalizer of a subset of anchors against all n, the public training step, `contrastive` without
open_clip, and one tiny run of the benchmark part itself."""
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from contrastive import build_method
from training.bench.regime import ARMS, RegimeConfig, method_flags, run_one
from training.bench.regime_data import FeatureData, FeatureHeads
from training.eval.estimation_error import true_log_normalizers
from training.eval.exact_normalizers import anchor_log_normalizers
from training.loop import train_one_epoch, train_step
from training.train_state import TrainState
from training.optim import build_optimizer
from training.params import parse_args
from training.scheduler import LRScheduler

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def brute_force(rows: torch.Tensor, columns: torch.Tensor, anchors: torch.Tensor, lam: torch.Tensor, eps: float):
    """log(ε + 1/(n−1) Σ_{j≠i} exp((r_i·c_j − r_i·c_i)·λ_i)) for i in anchors, restated in float64, one anchor at
    a time, without tiles or log-sum-exp."""
    rows, columns, lam = rows.double(), columns.double(), lam.double().expand(len(anchors))
    n = rows.shape[0]
    out = []
    for k, i in enumerate(anchors.tolist()):
        s = rows[i] @ columns.T
        terms = torch.exp((s - s[i]) * lam[k])
        g = (terms.sum() - terms[i]) / (n - 1)
        out.append(math.log(eps + g.item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("per_anchor_scale", [False, True], ids=["global_tau", "per_anchor_tau"])
def test_anchor_log_normalizers_match_float64_brute_force(per_anchor_scale):
    """Catches in the subset normalizer: the anchor's own pair counted as a negative, 1/n instead of 1/(n−1),
    a tile boundary dropping or doubling columns (n = 203 in tiles of 16, last tile partial, anchors 0 and n−1
    included), the text side computed against texts (not images), per-anchor λ applied to the wrong rows, and ε
    added outside the log."""
    gen = torch.Generator().manual_seed(0)
    n, d = 203, 8
    image = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(n, d, generator=gen), dim=1)
    anchors = torch.cat([torch.tensor([0, n - 1, 16, 15]), torch.randperm(n, generator=gen)[:25]]).unique()
    anchors = anchors[torch.randperm(len(anchors), generator=gen)]  # unsorted on purpose
    if per_anchor_scale:
        scale_img = 5 + 25 * torch.rand(len(anchors), generator=gen)
        scale_txt = 5 + 25 * torch.rand(len(anchors), generator=gen)
    else:
        scale_img = scale_txt = torch.tensor(1 / 0.03)
    eps = 1e-3
    got_img, got_txt = anchor_log_normalizers(image, text, anchors, scale_img, scale_txt, eps, block=16)
    want_img = brute_force(image, text, anchors, scale_img, eps)
    want_txt = brute_force(text, image, anchors, scale_txt, eps)
    torch.testing.assert_close(got_img.double(), want_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_txt.double(), want_txt, rtol=1e-5, atol=1e-5)


def test_anchor_log_normalizers_on_all_anchors_equal_the_full_truth():
    """Catches the two exact normalizers (all n against all n in estimation_error, a subset in exact_normalizers)
    disagreeing on the definition, e.g. one skipping the positive and the other not."""
    gen = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(70, 6, generator=gen), dim=1)
    text = F.normalize(torch.randn(70, 6, generator=gen), dim=1)
    scale = torch.tensor(12.0)
    full = true_log_normalizers(image, text, scale, scale, 1e-6, block=32)
    subset = anchor_log_normalizers(image, text, torch.arange(70), scale, scale, 1e-6, block=9)
    for a, b in zip(full, subset):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_anchor_log_normalizers_reject_an_index_outside_the_set():
    """Catches an out-of-range anchor silently wrapping round (negative index) instead of failing."""
    x = F.normalize(torch.randn(5, 3), dim=1)
    with pytest.raises(ValueError, match="anchor indices"):
        anchor_log_normalizers(x, x, torch.tensor([-1]), torch.tensor(10.0), torch.tensor(10.0), 1e-6)


def _build(method_flags_list, n, steps, seed=0):
    args = parse_args(method_flags_list)
    args.rank, args.local_rank, args.world_size, args.is_master = 0, 0, 1, True
    torch.manual_seed(seed)
    model = FeatureHeads(12, 6, args.temperature)
    method = build_method(args.method, args, model)
    optimizer = build_optimizer(model, method, args)
    return args, model, method, optimizer, LRScheduler(optimizer, args, steps)


@pytest.mark.parametrize("method", ["fastclip", "neuclip"])
def test_train_step_equals_the_loops_step(method):
    """Catches the public step and the loop's step drifting apart (the loop inlining its own variant that
    forgets the τ-dependent lr, the method's after-step update, the logit-scale clamp or the step count): three
    steps of `train_one_epoch` and three calls of `train_step` from the same start leave identical parameters,
    optimizer moments, method state (FastCLIP's u table, NeuCLIP's NPN) and step counts."""
    n, batch, steps = 48, 16, 3
    cfg = RegimeConfig(batch=batch, protos=8, restart=2)
    flags = method_flags(method, ARMS["tau"], cfg, n, steps) + ["--log-every-n-steps", "100"]
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(batch, 12, generator=gen), torch.randn(batch, 12, generator=gen),
                torch.randperm(n, generator=gen)[:batch]) for _ in range(steps)]

    args, model_a, method_a, opt_a, sched_a = _build(flags, n, steps)
    args.is_master = False  # no logging objects needed
    state_a = TrainState()
    data = SimpleNamespace(dataloader=batches, num_batches=steps, start_batch=0, skipped=lambda: 0)
    method_a.on_epoch_start(0)
    train_one_epoch(model=model_a, method=method_a, data=data, optimizer=opt_a, scaler=None, scheduler=sched_a,
                    state=state_a, epoch=0, args=args, device=torch.device("cpu"))

    args_b, model_b, method_b, opt_b, sched_b = _build(flags, n, steps)
    state_b = TrainState()
    method_b.on_epoch_start(0)
    model_b.train()
    method_b.train()
    for images, texts, keys in batches:
        train_step(model=model_b, method=method_b, optimizer=opt_b, scheduler=sched_b, state=state_b, images=images,
                   texts=texts, keys=keys, epoch=0, args=args_b, device=torch.device("cpu"))

    assert state_a.step == state_b.step == steps
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    assert not torch.equal(model_a.visual.weight, FeatureHeads(12, 6, 0.07).visual.weight)  # it did train
    for name, a in method_a.state_dict().items():
        assert torch.equal(a, method_b.state_dict()[name]), name
    for pa, pb in zip(opt_a.state.values(), opt_b.state.values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key


def test_contrastive_imports_without_open_clip_until_an_open_clip_method_is_built():
    """Catches a module-level `import open_clip` (directly or through a submodule) creeping back into the
    `contrastive` package, and the lazy import breaking the OpenCLIP method: in a fresh interpreter, importing
    contrastive (and the training step) loads no open_clip; building "openclip" then loads it, and its loss equals
    InfoNCE restated here."""
    code = r"""
import math, sys, types, torch, torch.nn.functional as F
import contrastive
from contrastive import Features, build_method
import training.loop, training.eval.exact_normalizers
assert "open_clip" not in sys.modules, sorted(m for m in sys.modules if m.startswith("open_clip"))
args = types.SimpleNamespace(local_loss=False, gather_with_grad=False)
method = build_method("openclip", args, torch.nn.Module())
assert "open_clip" in sys.modules
torch.manual_seed(0)
img, txt = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
scale = torch.tensor(10.0)
loss = method(Features(image=img, text=txt, logit_scale=scale, keys=torch.arange(6))).loss
logits = scale * img @ txt.T
want = 0.5 * (-(logits.diag() - logits.logsumexp(1)).mean() - (logits.diag() - logits.logsumexp(0)).mean())
assert math.isclose(loss.item(), want.item(), rel_tol=1e-5), (loss.item(), want.item())
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_regime_run_measures_every_checkpoint_and_fixed_tau_stays_fixed():
    """Catches the benchmark's run losing a checkpoint, measuring the mini-batch baseline on other features than
    the method's (OpenCLIP's error must equal its mini-batch error exactly), and the fixed-τ arm letting τ move
    (OpenCLIP has no temperature scheme; its τ is frozen by hand)."""
    cfg = RegimeConfig(batch=16, steps=12, checkpoints=3, anchors=40, protos=8, restart=5)
    data = FeatureData(160, seed=0, drift=True)
    res = run_one("openclip", ARMS["drift"], cfg, data, seed=0, steps=12)
    assert [c["step"] for c in res["checkpoints"]] == [4, 8, 12]
    assert all(c["err"] == c["err_minibatch"] and c["err"] > 0 for c in res["checkpoints"])
    assert all(math.isclose(c["tau"], cfg.tau, rel_tol=1e-6) for c in res["checkpoints"])
    res = run_one("fastclip", ARMS["fixed"], cfg, data, seed=0, steps=12)
    assert all(math.isclose(c["tau"], cfg.tau, rel_tol=1e-6) for c in res["checkpoints"])
    assert res["epochs"] == pytest.approx(12 / 10)


def test_regime_flags_are_checked_before_anything_runs(tmp_path):
    """Catches a misspelt arm or method reaching the grid (a KeyError after minutes of training) instead of a
    one-line usage error at start-up, and the part's sizes not being filled in from the size presets."""
    from training.bench import cli  # noqa: PLC0415
    with pytest.raises(SystemExit):
        cli.parse_opts(["--out", str(tmp_path), "--parts", "regime", "--regime-arms", "tau,drfit"])
    with pytest.raises(SystemExit):
        cli.parse_opts(["--out", str(tmp_path), "--parts", "regime", "--regime-methods", "siglip"])
    opts = cli.parse_opts(["--out", str(tmp_path), "--parts", "regime"])
    assert (opts.regime_batch, opts.regime_ratios, opts.regime_steps, opts.regime_seeds) == (256, [100, 1000, 3000],
                                                                                             6000, [0, 1, 2])


def test_matched_epochs_give_every_ratio_the_same_epochs():
    """Catches --regime-epochs running the same steps at every n/B (then epochs differ by the ratio of the n/B,
    the flaw the option exists to remove) or measuring at the shortest run's steps instead of each run's own
    fractions."""
    from training.bench.regime import run_grid  # noqa: PLC0415
    cfg = RegimeConfig(batch=8, steps=999, checkpoints=2, anchors=16, protos=8, restart=5, epochs=1.5)
    assert (cfg.steps_for(4), cfg.steps_for(10)) == (6, 15)
    runs = run_grid(cfg, [4, 10], ["fixed"], [0], ["fastclip"], log=lambda _: None)
    assert [r["steps"] for r in runs] == [6, 15]
    assert [r["epochs"] for r in runs] == [pytest.approx(1.5), pytest.approx(1.5)]
    assert [[c["step"] for c in r["checkpoints"]] for r in runs] == [[3, 6], [8, 15]]
