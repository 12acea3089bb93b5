"""How should NeuCLIP's prototype NPN be parameterised so that the paper's AdaGrad lr (1.0) makes sense?

AdaGrad's first step after its state is reset is ±lr on every coordinate. Unit-norm prototypes in d
dimensions have coordinates of order 1/√d, so at lr 1.0 that step erases the restart's initialisation.
This study runs the real estimator (src/contrastive/neuclip.py) on synthetic paired embeddings that
drift slowly (a slow rotation of the embedding space while the pairs tighten, as in training), and
measures the mean squared error of α against the exact log-normalizer over the whole data set, on a
fixed reference set, every `--eval-every` steps. Rows compare:

  * the mini-batch estimate (no NPN) and the restart initialisation alone (lr 0),
  * unit-norm prototypes (what the paper's text suggests) at several lrs,
  * prototypes stored with RMS coordinate s (norm s·√d; `--npn_init_scale s`) at lr 1.0,
  * keeping AdaGrad's accumulators across restarts (`--npn_adagrad_reset never`),
  * and the MLP ablation at two lrs.

Run:  PYTHONPATH=src python scripts/npn_lr_study.py            (a few minutes on one idle CPU core)
      PYTHONPATH=src python scripts/npn_lr_study.py --seeds 3  (the report's numbers)
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from contrastive.core import batch_log_normalizers
from contrastive.estimator_interface import BatchStats
from contrastive.features import Features
from contrastive.neuclip import NeuCLIPEstimator


class DriftingPairs:
    """n paired unit embeddings: clusters + per-sample noise, text = image + noise; over `steps` the
    whole space rotates by about `angle` radians and the pairs tighten (image noise σ 1→0.6, text
    noise δ 1→0.4), so both the prototypes' targets and the true normalizers move."""

    def __init__(self, n, dim, steps, clusters=32, angle=1.0, spread=2.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.centers = F.normalize(torch.randn(clusters, dim, generator=g), dim=1)
        self.label = torch.randint(clusters, (n,), generator=g)
        self.u = torch.randn(n, dim, generator=g) / math.sqrt(dim) * spread
        self.v = torch.randn(n, dim, generator=g) / math.sqrt(dim) * spread
        skew = torch.randn(dim, dim, generator=g)
        skew = (skew - skew.T) / math.sqrt(2 * dim)
        self.rotation_step = torch.linalg.matrix_exp(skew * (angle / steps))
        self.rotation, self.steps, self.t = torch.eye(dim), steps, 0

    def advance(self):
        self.t += 1
        self.rotation = self.rotation @ self.rotation_step

    def embeddings(self, idx):
        progress = min(self.t / self.steps, 1.0)
        sigma, delta = 1.0 - 0.4 * progress, 1.0 - 0.6 * progress
        img = self.centers[self.label[idx]] + sigma * self.u[idx]
        txt = img + delta * self.v[idx]
        return F.normalize(img @ self.rotation, dim=1), F.normalize(txt @ self.rotation, dim=1)


def stats_for(img, txt, scale, eps):
    log_img, log_txt = batch_log_normalizers(img @ txt.T, scale, scale, eps)
    return BatchStats(log_img, log_txt, scale, scale, eps)


def exact_log_norms(data, ref, n, scale, eps):
    """log(ε + g_i) over the whole data set for the reference anchors (image and text)."""
    all_img, all_txt = data.embeddings(torch.arange(n))
    img, txt = all_img[ref], all_txt[ref]
    pos = (img * txt).sum(-1, keepdim=True)
    out = []
    for anchors, others in ((img, all_txt), (txt, all_img)):
        logits = (anchors @ others.T - pos) * scale
        logits[torch.arange(len(ref)), ref] = float("-inf")  # j ≠ i
        out.append(torch.logaddexp(logits.logsumexp(1) - math.log(n - 1), torch.tensor(math.log(eps))))
    return out, (img, txt)


def run(config, a, seed):
    torch.manual_seed(seed)
    data = DriftingPairs(a.n, a.dim, a.steps, angle=a.angle, spread=a.spread, seed=seed)
    scale, eps = torch.tensor(1 / a.tau), a.eps
    ref = torch.randperm(a.n, generator=torch.Generator().manual_seed(1))[:a.ref]
    est = None
    if config["kind"] == "npn":
        est = NeuCLIPEstimator(a.dim, num_protos=a.m, lr=config.get("lr", 1.0), repetition=a.tu,
                               restart_every=a.tr, arch=config.get("arch", "prototype"),
                               adagrad_reset=config.get("reset", "restart"),
                               init_scale=config.get("scale", 1.0), mlp_lr=config.get("lr", 1e-2), seed=seed)
    order, errors = torch.randperm(a.n), []
    for step in range(a.steps):
        pos = (step * a.batch) % a.n
        idx = order[pos:pos + a.batch]
        img, txt = data.embeddings(idx)
        feats = Features(img, txt, scale, idx, step=step)
        if est is not None:
            est.prepare(feats, stats_for(img, txt, scale, eps))
        if (step + 1) % a.eval_every == 0:
            errors.append(evaluate(est, data, ref, a, scale, eps))
        data.advance()
    errors = torch.tensor(errors)
    return errors.mean().item(), errors[len(errors) // 2:].mean().item()


def evaluate(est, data, ref, a, scale, eps):
    (exact_img, exact_txt), (img, txt) = exact_log_norms(data, ref, a.n, scale, eps)
    if est is None:  # mini-batch estimate: each reference anchor within a batch of size B
        chunks = [stats_for(i, t, scale, eps) for i, t in zip(img.split(a.batch), txt.split(a.batch))]
        pred_img = torch.cat([c.log_norm_img for c in chunks])
        pred_txt = torch.cat([c.log_norm_txt for c in chunks])
    else:
        feats = Features(img, txt, scale, ref)
        pred_img, pred_txt = est.predict(feats, stats_for(img, txt, scale, eps))
    return 0.5 * ((pred_img - exact_img).square().mean() + (pred_txt - exact_txt).square().mean()).item()


def configs(dim, scales=(3, 10, 20, 30, 100)):
    unit = 1 / math.sqrt(dim)  # RMS coordinate of a unit-norm prototype
    rows = [("mini-batch estimate (no NPN)", {"kind": "minibatch"}),
            ("restart init only (lr 0)", {"kind": "npn", "lr": 0.0}),
            ("unit-norm protos, lr 1 (paper, literally)", {"kind": "npn", "scale": unit}),
            ("unit-norm protos, lr 1, AdaGrad never reset", {"kind": "npn", "scale": unit, "reset": "never"})]
    rows += [(f"unit-norm protos, lr {lr:g}", {"kind": "npn", "scale": unit, "lr": lr}) for lr in (0.1, 0.01)]
    rows += [(f"init_scale {s:g} (norm {s * math.sqrt(dim):.0f}), lr 1", {"kind": "npn", "scale": s})
             for s in scales]
    rows += [(f"init_scale {s:g}, lr 1, AdaGrad never reset", {"kind": "npn", "scale": s, "reset": "never"})
             for s in (10, 30)]
    rows += [(f"MLP NPN, AdaGrad lr {lr:g}", {"kind": "npn", "arch": "mlp", "lr": lr}) for lr in (1e-2, 1e-3)]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="data set size")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=128, help="global batch N")
    p.add_argument("--m", type=int, default=256, help="prototypes (m > N exercises the ring fill)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tr", type=int, default=100, help="restart every T_r steps")
    p.add_argument("--tu", type=int, default=10, help="AdaGrad steps per encoder step")
    p.add_argument("--tau", type=float, default=0.07)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--ref", type=int, default=512, help="reference anchors for the error")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="first seed (data and restarts)")
    p.add_argument("--seeds", type=int, default=1, help="average over this many seeds")
    p.add_argument("--angle", type=float, default=0.3, help="radians the embedding space turns over the run")
    p.add_argument("--spread", type=float, default=0.5, help="per-sample noise around the cluster centres")
    p.add_argument("--only", default=None, help="comma-separated row numbers to run")
    p.add_argument("--scales", default="3,10,20,30,100", help="init scales to try at lr 1")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"n={a.n} d={a.dim} N={a.batch} m={a.m} steps={a.steps} T_r={a.tr} T_u={a.tu} tau={a.tau}; "
          f"seeds={a.seeds}\nMSE of log-normalizer estimates vs exact, mean over evaluations (all / second half)")
    only = None if a.only is None else {int(i) for i in a.only.split(",")}
    scales = [float(s) for s in a.scales.split(",")]
    for row, (name, config) in enumerate(configs(a.dim, scales)):
        if only is not None and row not in only:
            continue
        t0 = time.perf_counter()
        results = torch.tensor([run(config, a, seed) for seed in range(a.seed, a.seed + a.seeds)])
        mean_all, mean_late = results.mean(0).tolist()
        print(f"  {name:<48s} {mean_all:9.4f} {mean_late:9.4f}   ({time.perf_counter() - t0:4.1f} s)", flush=True)


if __name__ == "__main__":
    main()
