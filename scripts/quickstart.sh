#!/usr/bin/env bash
# The main job on a fresh machine, CPU is enough: install, write the built-in synthetic data set as
# webdataset shards, train NeuCLIP (the reference command's flags) on it, evaluate, draw the curves and
# say in a few lines how it went and where everything is. About 5-10 minutes on 2 busy cores.
# Override anything with environment variables, e.g. EPOCHS=2 SAMPLES=3000 NAME=try bash scripts/quickstart.sh
# (INSTALL=0 skips the pip install; WORKERS sets --workers); extra arguments go to the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

# matplotlib draws the figure; the trainer itself does not need it.
if [ "${INSTALL:-1}" != 0 ]; then
  echo "Installing requirements-training.txt and matplotlib (first time: torch is a large download, minutes)..."
  python -m pip install -q --progress-bar on -r requirements-training.txt "matplotlib>=3.8"
fi

SAMPLES=${SAMPLES:-6000}
EPOCHS=${EPOCHS:-3}
WORKERS=${WORKERS:-1}  # data loading takes ~5% of a step here; another worker would take a core from torch
DATA=${DATA:-data/shapes-$SAMPLES}  # the size in the name: another SAMPLES never reuses this folder
NAME=${NAME:-quickstart-neuclip-$(date +%Y_%m_%d-%H_%M_%S)}
if [ ! -f "$DATA/info.json" ]; then
  echo "Writing $SAMPLES built-in samples to $DATA ..."
  PYTHONPATH=src python -m training.data.synthetic --out "$DATA" --num-samples "$SAMPLES" --samples-per-shard 500 --workers 2
fi
SHARDS=$(python -c "import json; print(json.load(open('$DATA/info.json'))['pattern'])")

# --train-num-samples must match the folder: the trainer refuses a mismatch with its info.json.
PYTHONPATH=src python -u src/training/main.py \
    --train-data "$SHARDS" --train-num-samples "$SAMPLES" --data_size "$SAMPLES" \
    --model neuclip-tiny --batch-size 64 --epochs "$EPOCHS" --workers "$WORKERS" --warmup 100 \
    --lr 2e-3 --wd 0.1 --precision fp32 --name "$NAME" --save-most-recent --log-every-n-steps 50 \
    --est-err-every 100 --est-err-samples 1024 \
    --local-loss \
    --fastclip --multiply_tau --temperature_scheme global_learnable --temperature 0.07 \
    --lr_tau 2.5e-4 --lr_tau_scheduler step_thresh --rho 6.5 --fastclip_eps 1e-6 \
    --gamma 0.8 --gamma_schedule cosine --gamma_decay_epochs "$EPOCHS" \
    --npn --npn_lr 1.0 --npn_num_protos 512 --npn_repetition 10 --npn_restart_iter 500 "$@"

FIGURE="logs/$NAME/curves.png"
python scripts/plot_runs.py "logs/$NAME" --out "$FIGURE" --title "NeuCLIP quickstart" > /dev/null \
  || echo "(figure not drawn: scripts/plot_runs.py failed, see above)"
echo
PYTHONPATH=src python scripts/quickstart_summary.py "logs/$NAME" --figure "$FIGURE" --seconds $(( $(date +%s) - START ))
