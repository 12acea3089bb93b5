"""Which temperature gradient reproduces the paper: `--tau_grad exact` against `--tau_grad reference`.

The published ρ values (6.5 CC3M, 8.5 CC12M, 11.0 DFN) come from code whose learnt-τ gradient counts the
data term twice. For RGCL-g, F(τ) = τ·(D_img(τ) + D_txt(τ) + 2ρ) with D the mean log-normalizer of a side:

    exact:      dF/dτ        = D + 2ρ + τ·D'
    reference:  dF/dτ + τ·D' = D + 2ρ + 2τ·D'

Far from where they vanish both have the same sign and Adam moves log τ (the logit scale) by about lr_τ
per step in either mode; they differ in *where* the gradient changes sign, i.e. in the τ a long run settles at for a given ρ.
This script shows both sides of that on the built-in data:

1. Trajectories: the real trainer (subprocesses of `src/training/main.py`, the reference command's
   method flags, scaled down) in both modes for each ρ, logging τ every step.
2. Stationary τ: from each run's final checkpoint, features of a held batch, and the two gradients
   above re-stated here (not the trainer's code) on a τ grid; the root of each is where that mode's τ
   would settle with those features.

    python scripts/tau_grad_study.py                     # runs at ρ 11, 6.5, 2: about 4 minutes on 2 cores
    python scripts/tau_grad_study.py --rho 11 --steps 300 --lr-tau 3e-3

Prints one table per part; `--json FILE` also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TAU_MIN, TAU_MAX = 0.01, 1.0  # logit_scale ∈ [0, ln 100]


def write_data(folder: Path, samples: int) -> str:
    if not (folder / "info.json").exists():
        subprocess.run([sys.executable, "-m", "training.data.synthetic", "--out", str(folder), "--num-samples",
                        str(samples), "--samples-per-shard", "500", "--workers", "2"], check=True, env=_env(),
                       stdout=subprocess.DEVNULL)
    return json.loads((folder / "info.json").read_text())["pattern"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def train(logs: Path, name: str, shards: str, samples: int, epochs: int, rho: float, mode: str, a) -> list[float]:
    """One run of the trainer; returns τ after every step (1 / the logged logit scale)."""
    cmd = [sys.executable, "-u", str(ROOT / "src/training/main.py"),
           "--train-data", shards, "--train-num-samples", str(samples), "--data_size", str(samples),
           "--model", "neuclip-tiny", "--batch-size", str(a.batch_size), "--epochs", str(epochs), "--workers", "1",
           "--warmup", "20", "--lr", "2e-3", "--wd", "0.1", "--precision", "fp32", "--seed", str(a.seed),
           "--logs", str(logs), "--name", name, "--log-every-n-steps", "1", "--save-frequency", str(epochs),
           "--local-loss", "--fastclip", "--multiply_tau", "--temperature_scheme", "global_learnable",
           "--temperature", "0.07", "--lr_tau", str(a.lr_tau), "--lr_tau_scheduler", "const",
           "--rho", str(rho), "--fastclip_eps", "1e-6", "--gamma", "0.8", "--gamma_schedule", "cosine",
           "--gamma_decay_epochs", str(epochs), "--npn", "--npn_lr", "1.0", "--npn_num_protos", "256",
           "--npn_repetition", "10", "--npn_restart_iter", "500", "--tau_grad", mode]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training run {name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    scales = re.findall(r"Logit Scale: ([0-9.]+)", (logs / name / "out.log").read_text())
    return [1.0 / float(s) for s in scales]


def held_batch(checkpoint: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features of `size` held-out built-in samples (seed 1, not the training stream)."""
    import open_clip

    import training  # noqa: F401  (registers neuclip-tiny with open_clip)
    from training.data.synthetic.samples import get_sample

    model, _, preprocess = open_clip.create_model_and_transforms("neuclip-tiny", pretrained=str(checkpoint))
    tokenizer = open_clip.get_tokenizer("neuclip-tiny")
    samples = [get_sample(1, i) for i in range(size)]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im, _ in samples]), normalize=True)
        txt = model.encode_text(tokenizer([c for _, c in samples]), normalize=True)
    return img.double(), txt.double()


def side_log_normalizers(sim: torch.Tensor, tau: torch.Tensor, eps: float) -> torch.Tensor:
    """log(ε + 1/(N−1) Σ_{j≠i} exp((s_ij − s_ii)/τ)) for every row anchor i."""
    n = sim.shape[0]
    diff = (sim - sim.diagonal()[:, None]) / tau
    diff = diff.masked_fill(torch.eye(n, dtype=torch.bool), -math.inf)
    log_g = torch.logsumexp(diff, dim=1) - math.log(n - 1)
    return torch.logaddexp(log_g, torch.full_like(log_g, math.log(eps)))


def gradients(img: torch.Tensor, txt: torch.Tensor, tau: float, rho: float, eps: float = 1e-6):
    """(exact, reference) dF/dτ at τ, with the true log-normalizers of the batch."""
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    sim = img @ txt.T
    d = side_log_normalizers(sim, t, eps).mean() + side_log_normalizers(sim.T, t, eps).mean()
    (d_prime,) = torch.autograd.grad(d, t, create_graph=True)
    (exact,) = torch.autograd.grad(t * (d + 2 * rho), t)
    return exact.item(), exact.item() + tau * d_prime.item()


def stationary_taus(img, txt, rho: float, points: int = 161) -> tuple[str, str]:
    """For (exact, reference): the τ in [0.01, 1] where the gradient first changes sign from − to + (a
    minimum of F), on a log grid with linear interpolation; a bound when the gradient never changes sign."""
    grid = [TAU_MIN * (TAU_MAX / TAU_MIN) ** (k / (points - 1)) for k in range(points)]
    values = [gradients(img, txt, t, rho) for t in grid]
    found = []
    for which in (0, 1):
        v = [pair[which] for pair in values]
        root = next((f"{t0 + (t1 - t0) * (-v0) / (v1 - v0):.4f}" for t0, v0, t1, v1
                     in zip(grid, v, grid[1:], v[1:]) if v0 <= 0 < v1), None)
        found.append(root or (f"{TAU_MIN}*" if v[0] > 0 else f"{TAU_MAX}*"))
    return found[0], found[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rho", type=float, nargs="+", default=[11.0, 6.5, 2.0], help="ρ of the training runs")
    p.add_argument("--grid-rho", type=float, nargs="+", default=[11.0, 8.5, 6.5, 4.0, 2.0, 1.0, 0.5],
                   help="ρ at which part 2 finds the stationary τ")
    p.add_argument("--steps", type=int, default=150, help="about this many encoder steps per run")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-tau", type=float, default=1e-2, help="constant; large so τ can reach where it settles")
    p.add_argument("--held", type=int, default=512, help="held-out samples for the stationary-τ part")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--workdir", type=Path, default=None, help="keep data and runs here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    work = a.workdir or Path(tempfile.mkdtemp(prefix="tau_grad_study_"))
    shards = write_data(work / f"data-{a.samples}", a.samples)
    epochs = max(1, round(a.steps / math.ceil(a.samples / a.batch_size)))
    print(f"built-in data: {a.samples} samples, batch {a.batch_size}, {epochs} epochs; NeuCLIP RGCL-g (the "
          f"reference command's method flags), lr_tau {a.lr_tau} constant, τ0 0.07, seed {a.seed}; runs in {work}")
    runs = {}
    for rho in a.rho:
        for mode in ("exact", "reference"):
            name = f"rho{rho:g}-{mode}"
            taus = train(work / "logs", name, shards, a.samples, epochs, rho, mode, a)
            img, txt = held_batch(work / "logs" / name / "checkpoints" / f"epoch_{epochs}.pt", a.held)
            runs[name] = dict(rho=rho, mode=mode, taus=taus,
                              stationary={g: stationary_taus(img, txt, g) for g in a.grid_rho})

    steps = min(len(r["taus"]) for r in runs.values())
    marks = sorted({1, steps // 4, steps // 2, 3 * steps // 4, steps})
    print("\n1. τ after step k of the trainer (each run with its own --tau_grad)")
    print(f"{'ρ':>5} {'--tau_grad':>10} " + " ".join(f"{'k=' + str(k):>9}" for k in marks))
    for r in runs.values():
        print(f"{r['rho']:>5g} {r['mode']:>10} " + " ".join(f"{r['taus'][k - 1]:>9.5f}" for k in marks))
    print(f"\n2. Stationary τ, exact / reference gradient, on the final features of each run (held batch of "
          f"{a.held}): where τ settles for that ρ; * = pushed to a bound")
    print(f"{'run':>16} " + " ".join(f"{'ρ=' + format(g, 'g'):>15}" for g in a.grid_rho))
    for name, r in runs.items():
        print(f"{name:>16} " + " ".join(f"{e + ' / ' + ref:>15}" for e, ref in r["stationary"].values()))
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
