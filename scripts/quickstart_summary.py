#!/usr/bin/env python
"""The quickstart's closing summary: a few lines a person reads in five seconds.

    PYTHONPATH=src python scripts/quickstart_summary.py logs/NAME [--figure PATH] [--seconds S]

Reads the run folder's last evaluation (checkpoints/results.jsonl) and prints what the last launch
trained (out.log: a resumed launch trains only the rest of the run), the zero-shot mean top-1 against
chance (a random guess on the same held-out tasks), retrieval recall@1, and where the run folder and
the figure are. Exit status 1 when there is no evaluation to report.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from training.data.synthetic.tasks import chance_top1


def last_evaluation(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "checkpoints", "results.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if "builtin/mean_top1" in r]
    return records[-1] if records else None


def last_launch(run_dir: str) -> dict:
    """What out.log says of the last launch: {"resumed": (epoch, batch, step)} when it resumed, and
    {"done": steps} when it finished."""
    path = os.path.join(run_dir, "out.log")
    launch: dict = {}
    if not os.path.isfile(path):
        return launch
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if re.search(r"\| INFO \| Run \S+ \(", line):  # each launch's start-up line
                launch = {}
            resumed = re.search(r"Resumed from \S+ at epoch (\d+), batch (\d+), step (\d+)", line)
            if resumed:
                launch["resumed"] = tuple(int(g) for g in resumed.groups())
            done = re.search(r"\| Done: (\d+) steps", line)
            if done:
                launch["done"] = int(done.group(1))
    return launch


def trained_line(result: dict, launch: dict, took: str) -> str:
    epochs = result.get("epoch", "?")
    done, resumed = launch.get("done"), launch.get("resumed")
    if resumed and done is not None and resumed[2] >= done:
        return (f"Nothing left to train: an earlier launch finished the run's {epochs} epoch(s) ({done} steps); "
                f"its results again (this launch{took}).")
    if resumed and done is not None:
        epoch, batch, step = resumed
        return (f"Resumed at step {step} (epoch {epoch}, batch {batch}) and trained to step {done}{took}: "
                f"{epochs} epoch(s) in all.")
    steps = f", {done} steps" if done is not None else ""
    return f"Trained {epochs} epoch(s){steps}{took}."


def summary(run_dir: str, figure: str | None = None, seconds: float | None = None) -> str:
    result = last_evaluation(run_dir)
    if result is None:
        return f"no evaluation in {run_dir}/checkpoints/results.jsonl: see {run_dir}/out.log"
    chance = chance_top1()
    mean_chance = sum(chance.values()) / len(chance)
    mean = result["builtin/mean_top1"]
    took = f" in {seconds / 60:.1f} min" if seconds is not None else ""
    lines = [trained_line(result, last_launch(run_dir), took),
             f"  zero-shot accuracy  {mean:.1%}  (chance {mean_chance:.1%}: a random guess; mean top-1 of "
             f"{len(chance)} held-out tasks)"]
    i2t, t2i = (result.get(f"builtin/retrieval/{d}_R@1") for d in ("image_to_text", "text_to_image"))
    if i2t is not None and t2i is not None:
        lines.append(f"  retrieval R@1       image->text {i2t:.1%}, text->image {t2i:.1%}  (1000 held-out pairs)")
    lines.append(f"  run folder          {run_dir}  (out.log, params.txt, checkpoints/, tensorboard/)")
    if figure:
        lines.append(f"  figure              {figure}" if os.path.isfile(figure) else f"  figure              not drawn ({figure})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--figure", default=None)
    parser.add_argument("--seconds", type=float, default=None, help="wall time to report")
    args = parser.parse_args(argv)
    text = summary(args.run_dir.rstrip("/"), args.figure, args.seconds)
    print(text)
    return 0 if last_evaluation(args.run_dir) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
