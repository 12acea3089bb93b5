#!/usr/bin/env bash
# The paper's training settings (NeuCLIP, ICLR 2026: Tables 2-4, section 5.2, appendix B.3/B.6) as one
# launcher. Usage, from anywhere:
#
#   bash scripts/recipes/run.sh DATASET METHOD [extra training.main flags...]
#   bash scripts/recipes/run.sh --list
#
#   DATASET  cc3m | cc12m | dfn14m | dfn192m | dfn1b
#   METHOD   neuclip | fastclip | openclip | siglip | amorlip             (Tables 1, 6-10)
#            neuclip-mlp | neuclip-sep | neuclip-sep-mlp                   (Tables 12-14: MLP NPN,
#                                                                           separate objective, both)
#            neuclip-simul                                                 (B.3, Figure 3)
#            neuclip-trN   T_r = N, 0 = never restart                      (Table 15: 0 20 100 500 2500 12500)
#            neuclip-tuN   T_u = N                                         (Table 16: 1 5 10 20 50)
#
# Extra flags go last, so they override the recipe's (argparse keeps the last value).
#
# Environment:
#   LAUNCH=torchrun (default)  one node, NPROC (default 8) processes; per-rank batch = global / NPROC
#   LAUNCH=srun                inside an sbatch allocation; per-rank batch = global / SLURM_NTASKS;
#                              MASTER_ADDR defaults to the first node, MASTER_PORT to 12805
#   DRY_RUN=1                  print the command (one line, shell-quoted) instead of running it
#   DATA_ROOT                  root of the img2dataset folders (default ./datasets)
#   TRAIN_DATA                 shard pattern for this run; else CC3M_DATA, CC12M_DATA, DFN14M_DATA,
#                              DFN192M_DATA, DFN1B_DATA; else the defaults below under DATA_ROOT
#   NUM_SAMPLES                --train-num-samples: the samples you actually downloaded (default:
#                              the paper's count); epochs = ceil(samples seen / NUM_SAMPLES)
#   DATA_SIZE                  --data_size, the sample-key space; default (highest shard number in the
#                              pattern + 1) x SAMPLES_PER_SHARD (10000): img2dataset's keys are
#                              shard * 10000 + offset, with gaps
#   EPOCHS, GLOBAL_BATCH, SEED (2026), NAME (DATASET-METHOD-sSEED), LOGS (./logs), WORKERS (6),
#   PYTHON (python), TORCHRUN (torchrun)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DATASETS="cc3m cc12m dfn14m dfn192m dfn1b"
METHODS="neuclip fastclip openclip siglip amorlip neuclip-mlp neuclip-sep neuclip-sep-mlp neuclip-simul"
TR_VALUES="0 20 100 500 2500 12500"   # Table 15 (row 0 = T_r infinite: never restart)
TU_VALUES="1 5 10 20 50"              # Table 16

die() { echo "run.sh: $*" >&2; exit 2; }
usage() { sed -n '2,32p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

if [ "${1:-}" = "--list" ]; then
    echo "datasets: $DATASETS"
    echo "methods: $METHODS" $(printf 'neuclip-tr%s ' $TR_VALUES) $(printf 'neuclip-tu%s ' $TU_VALUES)
    exit 0
fi
if [ $# -lt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    usage
    [ $# -ge 2 ] && exit 0 || exit 2
fi
DATASET=$1
METHOD=$2
shift 2

DATA_ROOT=${DATA_ROOT:-./datasets}

# ---- per data set: Table 2 (size, samples seen, encoder, global batch) and Table 3 (lr, lr_tau, wd,
# warmup, rho). Sizes: CC3M and CC12M as downloaded by the paper (appendix B.5), DFN-14M as in the
# reference command; DFN-192M and DFN-1B are the paper's rounded sizes (set NUM_SAMPLES).
# gamma (FastCLIP's moving-average rate; unused by NeuCLIP/AmorLIP, passed as the reference does):
# DFN-14M 0.42 decaying over all epochs (reference command). Not given by the paper elsewhere:
# CC3M/CC12M use FastCLIP's published CC3M choice (0.2, decay over half the epochs);
# DFN-192M/DFN-1B reuse DFN-14M's (0.42, decay over all epochs).
case "$DATASET" in
    cc3m)
        MODEL=RN50; GLOBAL=1024; SIZE=2723840; SEEN=100000000
        LR=1e-3; LR_TAU=1.25e-4; WD=0.1; WARMUP=10000; RHO=6.5; GAMMA=0.2; GAMMA_DECAY=half
        DEFAULT_DATA="$DATA_ROOT/cc3m_webdataset/cc3m_train/{00000..00331}.tar"
        USER_DATA=${CC3M_DATA:-} ;;
    cc12m)
        MODEL=ViT-B-32; GLOBAL=2048; SIZE=9187328; SEEN=300000000
        LR=4e-4; LR_TAU=5e-5; WD=0.1; WARMUP=10000; RHO=8.5; GAMMA=0.2; GAMMA_DECAY=half
        DEFAULT_DATA="$DATA_ROOT/cc12m_webdataset/cc12m_train/{00000..01242}.tar"
        USER_DATA=${CC12M_DATA:-} ;;
    dfn14m)
        MODEL=ViT-B-32; GLOBAL=4096; SIZE=13710637; SEEN=320000000
        LR=5e-4; LR_TAU=6.25e-5; WD=0.2; WARMUP=500; RHO=11.0; GAMMA=0.42; GAMMA_DECAY=all
        DEFAULT_DATA="$DATA_ROOT/dfn2b/medium/shards/0000{0000..1926}.tar"
        USER_DATA=${DFN14M_DATA:-} ;;
    dfn192m)
        MODEL=ViT-B-16; GLOBAL=5120; SIZE=192000000; SEEN=1300000000
        LR=3.125e-4; LR_TAU=3.9e-5; WD=0.2; WARMUP=500; RHO=11.0; GAMMA=0.42; GAMMA_DECAY=all
        # assumed layout (the paper gives none): 10^4-sample shards, fully packed
        DEFAULT_DATA="$DATA_ROOT/dfn192m/shards/{00000000..00019199}.tar"
        USER_DATA=${DFN192M_DATA:-} ;;
    dfn1b)
        MODEL=ViT-B-16; GLOBAL=5120; SIZE=1000000000; SEEN=1000000000
        LR=3.125e-4; LR_TAU=3.9e-5; WD=0.2; WARMUP=500; RHO=11.0; GAMMA=0.42; GAMMA_DECAY=all
        # assumed layout (the paper gives none): 10^4-sample shards, fully packed
        DEFAULT_DATA="$DATA_ROOT/dfn1b/shards/{00000000..00099999}.tar"
        USER_DATA=${DFN1B_DATA:-} ;;
    *) die "unknown data set '$DATASET' (choose from: $DATASETS)" ;;
esac

TRAIN=${TRAIN_DATA:-${USER_DATA:-$DEFAULT_DATA}}
NUM_SAMPLES=${NUM_SAMPLES:-$SIZE}
GLOBAL=${GLOBAL_BATCH:-$GLOBAL}
EPOCHS=${EPOCHS:-$(( (SEEN + NUM_SAMPLES - 1) / NUM_SAMPLES ))}   # Table 2's samples seen, rounded up
if [ "$GAMMA_DECAY" = half ]; then GAMMA_DECAY=$(( EPOCHS / 2 > 0 ? EPOCHS / 2 : 1 )); else GAMMA_DECAY=$EPOCHS; fi

# --data_size: (highest shard number + 1) x samples per shard, over every '::'-joined pattern
key_space() {
    local pattern=$1 per=${SAMPLES_PER_SHARD:-10000} best=-1 part top re='([0-9]*)\{([0-9]+)\.\.([0-9]+)\}\.tar$'
    local IFS=$'\n'
    for part in ${pattern//::/$'\n'}; do
        if [[ $part =~ $re ]]; then
            top=$((10#${BASH_REMATCH[1]}${BASH_REMATCH[3]}))
        elif [[ $part =~ ([0-9]+)\.tar$ ]]; then
            top=$((10#${BASH_REMATCH[1]}))
        else
            return 1
        fi
        (( top > best )) && best=$top
    done
    echo $(( (best + 1) * per ))
}

# ---- method flags. Table 4 (NPN): AdaGrad, lr 1.0, wd 0, m 4096, T_r 500, T_u 10.
FAMILY=1; TR=500; TU=10; EXTRA=()
case "$METHOD" in
    neuclip)         ;;
    neuclip-mlp)     EXTRA=(--npn_arch mlp) ;;
    neuclip-sep)     EXTRA=(--npn_objective regression) ;;
    neuclip-sep-mlp) EXTRA=(--npn_objective regression --npn_arch mlp) ;;
    neuclip-simul)   EXTRA=(--npn_update simultaneous) ;;
    neuclip-tr*)     [[ ${METHOD#neuclip-tr} =~ ^[0-9]+$ ]] || die "bad T_r in '$METHOD' (neuclip-trN, N >= 0)"
                     TR=$((10#${METHOD#neuclip-tr})) ;;
    neuclip-tu*)     [[ ${METHOD#neuclip-tu} =~ ^[0-9]+$ ]] || die "bad T_u in '$METHOD' (neuclip-tuN, N >= 1)"
                     TU=$((10#${METHOD#neuclip-tu})) ;;
    fastclip|amorlip) ;;
    openclip|siglip) FAMILY=0 ;;
    *) die "unknown method '$METHOD' (choose from: $METHODS neuclip-trN neuclip-tuN)" ;;
esac
if [ "$FAMILY" = 1 ]; then
    # the global contrastive loss family with RGCL-g (FastCLIP-v3's loss): FastCLIP, NeuCLIP, AmorLIP
    if [ -z "${DATA_SIZE:-}" ]; then
        DATA_SIZE=$(key_space "$TRAIN") || die "cannot read shard numbers from '$TRAIN': set DATA_SIZE (max sample key + 1)"
    fi
    LOSS=(--local-loss --data_size "$DATA_SIZE"
          --fastclip --multiply_tau --temperature_scheme global_learnable --temperature 0.07
          --lr_tau "$LR_TAU" --lr_tau_scheduler step_thresh --rho "$RHO" --fastclip_eps 1e-6
          --gamma "$GAMMA" --gamma_schedule cosine --gamma_decay_epochs "$GAMMA_DECAY")
    case "$METHOD" in
        fastclip) ;;
        amorlip) LOSS+=(--amorlip) ;;  # AmorLIP's own settings: the trainer's defaults (not given by the paper)
        *) LOSS+=(--npn --npn_lr 1.0 --npn_num_protos 4096 --npn_repetition "$TU" --npn_restart_iter "$TR" "${EXTRA[@]}") ;;
    esac
elif [ "$METHOD" = openclip ]; then
    LOSS=(--local-loss --gather-with-grad)
else
    LOSS=(--siglip)
fi

# ---- launcher and per-rank batch
LAUNCH=${LAUNCH:-torchrun}
case "$LAUNCH" in
    torchrun)
        WORLD=${NPROC:-8}
        PREFIX=("${TORCHRUN:-torchrun}" --standalone --nnodes 1 --nproc_per_node "$WORLD" -m training.main --) ;;
    srun)
        [ -n "${SLURM_NTASKS:-}" ] || die "LAUNCH=srun needs an sbatch allocation (SLURM_NTASKS is not set)"
        WORLD=$SLURM_NTASKS
        PREFIX=(srun "${PYTHON:-python}" -u src/training/main.py) ;;
    *) die "LAUNCH must be torchrun or srun, not '$LAUNCH'" ;;
esac
[[ $WORLD =~ ^[1-9][0-9]*$ ]] || die "bad world size '$WORLD'"
(( GLOBAL % WORLD == 0 )) || die "global batch $GLOBAL does not split over $WORLD processes"
BATCH=$(( GLOBAL / WORLD ))
SEED=${SEED:-2026}

FLAGS=(--save-frequency 1
       --train-data "$TRAIN"
       --train-num-samples "$NUM_SAMPLES"
       --warmup "$WARMUP"
       --batch-size "$BATCH"
       --epochs "$EPOCHS"
       --workers "${WORKERS:-6}"
       --model "$MODEL"
       --name "${NAME:-$DATASET-$METHOD-s$SEED}"
       --logs "${LOGS:-./logs}"
       --seed "$SEED"
       --wd "$WD"
       --lr "$LR"
       "${LOSS[@]}"
       "$@")

quote() {  # one shell word per argument, single-quoted where needed
    local out=() a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

echo "# $DATASET $METHOD: global batch $GLOBAL = $WORLD x $BATCH ($LAUNCH), $EPOCHS epochs x $NUM_SAMPLES samples" >&2
if [ "${DRY_RUN:-0}" != 0 ]; then
    echo "PYTHONPATH=src $(quote "${PREFIX[@]}" "${FLAGS[@]}")"
    exit 0
fi

cd "$REPO"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$LAUNCH" = srun ]; then
    if [ -z "${MASTER_ADDR:-}" ]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi
    export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-12805}
fi
exec "${PREFIX[@]}" "${FLAGS[@]}"
