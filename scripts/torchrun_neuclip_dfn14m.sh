#!/usr/bin/env bash
# The reference NeuCLIP command on DFN-14M (scripts/slurm/neuclip_dfn14m.sh, 2 nodes x 4 GPUs) as a
# single-node torchrun script. The global batch is 4096 as in the reference (8 ranks x 512): the
# per-rank batch is 4096 / NPROC, so NPROC must divide 4096. Everything else is the reference's flags.
#
#   NPROC=8 bash scripts/torchrun_neuclip_dfn14m.sh [extra training.main flags...]
#
# Environment: NPROC (8), TRAIN_DATA (the reference's shard pattern), DRY_RUN=1 (print, don't run),
# TORCHRUN (torchrun). Extra flags go last and override the reference's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

GLOBAL_BATCH=4096
NPROC=${NPROC:-8}
[[ $NPROC =~ ^[1-9][0-9]*$ ]] && (( GLOBAL_BATCH % NPROC == 0 )) \
    || { echo "NPROC=$NPROC must divide the global batch $GLOBAL_BATCH" >&2; exit 2; }
BATCH=$(( GLOBAL_BATCH / NPROC ))
REFERENCE_DATA='./datasets/dfn2b/medium/shards/0000{0000..1926}.tar'
TRAIN_DATA=${TRAIN_DATA:-$REFERENCE_DATA}

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HUGGINGFACE_HUB_CACHE=${HUGGINGFACE_HUB_CACHE:-./checkpoints/huggingface}

CMD=("${TORCHRUN:-torchrun}" --standalone --nnodes 1 --nproc_per_node "$NPROC" -m training.main -- \
    --save-frequency 1 \
    --train-data "$TRAIN_DATA" \
    --train-num-samples 13710637 --data_size 19270000 \
    --warmup 500 \
    --batch-size "$BATCH" \
    --epochs 24 \
    --workers 6 \
    --model ViT-B-32 \
    --name neuclip \
    --seed 2026 \
    --wd 0.2 \
    --local-loss \
    --fastclip --multiply_tau --temperature_scheme global_learnable --temperature 0.07 \
    --lr 5e-4 --lr_tau 6.25e-5 --lr_tau_scheduler step_thresh --rho 11.0 --fastclip_eps 1e-6 \
    --gamma 0.42 --gamma_schedule cosine --gamma_decay_epochs 24 \
    --npn --npn_lr 1.0 --npn_num_protos 4096 --npn_repetition 10 --npn_restart_iter 500 \
    "$@")

echo "# global batch $GLOBAL_BATCH = $NPROC x $BATCH" >&2
if [ "${DRY_RUN:-0}" != 0 ]; then
    out=()
    for a in "${CMD[@]}"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "PYTHONPATH=src ${out[*]}"
    exit 0
fi
exec "${CMD[@]}"
