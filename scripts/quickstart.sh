#!/usr/bin/env bash
# The main job on a fresh machine, CPU is enough: install, write the built-in synthetic data set as
# webdataset shards, train NeuCLIP (the reference command's flags) on it, evaluate, draw the curves and
# say in a few lines how it went and where everything is. A few minutes on 2 busy cores, plus the install
# the first time (README.md, "Two commands on a fresh machine", has the measured numbers).
# Override anything with environment variables, e.g. EPOCHS=2 SAMPLES=3000 NAME=try bash scripts/quickstart.sh
# (INSTALL=0 skips the pip install; WORKERS sets --workers); extra arguments go to the trainer.
# The run folder's name is stable (logs/quickstart-neuclip-SAMPLES): after a Ctrl-C, running this script
# again resumes the run from its checkpoint; NAME=another-name starts a new one.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

# matplotlib draws the figure; the trainer itself does not need it.
if [ "${INSTALL:-1}" != 0 ]; then
  echo "Installing requirements-training.txt and matplotlib (first time: torch is a large download, minutes)..."
  python -m pip install -q --progress-bar on -r requirements-training.txt "matplotlib>=3.8"
fi

# The command that runs this again with the same settings (the resume hint after a Ctrl-C).
RERUN="INSTALL=0"
for setting in SAMPLES EPOCHS WORKERS DATA NAME; do
  if [ -n "${!setting:-}" ]; then RERUN="$RERUN $setting=$(printf %q "${!setting}")"; fi
done
RERUN="$RERUN bash scripts/quickstart.sh"
for arg in "$@"; do RERUN="$RERUN $(printf %q "$arg")"; done

SAMPLES=${SAMPLES:-6000}
EPOCHS=${EPOCHS:-3}
WORKERS=${WORKERS:-1}  # data loading takes ~5% of a step here; another worker would take a core from torch
DATA=${DATA:-data/shapes-$SAMPLES}  # the size in the name: another SAMPLES never reuses this folder
NAME=${NAME:-quickstart-neuclip-$SAMPLES}
if [ -f "logs/$NAME/params.txt" ]; then
  echo "logs/$NAME exists from an earlier launch: resuming it from its newest checkpoint (a finished run"
  echo "trains nothing more and is summarised again; NAME=another-name bash scripts/quickstart.sh starts a new run)."
fi
if [ ! -f "$DATA/info.json" ]; then
  echo "Writing $SAMPLES built-in samples to $DATA ..."
  PYTHONPATH=src python -m training.data.synthetic --out "$DATA" --num-samples "$SAMPLES" --samples-per-shard 500 --workers 2
fi
SHARDS=$(python -c "import json; print(json.load(open('$DATA/info.json'))['pattern'])")

# --train-num-samples must match the folder: the trainer refuses a mismatch with its info.json.
# --builtin-eval: these shards are the built-in data set, so its held-out evaluation applies (on other
# --train-data the trainer evaluates only --val-data / --imagenet-val, as open_clip does).
STATUS=0
PYTHONPATH=src python -u src/training/main.py \
    --train-data "$SHARDS" --train-num-samples "$SAMPLES" --data_size "$SAMPLES" \
    --model neuclip-tiny --batch-size 64 --epochs "$EPOCHS" --workers "$WORKERS" --warmup 100 \
    --lr 2e-3 --wd 0.1 --precision fp32 --name "$NAME" --save-most-recent --log-every-n-steps 50 \
    --est-err-every 100 --est-err-samples 1024 \
    --builtin-eval \
    --local-loss \
    --fastclip --multiply_tau --temperature_scheme global_learnable --temperature 0.07 \
    --lr_tau 2.5e-4 --lr_tau_scheduler step_thresh --rho 6.5 --fastclip_eps 1e-6 \
    --gamma 0.8 --gamma_schedule cosine --gamma_decay_epochs "$EPOCHS" \
    --npn --npn_lr 1.0 --npn_num_protos 512 --npn_repetition 10 --npn_restart_iter 500 "$@" || STATUS=$?
if [ "$STATUS" = 130 ]; then  # Ctrl-C: the trainer wrote a checkpoint and said so
  echo "Interrupted. To resume logs/$NAME from its checkpoint: $RERUN"
  exit 130
elif [ "$STATUS" != 0 ]; then
  exit "$STATUS"
fi

FIGURE="logs/$NAME/curves.png"
python scripts/plot_runs.py "logs/$NAME" --out "$FIGURE" --title "NeuCLIP quickstart" > /dev/null \
  || echo "(figure not drawn: scripts/plot_runs.py failed, see above)"
echo
PYTHONPATH=src python scripts/quickstart_summary.py "logs/$NAME" --figure "$FIGURE" --seconds $(( $(date +%s) - START ))
