#!/bin/bash
# The reference NeuCLIP job (scripts/slurm/neuclip_dfn14m.sh) on CPUs: its srun line, flags verbatim
# (tests/test_slurm.py checks that), with the #SBATCH lines that make preemption safe. Flags given to
# sbatch after the script's name go last and override the reference's (argparse keeps the last value):
#
#   sbatch scripts/slurm/neuclip_cpu.sh --train-data 'shards/{00000..00009}.tar' --train-num-samples 1000 \
#       --data_size 1000 --model neuclip-tiny --batch-size 32 --npn_num_protos 64
#
# --requeue + --signal=USR1@120: 120 s before the time limit every task gets SIGUSR1, the trainer writes a
#   step checkpoint, rank 0 requeues the job and the tasks exit with status 75; the requeued job (same
#   id) finds the run folder and resumes. A preemption (PreemptMode=REQUEUE) or `scontrol requeue` sends
#   SIGTERM: a step checkpoint, and the requeued job resumes. `scancel` (SIGTERM, SIGKILL after the
#   cluster's KillWait) stops after a step checkpoint; submitting the job again resumes.
# --open-mode=append: a requeued job appends to its log instead of truncating it.
#SBATCH --job-name=neuclip-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=./job_output/%x_%j.log

master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$master_addr
# A port of the job's own: jobs that share a node (an array, a requeue) must not meet at one port.
export MASTER_PORT=${MASTER_PORT:-$((12805 + SLURM_JOB_ID % 20000))}

export PYTHONPATH="$PYTHONPATH:$PWD/src"
export HUGGINGFACE_HUB_CACHE='./checkpoints/huggingface'

srun python -u src/training/main.py \
    --save-frequency 1 \
    --train-data './datasets/dfn2b/medium/shards/0000{0000..1926}.tar' \
    --train-num-samples 13710637 --data_size 19270000 \
    --warmup 500 \
    --batch-size 512 \
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
    "$@"
