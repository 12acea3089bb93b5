#!/usr/bin/env python
"""Training curves of one or more run folders side by side: panels like NeuCLIP's Figures 1-2.

    python scripts/plot_runs.py logs/RUN_A logs/RUN_B ... --out docs/figures/NAME.png
        [--labels A B ...] [--metric builtin/mean_top1] [--smooth 0.6] [--title TEXT]

Every panel is against samples seen (step x global batch; the global batch is batch_size x world_size
from the run's params.txt), one line per run, labelled by run folder name (or --labels):

  Training loss         TensorBoard train/loss (the gcl family's objective), else train/contrastive_loss
                        (OpenCLIP, SigLIP): each method's own objective; raw values faint, smoothed solid
                        (a centred EMA: the mean of a forward and a backward one, which does not lag).
  Temperature           train/tau, else 1 / train/logit_scale.
  Estimation error      diag/est_err/mean (training.eval.estimation_error), else checkpoints/results.jsonl's est_err/mean.
  Zero-shot accuracy    checkpoints/results.jsonl's --metric (builtin/mean_top1), written after each epoch.
                        An evaluation line has only its epoch: its x is epoch x samples per epoch, with the
                        steps per epoch that out.log's start-up line reports. The axis starts at 0; for
                        builtin/mean_top1 a dashed line marks chance (a random guess on the same tasks).
  Retrieval R@1         results.jsonl's builtin/retrieval image->text and text->image recall@1, per epoch.

A sixth panel is the caption: what each panel shows, in words.

A run that lacks a quantity is left out of that panel. When a run was resumed, the last value logged for a
step wins. Needs only matplotlib and tensorboard (no torch): pip install -r requirements-eval.txt.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, PercentFormatter  # noqa: E402

Curve = tuple[list[float], list[float]]  # (samples seen, values), sorted by samples seen

LOSS_TAGS = ("train/loss", "train/contrastive_loss")
EST_ERR_TAG, EST_ERR_KEY = "diag/est_err/mean", "est_err/mean"
DEFAULT_METRIC = "builtin/mean_top1"
RETRIEVAL_KEYS = {"image→text": "builtin/retrieval/image_to_text_R@1",
                  "text→image": "builtin/retrieval/text_to_image_R@1"}
RETRIEVAL_MARKERS = {"image→text": "o", "text→image": "^"}
CAPTION = """What each panel shows (x: samples seen = steps x global batch)

Training loss: each method's own objective at each logged
step; faint: raw values, solid: smoothed.
Temperature: tau (learned, or 1 / logit scale).
Normalizer estimation error: mean squared error of the
log-normaliser estimate the loss uses, against its exact
value on a fixed reference set (every --est-err-every
steps and at each epoch end); lower is better.
Zero-shot accuracy: mean top-1 on held-out tasks after
each epoch; dashed: chance, a random guess.
Retrieval R@1: held-out image->text (circles) and
text->image (triangles) recall@1 after each epoch."""


@dataclass
class Run:
    label: str
    global_batch: int
    loss: Curve | None = None
    loss_name: str = ""
    tau: Curve | None = None
    est_err: Curve | None = None
    accuracy: Curve | None = None
    retrieval: dict[str, Curve] = field(default_factory=dict)  # {"image→text": curve, ...}
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- reading

def read_params(run_dir: str) -> dict[str, str]:
    path = os.path.join(run_dir, "params.txt")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)


def global_batch(params: dict[str, str]) -> int:
    def number(name: str, default: int) -> int:
        value = params.get(name, "None")
        return int(value) if value.lstrip("-").isdigit() else default
    return number("batch_size", 1) * number("world_size", 1) * number("accum_freq", 1)


def steps_per_epoch(run_dir: str, params: dict[str, str], batch: int) -> int | None:
    """From out.log's start-up line (its last one: a resumed run logs it again), else params.txt's
    train_num_samples // global batch (exact for map-style data, which drops the partial last batch)."""
    path = os.path.join(run_dir, "out.log")
    found = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                match = re.search(r"\bsteps_per_epoch=(\d+)", line)
                if match:
                    found = int(match.group(1))
    if found:
        return found
    samples = params.get("train_num_samples", "None")
    return int(samples) // batch if samples.isdigit() and int(samples) >= batch else None


def tensorboard_scalars(run_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the run's TensorBoard events (empty when there are none). Each launch of a
    resumed run wrote a file of its own: read one by one, oldest first, a later launch's points replace
    an earlier one's from its first step of that tag on (the steps it trained again). Read as one
    stream, TensorBoard's "out of order" purge dropped points that no later launch wrote again."""
    log_dir = os.path.join(run_dir, "tensorboard")
    files = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    if not files:
        return {}
    from tensorboard.backend.event_processing import event_accumulator  # noqa: PLC0415  (slowish import)

    def launch_order(path: str) -> tuple:
        stamp = os.path.basename(path).split(".")[3]
        return (int(stamp) if stamp.isdigit() else 0, path)

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(files, key=launch_order):
        accumulator = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.SCALARS: 0},
                                                         purge_orphaned_data=False)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            written = {}
            for event in sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time):
                written[event.step] = event.value  # the latest write of a step wins
            if written:
                first = min(written)
                scalars[tag] = {**{k: v for k, v in scalars.get(tag, {}).items() if k < first}, **written}
    return scalars


def results_lines(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "checkpoints", "results.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(points: dict[float, float]) -> Curve | None:
    finite = sorted((x, y) for x, y in points.items() if math.isfinite(y))
    if not finite:
        return None
    return [x for x, _ in finite], [y for _, y in finite]


def load_run(run_dir: str, label: str | None = None, metric: str = DEFAULT_METRIC) -> Run:
    run_dir = run_dir.rstrip("/")
    params = read_params(run_dir)
    batch = global_batch(params)
    run = Run(label or os.path.basename(run_dir), batch)
    if not params:
        run.notes.append("no params.txt: global batch taken as 1")
    scalars = tensorboard_scalars(run_dir)

    def samples(steps: dict[int, float]) -> dict[float, float]:
        return {step * batch: value for step, value in steps.items()}

    for tag in LOSS_TAGS:
        if tag in scalars:
            run.loss, run.loss_name = curve(samples(scalars[tag])), tag.split("/", 1)[1]
            break
    if "train/tau" in scalars:
        run.tau = curve(samples(scalars["train/tau"]))
    elif "train/logit_scale" in scalars:
        run.tau = curve({x: 1.0 / v for x, v in samples(scalars["train/logit_scale"]).items() if v > 0})

    lines = results_lines(run_dir)
    if EST_ERR_TAG in scalars:
        run.est_err = curve(samples(scalars[EST_ERR_TAG]))
    else:
        run.est_err = curve({line["samples_seen"]: line[EST_ERR_KEY] for line in lines
                             if EST_ERR_KEY in line and "samples_seen" in line})
    evaluations = [line for line in lines if metric in line or RETRIEVAL_KEYS["image→text"] in line]
    per_epoch = steps_per_epoch(run_dir, params, batch) if evaluations else None

    def placed(key: str) -> dict[float, float]:
        points = {}
        for line in evaluations:
            if key not in line:
                continue
            if "samples_seen" in line:
                points[line["samples_seen"]] = line[key]
            elif per_epoch and "epoch" in line:
                points[line["epoch"] * per_epoch * batch] = line[key]
        return points

    points = placed(metric)
    if any(metric in line for line in evaluations) and not points:
        run.notes.append(f"{metric}: no steps per epoch in out.log or params.txt, evaluations not placed")
    run.accuracy = curve(points)
    run.retrieval = {name: found for name, key in RETRIEVAL_KEYS.items() if (found := curve(placed(key)))}
    return run


def chance_of(metric: str) -> float | None:
    """A random guess's score on the built-in held-out tasks (from the task definitions in src/, which
    this script finds next to it); None for any other metric."""
    if metric != DEFAULT_METRIC:
        return None
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    try:
        from training.data.synthetic.tasks import chance_top1  # noqa: PLC0415
    except ImportError:
        return None
    chance = chance_top1()
    return sum(chance.values()) / len(chance)


# ------------------------------------------------------------------------------------------ plotting

def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    if not 0 < weight < 1:
        return list(values)
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def centred_ema(values: list[float], weight: float) -> list[float]:
    """The mean of a forward and a backward debiased EMA. A forward EMA lags: on a falling loss it sits
    above every raw point, by a lot when there are few points (a run logging every 50 steps has a
    handful); the backward one lags the other way, so their mean follows the raw values."""
    forward = ema(values, weight)
    backward = ema(values[::-1], weight)[::-1]
    return [(a + b) / 2 for a, b in zip(forward, backward)]


MIN_POINTS_TO_SMOOTH = 10  # fewer: the raw values are the line


def markers(points: int) -> dict:
    """A line through one point draws nothing: a single point gets a marker."""
    return {"marker": "o", "markersize": 5} if points == 1 else {}


def human(x: float, _pos=None) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= size:
            return f"{x / size:g}{suffix}"
    return f"{x:g}"


def style(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, fontweight="bold", loc="left")
    ax.set_xlabel("Samples seen")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_formatter(FuncFormatter(human))
    ax.grid(True, which="major", alpha=0.35, linestyle="--", linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.55", fontsize=10)


def log_scale_if_wide(ax, curves: list[Curve]) -> None:
    values = [y for _, ys in curves for y in ys]
    if values and min(values) > 0 and max(values) / min(values) > 30:
        ax.set_yscale("log")


def plot(runs: list[Run], out: str, metric: str = DEFAULT_METRIC, smooth: float = 0.6,
         title: str | None = None) -> str:
    colours = plt.get_cmap("tab10").colors
    dashes = ("-", "--", "-.", ":")  # overlapping runs (same τ schedule, say) stay distinguishable
    fig, axes = plt.subplots(2, 3, figsize=(17, 8), constrained_layout=True)
    (ax_loss, ax_tau, ax_err), (ax_acc, ax_ret, ax_caption) = axes
    loss_names = sorted({run.loss_name for run in runs if run.loss})
    style(ax_loss, "Training loss", "each method's objective" if len(loss_names) > 1 else
          (loss_names[0] if loss_names else "loss"))
    style(ax_tau, "Temperature", r"$\tau$")
    style(ax_err, "Normalizer estimation error", r"MSE of $\log(\varepsilon + g)$")
    style(ax_acc, "Zero-shot accuracy", metric)
    style(ax_ret, "Retrieval R@1", "recall@1 (held-out pairs)")
    ax_caption.axis("off")
    ax_caption.text(0.0, 1.0, CAPTION, transform=ax_caption.transAxes, va="top", ha="left", fontsize=9.5,
                    color="0.25", linespacing=1.35)

    handles = []
    for index, run in enumerate(runs):
        line = {"color": colours[index % len(colours)], "linestyle": dashes[index % len(dashes)]}
        if run.loss:
            xs, ys = run.loss
            if 0 < smooth < 1 and len(ys) >= MIN_POINTS_TO_SMOOTH:
                ax_loss.plot(xs, ys, color=line["color"], alpha=0.22, linewidth=0.8)
                ys = centred_ema(ys, smooth)
            ax_loss.plot(xs, ys, linewidth=1.8, **line, **markers(len(xs)))
        if run.tau:
            ax_tau.plot(*run.tau, linewidth=1.8, **line, **markers(len(run.tau[0])))
        if run.est_err:
            ax_err.plot(*run.est_err, linewidth=1.6, marker="o", markersize=3.5, **line)
        if run.accuracy:
            ax_acc.plot(*run.accuracy, linewidth=1.8, marker="o", markersize=4.5, **line)
        for direction, points in run.retrieval.items():
            ax_ret.plot(*points, linewidth=1.6, marker=RETRIEVAL_MARKERS[direction], markersize=4.5, **line)
        handles.append(Line2D([], [], linewidth=2.2, label=run.label, **line))

    for ax, attribute, why in ((ax_loss, "loss", "no train/loss in TensorBoard"),
                               (ax_tau, "tau", "no train/tau or train/logit_scale"),
                               (ax_err, "est_err", "no estimation error (--est-err-every)"),
                               (ax_acc, "accuracy", f"no {metric} in results.jsonl"),
                               (ax_ret, "retrieval", "no builtin/retrieval in results.jsonl")):
        curves = [getattr(run, attribute) for run in runs if getattr(run, attribute)]
        if attribute == "retrieval":
            curves = [c for run in runs for c in run.retrieval.values()]
        if not curves:
            empty(ax, why)
        elif attribute == "est_err":
            log_scale_if_wide(ax, curves)
        elif attribute in ("accuracy", "retrieval"):  # from 0: a rise reads as what it is
            chance = chance_of(metric) if attribute == "accuracy" else None
            values = [y for _, ys in curves for y in ys] + ([chance] if chance is not None else [])
            if chance is not None:
                ax.axhline(chance, color="0.45", linestyle="--", linewidth=1.2, zorder=0)
                ax.annotate(f"chance {chance:.1%}", (0.99, chance), xycoords=("axes fraction", "data"),
                            xytext=(0, -11), textcoords="offset points", ha="right", fontsize=9, color="0.35")
            ax.set_ylim(0, min(1.0, max(values) * 1.15 + 0.01))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1 if max(values) < 0.05 else 0))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), frameon=False,
               fontsize=10)
    if title:
        fig.suptitle(title, fontsize=13, fontweight="bold")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=150, facecolor="white")
    plt.close(fig)
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (logs/NAME)")
    parser.add_argument("--out", required=True, help="PNG to write, e.g. docs/figures/NAME.png")
    parser.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run (default: folder names)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="results.jsonl key of the accuracy panel")
    parser.add_argument("--smooth", type=float, default=0.6, help="EMA weight of the loss curves (0: raw)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"{len(args.labels)} --labels for {len(args.runs)} runs")
    missing = [run for run in args.runs if not os.path.isdir(run)]
    if missing:
        parser.error(f"not a run folder: {', '.join(missing)}")
    runs = [load_run(run, label, args.metric) for run, label in zip(args.runs, args.labels or [None] * len(args.runs))]
    for run in runs:
        for note in run.notes:
            print(f"{run.label}: {note}", file=sys.stderr)
    path = plot(runs, args.out, args.metric, args.smooth, args.title)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
