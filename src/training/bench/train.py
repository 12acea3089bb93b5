"""Parts 2 and 3 of `training.bench`: real trainings through `training.main.main([...])`, read back from their
run folders (checkpoints/results.jsonl, out.log, params.txt); starting and reusing them: `training.bench.runs`.

Part 2, estimation error vs batch size and data size (NeuCLIP paper Figure 2c, Figure 4): OpenCLIP, FastCLIP-v3
and NeuCLIP on the built-in synthetic data at two batch sizes and two data sizes (n and 10n), every run the
same samples seen S; the error (training.eval.estimation_error: mean squared error of log-normalizers against the truth on
a fixed reference set) at C checkpoints k·S/C, the same samples seen in every setting, averaged over the C
checkpoints as the paper does. Measured in training by --est-err-every; should a scheduled record be missing
from results.jsonl, it is computed from that step's iter checkpoint with training.eval.estimation_error' own functions.

Part 3, quality at a fixed budget (Table 1 in miniature): all five methods, the same samples seen, several seeds;
zero-shot top-1 on the built-in held-out tasks (builtin/mean_top1 and per task) and retrieval R@1, mean ± std.
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os
import sys

from training.batching import global_batch
from training.bench.common import METHOD_LABELS, REPO_ROOT, fmt, fmt_pm, markdown_table, mean_std, pyplot, save_figure
from training.bench.runs import results_lines, run_once, train_flags, train_spec
from training.bench.targets import error_target_lines, last_checkpoint_lines, quality_target_lines

EST_KEY = "est_err/mean"
TASKS = ("colour", "shape", "size", "position", "background", "relation")
R1_KEYS = ("builtin/retrieval/image_to_text_R@1", "builtin/retrieval/text_to_image_R@1")


# ------------------------------------------------------------------------------------------ part 2

def error_settings(opts) -> list[dict]:
    small, large = sorted(opts.error_batches)
    n = opts.error_n
    return [{"batch": b, "n": size, "label": f"B={b}, {tag}"} for size, tag in ((n, "n"), (10 * n, "10n"))
            for b in (small, large)]


def checkpoint_steps(samples: int, count: int, batch: int) -> list[int]:
    every = samples // count
    if samples % count or every % batch:
        raise ValueError(f"samples seen {samples} / {count} checkpoints must be a multiple of batch {batch}")
    return [k * every // batch for k in range(1, count + 1)]


def run_error(opts, out_dir: str, log) -> tuple[str, dict]:
    logs = os.path.join(out_dir, "runs", "error")
    settings = error_settings(opts)
    samples, count = opts.error_samples, opts.error_checkpoints
    runs = []
    for family in opts.error_methods:
        spec = train_spec(family, opts)
        for setting in settings:
            b, n = setting["batch"], setting["n"]
            steps = checkpoint_steps(samples, count, b)
            every = steps[0]
            reference = min(n, opts.error_reference)
            name = f"{spec.key}-b{b}-n{n}"
            flags = train_flags(opts, logs, name, spec, batch=b, n=n, samples=samples, seed=0, evaluate=False,
                                extra=["--est-err-every", str(every), "--est-err-samples", str(reference),
                                       "--save-every-n-steps", str(every), "--keep-last-k", str(count + 2)])
            log(f"[error] {spec.label}, {setting['label']} (n={n}): {samples // b} steps, error every {every} steps "
                f"on {reference} reference samples")

            def extract(run_dir, summary, steps=steps, reference=reference):
                return extract_errors(run_dir, steps, reference, opts.device, log)
            result = run_once(flags, os.path.join(logs, name), opts.reuse, extract, log)
            runs.append({"method": family, "key": spec.key, "label": spec.label, "batch": b, "n": n,
                         "setting": setting["label"], "reference": reference, "run_dir": os.path.join(logs, name),
                         "steps": steps, "restart_every": opts.npn_restart if family == "neuclip" else None, **result})
    data = {"runs": runs, "samples": samples, "checkpoints": count, "settings": settings,
            "methods": opts.error_methods, "n": opts.error_n}
    data["plots"] = [plot_error_bars(data, os.path.join(out_dir, "error_bars.png")),
                     plot_error_curves(data, os.path.join(out_dir, "error_curves.png"))]
    return error_markdown(data, opts), data


def extract_errors(run_dir: str, steps: list[int], reference: int, device: str, log) -> dict:
    records = [r for r in results_lines(run_dir) if EST_KEY in r]
    by_step = {int(r["step"]): r for r in records}
    scheduled, problems = [], []
    for step in steps:
        record = by_step.get(step)
        source = "training (--est-err-every)"
        if record is None:
            source = "checkpoint (training.eval.estimation_error)"
            try:
                record = error_from_checkpoint(run_dir, step, reference, device)
            except Exception as exc:  # noqa: BLE001  (reported, not fatal: the other runs still count)
                problems.append(f"step {step}: {type(exc).__name__}: {exc}")
                log(f"  no estimation error at step {step}: {exc}")
                continue
        scheduled.append({"step": step, "source": source, **{k: record.get(k) for k in
                          ("est_err/mean", "est_err/image", "est_err/text", "est_bias/image", "est_bias/text",
                           "epoch", "samples_seen")}})
    points = {int(r["step"]): r[EST_KEY] for r in records}
    points.update({r["step"]: r[EST_KEY] for r in scheduled if r.get(EST_KEY) is not None})
    curve = sorted(points.items())
    return {"scheduled": scheduled, "curve": curve, "problems": problems}


_REFERENCES: dict = {}


def checkpoint_at(run_dir: str, step: int) -> str:
    """iter_{step}.pt, else the epoch checkpoint taken at that step (the last step's is an epoch_N.pt)."""
    import torch  # noqa: PLC0415
    folder = os.path.join(run_dir, "checkpoints")
    path = os.path.join(folder, f"iter_{step}.pt")
    if os.path.exists(path):
        return path
    for candidate in sorted(glob.glob(os.path.join(folder, "epoch_*.pt"))):
        try:
            if int(torch.load(candidate, map_location="cpu", weights_only=True, mmap=True).get("step", -1)) == step:
                return candidate
        except Exception:  # noqa: BLE001,S112  (an unreadable file is just not the one)
            continue
    raise FileNotFoundError(f"no results.jsonl record and no checkpoint of step {step} in {folder}")


def error_from_checkpoint(run_dir: str, step: int, reference: int, device: str) -> dict:
    """The diagnostic on checkpoints/iter_{step}.pt, as `python -m training.eval.diagnostics --iter` computes it."""
    import torch  # noqa: PLC0415

    from training.eval import diagnostics as diag_cli, estimation_error as diag  # noqa: PLC0415
    path = checkpoint_at(run_dir, step)
    args = diag_cli.run_args(run_dir)
    dev = torch.device(device)
    args.device, args.rank, args.is_master = str(dev), 0, True
    args.precision = "fp32" if dev.type == "cpu" else "amp_bf16"
    model, method, preprocess_val, tokenizer, ckpt = diag_cli.load_run(run_dir, path, args, dev)
    key = (run_dir, reference)
    if key not in _REFERENCES:
        _REFERENCES.clear()
        _REFERENCES[key] = diag.reference_set(args, preprocess_val, tokenizer, reference)
    metrics = diag.estimation_error(model, method, _REFERENCES[key], args, dev, step=step)
    batch = global_batch(args)
    return {**metrics, "step": step, "samples_seen": step * batch, "epoch": ckpt.get("epoch")}


def mean_error(run: dict) -> tuple[float, float]:
    return mean_std([r["est_err/mean"] for r in run["scheduled"] if r.get("est_err/mean") is not None])


def error_markdown(data: dict, opts) -> str:
    settings, runs = data["settings"], data["runs"]
    find = {(r["method"], r["batch"], r["n"]): r for r in runs}
    small, large = sorted(opts.error_batches)
    n = data["n"]
    lines = ["## 2. Estimation error vs batch size and data size", ""]
    lines.append(f"Paper Figure 2c in miniature. Every run sees S = {data['samples']} samples "
                 f"({data['samples'] // n} epochs of n = {n}, {data['samples'] // (10 * n)} of 10n = {10 * n}); the "
                 f"error (`est_err/mean`, training.eval.estimation_error: mean over image and text anchors of "
                 f"(a_i − log(ε + g(i, S_ref)))²) is taken at {data['checkpoints']} checkpoints, k·S/"
                 f"{data['checkpoints']} samples seen, identical across settings, and averaged over them (the "
                 f"paper's 'mean across checkpoints'). Reference set S_ref: the first min(n, {opts.error_reference}) "
                 f"training samples by key — the whole data set for n, a subset for 10n (its truth is then itself an "
                 f"average over R − 1 negatives, R ≫ B). Mini-batch estimates are taken on batches of the run's "
                 f"own size. Same lr ({opts.lr}), warm-up (10% of steps), seed 0 everywhere. NeuCLIP: "
                 f"m = {opts.npn_protos}, "
                 f"T_u = 10, T_r = {opts.npn_restart}, AdaGrad lr 1.0.")
    lines.append("")
    header = ["method", *(s["label"] for s in settings), f"B {small} vs {large} (×)", "10n vs n (×)"]
    rows = []
    for family in data["methods"]:
        cells, means = [], {}
        for s in settings:
            run = find.get((family, s["batch"], s["n"]))
            m, sd = mean_error(run) if run else (math.nan, math.nan)
            means[(s["batch"], s["n"])] = m
            cells.append(fmt_pm(m, sd))
        batch_ratio = _mean_ratio([(means[(small, size)], means[(large, size)]) for size in (n, 10 * n)])
        size_ratio = _mean_ratio([(means[(b, 10 * n)], means[(b, n)]) for b in (small, large)])
        rows.append([METHOD_LABELS[family], *cells, fmt(batch_ratio), fmt(size_ratio)])
    lines += [markdown_table(header, rows), ""]
    lines.append("Cells: mean ± sd over the checkpoints. Ratios: error at the smaller batch over the larger (mean of "
                 "the two data sizes), and at 10n over n (mean of the two batch sizes).")
    lines += ["", *last_checkpoint_lines(data), *error_target_lines(data)]
    bias_rows = []
    for family in data["methods"]:
        cells = []
        for s in settings:
            run = find.get((family, s["batch"], s["n"]))
            values = [0.5 * (r["est_bias/image"] + r["est_bias/text"]) for r in (run or {}).get("scheduled", [])
                      if r.get("est_bias/image") is not None]
            cells.append(fmt_pm(*mean_std(values)))
        bias_rows.append([METHOD_LABELS[family], *cells])
    lines += ["", "Mean bias (a_i − t_i, image and text averaged) over the same checkpoints: a systematic offset "
              "(the mini-batch estimate's Jensen gap, stale moving averages) as opposed to noise:", "",
              markdown_table(["method", *(s["label"] for s in settings)], bias_rows), ""]
    lines.append("Where the checkpoints fall: optimizer steps done · epochs done · steps since NeuCLIP's last NPN "
                 f"restart (restarts run at steps 0, T_r, 2·T_r, …; T_r = {opts.npn_restart}). FastCLIP's γ is 1 "
                 "throughout epoch 0, so before the data set has been seen once its u is the latest batch value.")
    lines.append("")
    header = ["setting", *(f"checkpoint {k} ({k * data['samples'] // data['checkpoints']} samples)"
                           for k in range(1, data["checkpoints"] + 1))]
    rows = []
    for s in settings:
        steps = checkpoint_steps(data["samples"], data["checkpoints"], s["batch"])
        rows.append([s["label"], *(f"{st} · {st * s['batch'] / s['n']:.2f} · {_since_restart(st, opts.npn_restart)}"
                                   for st in steps)])
    lines += [markdown_table(header, rows), ""]
    longest = max(checkpoint_steps(data["samples"], data["checkpoints"], min(opts.error_batches)))
    if "neuclip" in data["methods"] and (opts.npn_restart <= 0 or opts.npn_restart >= longest):
        lines += [f"With T_r = {opts.npn_restart} and at most {longest} steps per run, NeuCLIP's NPN restarts only "
                  "once, at step 0: these runs show the NPN tracking the encoders without periodic re-initialisation "
                  "(`--npn-restart` changes it).", ""]
    sources = {r2["source"] for r in runs for r2 in r["scheduled"]}
    problems = [f"{r['label']}, {r['setting']}: {p}" for r in runs for p in r.get("problems", [])]
    lines += ["", "Source of the values: " + ", ".join(sorted(sources)) + "."]
    if problems:
        lines += ["", "**Missing values:**", *(f"- {p}" for p in problems)]
    total = sum(r.get("seconds", 0) for r in runs)
    lines += ["", f"{len(runs)} trainings, {total:.0f} s of training wall time (including the in-training "
              "measurements).", "", "![estimation error](error_bars.png)", "",
              "![estimation error along training](error_curves.png)", ""]
    return "\n".join(lines)


def _since_restart(step: int, period: int) -> int:
    """Steps done since the last restart when `step` steps are done (restarts run at step indices 0, T_r, …)."""
    if period <= 0:
        return step
    return step - period * ((step - 1) // period)


def _mean_ratio(pairs) -> float:
    ratios = [a / b for a, b in pairs if b and not math.isnan(a) and not math.isnan(b)]
    return sum(ratios) / len(ratios) if ratios else math.nan


def plot_error_bars(data: dict, path: str) -> str:
    plt = pyplot()
    settings, methods = data["settings"], data["methods"]
    find = {(r["method"], r["batch"], r["n"]): r for r in data["runs"]}
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(settings)
    colours = plt.get_cmap("tab20c").colors
    for j, s in enumerate(settings):
        means, points = [], []
        for family in methods:
            run = find.get((family, s["batch"], s["n"]))
            means.append(mean_error(run)[0] if run else math.nan)
            points.append([r[EST_KEY] for r in (run or {}).get("scheduled", []) if r.get(EST_KEY) is not None])
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, means, width, label=s["label"], color=colours[[0, 1, 4, 5][j % 4]])
        for x, ys in zip(xs, points):
            ax.plot([x] * len(ys), ys, "k.", markersize=3)
    ax.set_xticks(range(len(methods)), [METHOD_LABELS[m] for m in methods])
    ax.set_ylabel(f"estimation error (mean of {data['checkpoints']} checkpoints)")
    ax.set_yscale("log")
    ax.set_title(f"Estimation error of log-normalizers, {data['samples']} samples seen per run\n"
                 "bars: mean over checkpoints; dots: the checkpoints", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_error_curves(data: dict, path: str) -> str:
    plt = pyplot()
    methods = data["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), sharey=True, squeeze=False)
    styles = ["-", "--", "-", "--"]
    colours = ["tab:blue", "tab:blue", "tab:red", "tab:red"]
    for ax, family in zip(axes[0], methods):
        for j, s in enumerate(data["settings"]):
            run = next((r for r in data["runs"] if (r["method"], r["batch"], r["n"]) == (family, s["batch"], s["n"])),
                       None)
            if run and run["curve"]:
                ax.plot([st * s["batch"] for st, _ in run["curve"]], [v for _, v in run["curve"]], styles[j],
                        color=colours[j], marker=".", label=s["label"])
        ax.set_title(METHOD_LABELS[family], fontsize=10)
        ax.set_xlabel("samples seen")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("est_err/mean")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------ part 3

def run_quality(opts, out_dir: str, log) -> tuple[str, dict]:
    logs = os.path.join(out_dir, "runs", "quality")
    runs = []
    for family in opts.quality_methods:
        spec = train_spec(family, opts)
        for seed in opts.seeds:
            name = f"{spec.key}-s{seed}"
            flags = train_flags(opts, logs, name, spec, batch=opts.quality_batch, n=opts.quality_n,
                                samples=opts.quality_samples, seed=seed, evaluate=True)
            log(f"[quality] {spec.label}, seed {seed}: {opts.quality_samples // opts.quality_batch} steps")
            result = run_once(flags, os.path.join(logs, name), opts.reuse, extract_quality, log)
            runs.append({"method": family, "key": spec.key, "label": spec.label, "seed": seed,
                         "run_dir": os.path.join(logs, name), **result})
    data = {"runs": runs, "methods": opts.quality_methods, "seeds": opts.seeds, "samples": opts.quality_samples,
            "batch": opts.quality_batch, "n": opts.quality_n}
    data["plots"] = [plot_quality(data, os.path.join(out_dir, "quality.png"))]
    curves = plot_training_curves(data, os.path.join(out_dir, "quality_training_curves.png"), log)
    if curves:
        data["plots"].append(curves)
    return quality_markdown(data, opts, curves), data


def extract_quality(run_dir: str, summary: dict) -> dict:
    evals = [r for r in results_lines(run_dir) if "builtin/mean_top1" in r]
    return {"metrics": evals[-1] if evals else {}}


def quality_columns() -> list[tuple[str, str]]:
    return ([("builtin/mean_top1", "zero-shot mean top-1")] + [(f"builtin/{t}/top1", t) for t in TASKS]
            + [(R1_KEYS[0], "R@1 image→text"), (R1_KEYS[1], "R@1 text→image")])


def quality_markdown(data: dict, opts, curves: str | None) -> str:
    lines = ["## 3. Quality at a fixed budget", ""]
    lines.append(f"Table 1 in miniature: every method sees {data['samples']} samples (batch {data['batch']}, "
                 f"{data['samples'] // data['n']} epochs of the built-in synthetic data, n = {data['n']}), seeds "
                 f"{', '.join(map(str, data['seeds']))}; then zero-shot top-1 on the built-in held-out tasks "
                 f"(`builtin/mean_top1` and per task; relation = choosing among 4 candidate captions) and retrieval "
                 f"R@1 on the built-in held-out retrieval split (training.eval.evaluation). Mean ± sample sd over seeds "
                 f"(one seed: no sd). Same lr ({opts.lr}), wd 0.1, 10% warm-up, cosine schedule for every method; "
                 f"NeuCLIP m = {opts.npn_protos}, T_u = 10, T_r = {opts.npn_restart}.")
    lines.append("")
    columns = quality_columns()
    rows = []
    for family in data["methods"]:
        runs = [r for r in data["runs"] if r["method"] == family]
        cells = [fmt_pm(*mean_std([100 * r["metrics"][k] for r in runs if k in r["metrics"]]), 3) for k, _ in columns]
        secs = mean_std([r["seconds"] for r in runs if "seconds" in r])[0]
        rows.append([METHOD_LABELS[family], *cells, f"{secs:.0f}"])
    lines += [markdown_table(["method", *(c for _, c in columns), "wall s / run"], rows), ""]
    lines.append("Accuracies and recalls in %. Wall time per run includes evaluation and is as noisy as the machine.")
    lines += ["", *quality_target_lines(data)]
    missing = [f"{r['key']} seed {r['seed']}" for r in data["runs"] if not r["metrics"]]
    if missing:
        lines += ["", "**No evaluation record for:** " + ", ".join(missing)]
    lines += ["", "![quality](quality.png)", ""]
    if curves:
        lines += [f"Training curves of the seed-{data['seeds'][0]} runs (scripts/plot_runs.py):", "",
                  f"![training curves]({os.path.basename(curves)})", ""]
    return "\n".join(lines)


def plot_quality(data: dict, path: str) -> str:
    plt = pyplot()
    panels = [("builtin/mean_top1", "zero-shot mean top-1 (%)"), ("R@1", "retrieval R@1, mean of both directions (%)")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    methods = data["methods"]
    for ax, (key, title) in zip(axes, panels):
        for i, family in enumerate(methods):
            values = []
            for r in (r for r in data["runs"] if r["method"] == family):
                m = r["metrics"]
                if key == "R@1" and all(k in m for k in R1_KEYS):
                    values.append(50 * (m[R1_KEYS[0]] + m[R1_KEYS[1]]))
                elif key in m:
                    values.append(100 * m[key])
            mean, sd = mean_std(values)
            ax.bar(i, mean, 0.6, yerr=0 if math.isnan(sd) else sd, capsize=3, color="tab:gray", alpha=0.6)
            ax.plot([i] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(methods)), [METHOD_LABELS[m] for m in methods], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{data['samples']} samples seen, batch {data['batch']}; bars: mean ± sd over seeds, dots: seeds",
                 fontsize=9)
    return save_figure(fig, path)


def plot_training_curves(data: dict, path: str, log) -> str | None:
    """scripts/plot_runs.py's grid for the first seed of each method (it is optional: a failure is logged)."""
    script = os.path.join(REPO_ROOT, "scripts", "plot_runs.py")
    if not os.path.exists(script):
        return None
    try:
        module = sys.modules.get("bench_plot_runs")
        if module is None:
            spec = importlib.util.spec_from_file_location("bench_plot_runs", script)
            module = importlib.util.module_from_spec(spec)
            sys.modules["bench_plot_runs"] = module  # its dataclasses look their module up there
            spec.loader.exec_module(module)
        seed = data["seeds"][0]
        runs = [module.load_run(r["run_dir"], r["label"]) for r in data["runs"] if r["seed"] == seed]
        module.plot(runs, path)
        return path
    except Exception as exc:  # noqa: BLE001
        log(f"  scripts/plot_runs.py could not plot the training curves: {type(exc).__name__}: {exc}")
        return None
