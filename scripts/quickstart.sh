#!/usr/bin/env bash
# The main job on a fresh machine, CPU is enough: install, write the built-in synthetic data set as
# webdataset shards, train NeuCLIP (the reference command's flags) on it, evaluate, say where it went.
# Override anything with environment variables, e.g. EPOCHS=2 NAME=try bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-training.txt

DATA=${DATA:-data/shapes}
SAMPLES=${SAMPLES:-10000}
EPOCHS=${EPOCHS:-4}
NAME=${NAME:-quickstart-neuclip-$(date +%Y%m%d-%H%M%S)}
if [ ! -f "$DATA/info.json" ]; then
  PYTHONPATH=src python -m training.data.synthetic --out "$DATA" --num-samples "$SAMPLES" --samples-per-shard 1000 --workers 2
fi
SHARDS=$(python -c "import json; print(json.load(open('$DATA/info.json'))['pattern'])")

PYTHONPATH=src python -u src/training/main.py \
    --train-data "$SHARDS" --train-num-samples "$SAMPLES" --data_size "$SAMPLES" \
    --model neuclip-tiny --batch-size 64 --epochs "$EPOCHS" --workers 2 --warmup 100 \
    --lr 2e-3 --wd 0.1 --precision fp32 --name "$NAME" --save-most-recent --log-every-n-steps 50 \
    --est-err-every 100 --est-err-samples 1024 \
    --local-loss \
    --fastclip --multiply_tau --temperature_scheme global_learnable --temperature 0.07 \
    --lr_tau 2.5e-4 --lr_tau_scheduler step_thresh --rho 6.5 --fastclip_eps 1e-6 \
    --gamma 0.8 --gamma_schedule cosine --gamma_decay_epochs "$EPOCHS" \
    --npn --npn_lr 1.0 --npn_num_protos 512 --npn_repetition 10 --npn_restart_iter 500

echo
echo "Results: logs/$NAME (out.log, checkpoints/results.jsonl, tensorboard/, checkpoints/epoch_latest.pt)"
tail -n 1 "logs/$NAME/checkpoints/results.jsonl" 2>/dev/null || true
