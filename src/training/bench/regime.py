"""The paper's regime on a CPU: normalizer estimation error vs the data-to-batch ratio n/B (paper Fig. 2c: at
DFN-14M with a global batch of 4096, n/B ≈ 3 400), by feature-level simulation.

The encoders are replaced by fixed synthetic backbone features (training.bench.regime_data) and two linear
heads; everything else is the project's own: the flags go through `training.params.parse_args`, the method is
`contrastive.build_method`, the optimizer and lr/τ schedules are `training.optim.build_optimizer` and
`training.scheduler.LRScheduler`, and each step is `training.loop.train_step`, the function the training loop
itself calls. The error is the paper's: MSE of log(ε + g) between the method's estimate and the exact value
against all n (`training.eval.exact_normalizers`), on a fixed random sample of R anchors, mean over image and
text anchors, averaged over C checkpoints at equal steps in every setting.

Arms (each a cause of a stale estimate, measured separately):
  tau    τ learnt as each method learns it (FastCLIP-v3/NeuCLIP: RGCL-g with ρ, step_thresh τ lr; OpenCLIP: the
         same τ lr and schedule, without ρ, which ClipLoss has not); FastCLIP's γ on its cosine epoch schedule
  fixed  τ fixed (the same value for every method); γ constant from epoch 1 on; static backbone: staleness only
         from the heads' own learning
  drift  as fixed, with a drifting backbone (every sample's features move during training)
Per checkpoint, next to each method's error, the mini-batch estimate's error on the same features and τ
(`minibatch`): OpenCLIP's own estimator, so a ratio below 1 is better than no memory at all.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from contrastive import ContrastiveMethod, Features, build_method
from training.bench.common import FAMILY_FLAGS, METHOD_LABELS
from training.bench.regime_data import EpochSampler, FeatureData, FeatureHeads, FeatureSpec
from training.eval.estimation_error import (anchor_inverse_temperatures, error_metrics, method_eps,
                                            method_log_normalizers)
from training.eval.exact_normalizers import anchor_log_normalizers
from training.loop import train_step
from training.train_state import TrainState
from training.optim import build_optimizer
from training.params import parse_args
from training.scheduler import LRScheduler


@dataclass(frozen=True)
class Arm:
    name: str
    learn_tau: bool
    drift: bool
    gamma_schedule: str
    what: str


ARMS = {a.name: a for a in (
    Arm("tau", True, False, "cosine", "τ learnt (each method's own rule), static backbone, γ cosine per epoch"),
    Arm("fixed", False, False, "constant", "τ fixed, static backbone, γ constant"),
    Arm("drift", False, True, "constant", "τ fixed, drifting backbone, γ constant"))}
REGIME_METHODS = ("openclip", "fastclip", "neuclip")


@dataclass(frozen=True)
class RegimeConfig:
    batch: int = 64
    steps: int = 6000
    checkpoints: int = 3
    anchors: int = 1024
    lr: float = 1e-3
    tau: float = 0.05           # the fixed arms' τ
    protos: int = 512           # NeuCLIP's m
    repetition: int = 10        # T_u
    restart: int = 500          # T_r
    embed: int = 64             # heads' output width
    spec: FeatureSpec = FeatureSpec()
    epochs: float | None = None  # when set, every n/B runs this many epochs (steps = epochs × n/B), not `steps`

    def steps_for(self, ratio: float) -> int:
        """Steps of a run at this n/B: `steps`, or matched epochs (one epoch is n/B steps of B)."""
        return self.steps if self.epochs is None else max(self.checkpoints, round(self.epochs * ratio))


def method_flags(method: str, arm: Arm, cfg: RegimeConfig, n: int, total_steps: int) -> list[str]:
    """The training flags of one run, as `python -m training.main` would take them."""
    common = ["--batch-size", str(cfg.batch), "--epochs", "1", "--lr", str(cfg.lr), "--wd", "0.1",
              "--warmup", str(max(1, total_steps // 10)), "--precision", "fp32", "--device", "cpu",
              "--data_size", str(n), "--fastclip_eps", "1e-6", "--lr_tau", "2.5e-4",
              "--lr_tau_scheduler", "step_thresh"]
    if method == "openclip":
        flags = common
    elif method in ("fastclip", "neuclip"):
        flags = list(FAMILY_FLAGS) + common + ["--gamma_schedule", arm.gamma_schedule]
        if method == "neuclip":
            flags += ["--npn", "--npn_num_protos", str(cfg.protos), "--npn_repetition", str(cfg.repetition),
                      "--npn_restart_iter", str(cfg.restart)]
        if not arm.learn_tau:
            flags += ["--temperature_scheme", "global_constant", "--temperature", str(cfg.tau)]
    else:
        raise ValueError(f"regime: unknown method {method!r}; choose from {', '.join(REGIME_METHODS)}")
    return flags


class _MiniBatchOnly(ContrastiveMethod):
    """A method whose estimate is the mini-batch one: the interface's defaults (no estimates of its own, so
    method_log_normalizers falls back to the batch's; λ from the logit scale)."""


@torch.no_grad()
def measure(model: FeatureHeads, method, data: FeatureData, anchors: torch.Tensor, args, step: int,
            progress: float, batch: int) -> dict:
    """The method's estimation error and the mini-batch estimate's, on R anchors against all n, now."""
    image, text = model.embed(*data.views(progress))
    logit_scale = model.logit_scale.detach().float().exp()
    eps = method_eps(method, args)
    probe = Features.precomputed(image[anchors], text[anchors], logit_scale, anchors, step=step)
    scale_img, scale_txt = anchor_inverse_temperatures(method, probe)
    truth = anchor_log_normalizers(image, text, anchors, scale_img, scale_txt, eps)
    own = method_log_normalizers(method, image[anchors], text[anchors], logit_scale, anchors, batch, eps, step=step)
    mini = method_log_normalizers(_MiniBatchOnly(), image[anchors], text[anchors], logit_scale, anchors, batch, eps,
                                  step=step)
    mine, base = error_metrics(*own, *truth), error_metrics(*mini, *truth)
    return {"err": mine["est_err/mean"], "bias": 0.5 * (mine["est_bias/image"] + mine["est_bias/text"]),
            "err_minibatch": base["est_err/mean"], "tau": 1.0 / logit_scale.item(),
            "truth_mean": 0.5 * (truth[0].mean() + truth[1].mean()).item()}


def checkpoint_steps(total: int, count: int) -> list[int]:
    return sorted({max(1, round(total * k / count)) for k in range(1, count + 1)})


def run_one(method: str, arm: Arm, cfg: RegimeConfig, data: FeatureData, seed: int, steps: int,
            checkpoints: int | None = None) -> dict:
    """Train `method` for `steps` steps of `cfg.batch` on `data`; measure at the checkpoints."""
    n = data.n
    args = parse_args(method_flags(method, arm, cfg, n, steps))
    args.rank, args.local_rank, args.world_size, args.is_master = 0, 0, 1, True
    torch.manual_seed(1000 + seed)  # the same heads for every method of a seed
    model = FeatureHeads(data.spec.dim, cfg.embed, args.temperature)
    torch.manual_seed(2000 + seed)
    method_obj = build_method(args.method, args, model)
    if method == "openclip" and not arm.learn_tau:  # ClipLoss has no temperature scheme: freeze τ by hand
        model.logit_scale.data.fill_(math.log(1.0 / cfg.tau))
        model.logit_scale.requires_grad_(False)
    optimizer = build_optimizer(model, method_obj, args)
    scheduler = LRScheduler(optimizer, args, steps)  # one schedule over the run's steps (--epochs 1)
    sampler = EpochSampler(n, cfg.batch, seed)
    anchors = torch.randperm(n, generator=torch.Generator().manual_seed(3000 + seed))[:min(cfg.anchors, n)]
    anchors = anchors.sort().values
    state, device, records = TrainState(), torch.device("cpu"), []
    due = set(checkpoint_steps(steps, checkpoints or cfg.checkpoints))
    model.train()
    method_obj.train()
    last_epoch, train_s = -1, 0.0
    for step in range(steps):
        epoch, keys = sampler.keys(step)
        if epoch != last_epoch:
            method_obj.on_epoch_start(epoch)
            last_epoch = epoch
        image, text = data.views(step / steps, keys)
        start = time.perf_counter()
        train_step(model=model, method=method_obj, optimizer=optimizer, scheduler=scheduler, state=state,
                   images=image, texts=text, keys=keys, epoch=epoch, args=args, device=device)
        train_s += time.perf_counter() - start
        if state.step in due:
            start = time.perf_counter()
            rec = measure(model, method_obj, data, anchors, args, state.step, state.step / steps, cfg.batch)
            scalars = {k: float(v) for k, v in method_obj.scalars().items()}
            rec.update(step=state.step, epoch=state.step / sampler.steps_per_epoch, measure_s=time.perf_counter() - start,
                       gamma=scalars.get("gamma"))
            records.append(rec)
    return {"method": method, "arm": arm.name, "seed": seed, "n": n, "batch": cfg.batch, "ratio": n / cfg.batch,
            "steps": steps, "epochs": steps / sampler.steps_per_epoch, "ms_per_step": 1e3 * train_s / steps,
            "skipped_nonfinite": state.skipped_nonfinite, "checkpoints": records,
            "err": _mean([r["err"] for r in records]), "err_minibatch": _mean([r["err_minibatch"] for r in records]),
            "err_last": records[-1]["err"], "err_minibatch_last": records[-1]["err_minibatch"]}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def run_grid(cfg: RegimeConfig, ratios: list[int], arms: list[str], seeds: list[int], methods: list[str],
             log, done: list[dict] | None = None, on_result=None) -> list[dict]:
    """Every (arm, n/B, seed, method) run; the data set of an (arm, n/B, seed) is shared by its methods.
    Runs already in `done` (same arm, ratio, seed, method) are kept, not rerun."""
    results = list(done or [])
    have = {(r["arm"], r["ratio"], r["seed"], r["method"]) for r in results}
    for seed in seeds:  # seeds outermost: a run cut short still has every setting for its first seeds
        for arm_name in arms:
            arm = ARMS[arm_name]
            for ratio in ratios:
                n = ratio * cfg.batch
                todo = [m for m in methods if (arm.name, float(ratio), seed, m) not in have]
                if not todo:
                    continue
                start = time.perf_counter()
                data = FeatureData(n, seed=seed, spec=cfg.spec, drift=arm.drift)
                made = time.perf_counter() - start
                for method in todo:
                    t0 = time.perf_counter()
                    res = run_one(method, arm, cfg, data, seed, cfg.steps_for(ratio))
                    res["seconds"] = time.perf_counter() - t0
                    results.append(res)
                    log(f"[regime] arm {arm.name} n/B {ratio} (n {n}) seed {seed} {METHOD_LABELS[method]}: "
                        f"err {res['err']:.3g} (mini-batch {res['err_minibatch']:.3g}), {res['epochs']:.2f} epochs, "
                        f"{res['ms_per_step']:.1f} ms/step, {res['seconds']:.0f} s (data {made:.1f} s)")
                    if on_result is not None:
                        on_result(results)
                del data
    return results
