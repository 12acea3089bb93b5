"""The `regime` part of training.bench: runs training.bench.regime's grid and its calibration point, writes the
tables and the figure (error vs n/B per method and arm, seeds as bands). Runs are saved in DIR/regime.json after
each one; with --reuse a later invocation keeps the runs it finds there (same sizes) and adds the missing ones."""
from __future__ import annotations

import json
import math
import os
import time

from training.bench.common import METHOD_LABELS, fmt, fmt_pm, markdown_table, mean_std, pyplot, save_figure
from training.bench.regime import ARMS, RegimeConfig, checkpoint_steps, run_one
from training.bench.regime_data import FeatureData

#: The CPU miniature whose real trainings the simulation is calibrated against (B = 64, n = 20 480: n/B = 320).
CALIBRATION_SOURCE = os.path.join("docs", "results", "cpu-error-n2048", "error.json")


def config_of(opts) -> RegimeConfig:
    return RegimeConfig(batch=opts.regime_batch, steps=opts.regime_steps, checkpoints=opts.regime_checkpoints,
                        anchors=opts.regime_anchors, lr=opts.lr, tau=opts.regime_tau, protos=opts.npn_protos,
                        restart=opts.npn_restart, epochs=opts.regime_epochs)


def run_regime(opts, out: str, log) -> tuple[str, dict]:
    from training.bench.regime import run_grid  # noqa: PLC0415
    cfg = config_of(opts)
    path = os.path.join(out, "regime.json")
    sizes = {"batch": cfg.batch, "steps": cfg.steps, "checkpoints": cfg.checkpoints, "anchors": cfg.anchors,
             "lr": cfg.lr, "tau": cfg.tau, "protos": cfg.protos, "restart": cfg.restart}
    if cfg.epochs is not None:  # older regime.json files (steps only) stay reusable
        sizes["epochs"] = cfg.epochs
    done, calibration = [], None
    if opts.reuse and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("sizes") == sizes:
            done, calibration = old.get("runs", []), old.get("calibration")
            log(f"[regime] --reuse: {len(done)} run(s) kept from {path}")
    state = {"sizes": sizes, "runs": done, "calibration": calibration}

    def save(runs):
        state["runs"] = runs
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(path + ".tmp", path)

    start = time.perf_counter()
    if opts.regime_calibration and state["calibration"] is None:
        state["calibration"] = run_calibration(cfg, opts.regime_seeds, opts.regime_methods, log)
        save(state["runs"])
    runs = run_grid(cfg, opts.regime_ratios, opts.regime_arms, opts.regime_seeds, opts.regime_methods, log,
                    done=done, on_result=save)
    save(runs)
    state["seconds"] = time.perf_counter() - start
    plot = plot_regime(runs, os.path.join(out, "regime_error.png"))
    return section_markdown(cfg, opts, state, plot), state


# ------------------------------------------------------------------------------------------ calibration

def run_calibration(cfg: RegimeConfig, seeds: list[int], methods: list[str], log) -> dict | None:
    """The simulation at the real miniature's largest n/B (same B, n, samples seen, checkpoints, lr, learnt τ),
    next to the miniature's measured errors (read from its error.json)."""
    if not os.path.exists(CALIBRATION_SOURCE):
        log(f"[regime] calibration skipped: {CALIBRATION_SOURCE} not found")
        return None
    with open(CALIBRATION_SOURCE) as f:
        real = json.load(f)
    runs = [r for r in real["runs"] if r["method"] in methods]
    batch, n = max(((r["batch"], r["n"]) for r in runs), key=lambda bn: bn[1] / bn[0])
    steps = real["samples"] // batch
    real_err = {r["method"]: _mean([c["est_err/mean"] for c in r["scheduled"]])
                for r in runs if (r["batch"], r["n"]) == (batch, n)}
    sim_cfg = RegimeConfig(**{**cfg.__dict__, "batch": batch, "steps": steps, "epochs": None})
    sim = {m: [] for m in real_err}
    for seed in seeds:
        data = FeatureData(n, seed=seed, spec=cfg.spec, drift=False)
        for method in real_err:
            res = run_one(method, ARMS["tau"], sim_cfg, data, seed, steps, checkpoints=real["checkpoints"])
            sim[method].append(res["err"])
            log(f"[regime] calibration n/B {n // batch} seed {seed} {METHOD_LABELS[method]}: sim {res['err']:.3g}, "
                f"real {real_err[method]:.3g}")
    return {"batch": batch, "n": n, "steps": steps, "checkpoints": real["checkpoints"], "source": CALIBRATION_SOURCE,
            "real": real_err, "sim": sim}


def _mean(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


# ------------------------------------------------------------------------------------------ report

def cells(runs: list[dict], arm: str, method: str, ratio: float, key: str) -> list[float]:
    return [r[key] for r in runs if r["arm"] == arm and r["method"] == method and r["ratio"] == ratio]


def relative(runs, arm, method, ratio, last=False) -> list[float]:
    suffix = "_last" if last else ""
    return [r["err" + suffix] / r["err_minibatch" + suffix] for r in runs
            if r["arm"] == arm and r["method"] == method and r["ratio"] == ratio and r["err_minibatch" + suffix] > 0]


def section_markdown(cfg: RegimeConfig, opts, state: dict, plot: str | None) -> str:
    runs = state["runs"]
    ratios = sorted({r["ratio"] for r in runs})
    methods = [m for m in opts.regime_methods if any(r["method"] == m for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    head = ["method"] + [f"n/B = {ratio:g} (n = {ratio * cfg.batch:,.0f})" for ratio in ratios]
    lines = ["## Estimation error vs the data-to-batch ratio (feature-level simulation)", "",
             f"Paper Fig. 2c's regime (DFN-14M, global batch 4096: n/B ≈ 3 400) simulated on fixed synthetic backbone "
             f"features (training.bench.regime_data: latent on a {cfg.spec.latent}-dim sphere from {cfg.spec.clusters} "
             f"Zipf-weighted clusters, d = {cfg.spec.dim}, two linear heads → {cfg.embed}). The project's own parse_args, "
             f"build_method, build_optimizer, LRScheduler and training.loop.train_step drive every run. B = {cfg.batch}, "
             f"{_length(cfg)} (cosine lr {cfg.lr:g}, 10% warm-up), seeds {', '.join(map(str, seeds))}; error = MSE of "
             f"log(ε + g) on {cfg.anchors} random anchors against the exact value over all n "
             f"(training.eval.exact_normalizers), mean of image and text, averaged over "
             f"{_checkpoints(cfg, ratios)}. NeuCLIP: m = {cfg.protos}, "
             f"T_u = {cfg.repetition}, T_r = {cfg.restart}. Fixed arms: τ = {cfg.tau:g}.", ""]
    epochs = {ratio: cfg.steps_for(ratio) / int(ratio) for ratio in ratios}
    lines += ["Epochs run per setting (the paper runs ~24 at n/B ≈ 3 400): "
              + ", ".join(f"n/B {ratio:g}: {e:.2g}" for ratio, e in epochs.items()) + ".", ""]
    for arm in [a for a in opts.regime_arms if any(r["arm"] == a for r in runs)]:
        lines += [f"### Arm `{arm}`: {ARMS[arm].what}", "",
                  "Error (mean over checkpoints; mean ± sd over seeds):", ""]
        rows = []
        for m in methods:
            rows.append([METHOD_LABELS[m]] + [fmt_pm(*mean_std(cells(runs, arm, m, ratio, "err"))) for ratio in ratios])
        for m in [m for m in methods if m != "openclip"]:  # OpenCLIP's estimate is the mini-batch one
            rows.append([f"mini-batch estimate on {METHOD_LABELS[m]}'s features"]
                        + [fmt_pm(*mean_std(cells(runs, arm, m, ratio, "err_minibatch"))) for ratio in ratios])
        lines += [markdown_table(head, rows), "",
                  "Error relative to the mini-batch estimate on the same features (below 1: the method's memory "
                  "helps; mean ± sd over seeds; last checkpoint in brackets):", ""]
        rows = []
        for m in [m for m in methods if m != "openclip"]:
            rows.append([METHOD_LABELS[m]] + [
                f"{fmt_pm(*mean_std(relative(runs, arm, m, ratio)))} ({fmt(mean_std(relative(runs, arm, m, ratio, True))[0])})"
                for ratio in ratios])
        lines += [markdown_table(head, rows), ""]
        taus = [fmt(_mean([c["tau"] for r in runs if r["arm"] == arm and r["method"] == m for c in r["checkpoints"][-1:]]))
                for m in methods]
        speed = [fmt(_mean([r["ms_per_step"] for r in runs if r["arm"] == arm and r["method"] == m])) for m in methods]
        lines += ["τ at the last checkpoint: " + ", ".join(f"{METHOD_LABELS[m]} {t}" for m, t in zip(methods, taus))
                  + "; ms per step: " + ", ".join(f"{METHOD_LABELS[m]} {s}" for m, s in zip(methods, speed)) + ".", ""]
    if plot:
        lines += [f"![estimation error vs n/B]({os.path.basename(plot)})", ""]
    lines += calibration_markdown(state.get("calibration"))
    lines += [f"Wall time of the part: {state.get('seconds', math.nan) / 60:.1f} min; every number above is in "
              f"regime.json.", ""]
    return "\n".join(lines)


def _length(cfg: RegimeConfig) -> str:
    if cfg.epochs is None:
        return f"{cfg.steps} steps"
    return f"{cfg.epochs:g} epochs at every n/B (steps = epochs × n/B)"


def _checkpoints(cfg: RegimeConfig, ratios) -> str:
    if cfg.epochs is None:
        return "checkpoints at steps " + ", ".join(map(str, checkpoint_steps(cfg.steps, cfg.checkpoints)))
    return (f"{cfg.checkpoints} checkpoints at equal fractions of each run (equal epochs; steps "
            + "; ".join(f"n/B {r:g}: " + ", ".join(map(str, checkpoint_steps(cfg.steps_for(r), cfg.checkpoints)))
                        for r in ratios) + ")")


def calibration_markdown(cal: dict | None) -> list[str]:
    if not cal:
        return ["Calibration against the real CPU miniature: not run.", ""]
    head = ["method", "real miniature (1 seed)", "simulation (mean ± sd over seeds)", "sim / real"]
    rows = []
    for m, real in cal["real"].items():
        sim_mean, sim_sd = mean_std(cal["sim"][m])
        rows.append([METHOD_LABELS[m], fmt(real), fmt_pm(sim_mean, sim_sd), fmt(sim_mean / real if real else math.nan)])
    return ["### Calibration at n/B = {:g} against the real CPU miniature".format(cal["n"] / cal["batch"]), "",
            f"The simulation at the setting of `{cal['source']}` with the largest n/B (B = {cal['batch']}, n = "
            f"{cal['n']:,}, {cal['steps']} steps = the same samples seen, {cal['checkpoints']} checkpoints, learnt τ as "
            "there), next to that run's measured errors (neuclip-tiny encoders on the built-in synthetic images):", "",
            markdown_table(head, rows), ""]


def plot_regime(runs: list[dict], path: str) -> str | None:
    """Per arm: the error vs n/B (top) and the error relative to the mini-batch estimate on the same features
    (bottom: with τ learnt the methods reach different temperatures, which the absolute error mixes in)."""
    if not runs:
        return None
    plt = pyplot()
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    fig, axes = plt.subplots(2, len(arms), figsize=(4.5 * len(arms), 7.2), squeeze=False, sharey="row")
    colours = {"openclip": "tab:blue", "fastclip": "tab:orange", "neuclip": "tab:green"}
    for col, arm in enumerate(arms):
        for m in [m for m in colours if any(r["method"] == m and r["arm"] == arm for r in runs)]:
            ratios = sorted({r["ratio"] for r in runs if r["arm"] == arm and r["method"] == m})
            for row, values in ((0, [cells(runs, arm, m, x, "err") for x in ratios]),
                                (1, [relative(runs, arm, m, x) for x in ratios] if m != "openclip" else None)):
                if not values or not all(values):
                    continue
                ax = axes[row][col]
                ax.plot(ratios, [_mean(v) for v in values], "o-", color=colours[m], label=METHOD_LABELS[m])
                ax.fill_between(ratios, [min(v) for v in values], [max(v) for v in values], color=colours[m], alpha=0.2)
        axes[0][col].set_title(f"{arm}: {ARMS[arm].what}", fontsize=8)
        axes[1][col].axhline(1.0, color="tab:blue", linestyle="--", linewidth=1, label="mini-batch estimate")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[1][col].set_xlabel("n / B")
    axes[0][0].set_ylabel("estimation error (MSE of log g)")
    axes[1][0].set_ylabel("error / mini-batch estimate's error")
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    return save_figure(fig, path)
