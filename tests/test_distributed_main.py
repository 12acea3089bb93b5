"""torchrun with 2 gloo processes equals 1 process on the same global batch.

The optimizer is set up so that one step reveals the gradient: AdamW with β1 = β2 = 0, no weight
decay and ε = lr = 1e3 moves each parameter by −1e3·g/(|g| + 1e3) ≈ −g. Equal parameters after
the step therefore mean equal gradients; equal logged losses come from TensorBoard.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 16

GRADIENT_REVEALING = ["--lr", "1000", "--lr_tau", "1000", "--eps", "1000", "--beta1", "0", "--beta2", "0",
                      "--wd", "0", "--warmup", "1", "--lr-scheduler", "const", "--lr_tau_scheduler", "const"]

METHODS = {
    "openclip": ["--local-loss", "--gather-with-grad"],
    "fastclip_v3": ["--fastclip", "--multiply_tau", "--fastclip_eps", "1e-6", "--rho", "6.5", "--gamma", "0.5",
                    "--gamma_schedule", "constant"],
    "neuclip": ["--fastclip", "--multiply_tau", "--fastclip_eps", "1e-6", "--npn", "--npn_num_protos", "24",
                "--npn_repetition", "3", "--npn_restart_iter", "2", "--npn_lr", "0.05"],
}


def flags(logs, name, batch_size, extra):
    return ["--logs", str(logs), "--name", name, "--model", "neuclip-tiny", "--dataset-type", "synthetic",
            "--synthetic-num-samples", "32", "--batch-size", str(batch_size), "--workers", "0",
            "--epochs", "1", "--precision", "fp32", "--seed", "5", "--no-train-augmentation",
            "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0",
            *GRADIENT_REVEALING, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged(run_dir, tag):
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def launch_torchrun(argv, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"], "-m", "training.main", "--", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def launch_like_srun(argv, env):
    """What `srun python -u src/training/main.py ...` does: one plain process per task, with slurm's
    variables and the job script's MASTER_ADDR/MASTER_PORT."""
    script = os.path.join(ROOT, "src", "training", "main.py")
    procs = [subprocess.Popen([sys.executable, "-u", script, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": "2"})
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]


@pytest.mark.parametrize("method, launcher", [("openclip", launch_torchrun), ("fastclip_v3", launch_torchrun),
                                              ("neuclip", launch_like_srun)])
def test_two_gloo_ranks_equal_one_process(tmp_path, method, launcher):
    extra = METHODS[method]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        env.pop(var, None)
    launcher(flags(tmp_path, "two", GLOBAL_BATCH // 2, extra), env)
    main(flags(tmp_path, "one", GLOBAL_BATCH, extra))

    two, one = tmp_path / "two", tmp_path / "one"
    loss_tag = "train/loss" if method != "openclip" else "train/contrastive_loss"
    assert logged(two, loss_tag) == pytest.approx(logged(one, loss_tag), rel=1e-5)
    a = torch.load(two / "checkpoints" / "epoch_1.pt", weights_only=True)
    b = torch.load(one / "checkpoints" / "epoch_1.pt", weights_only=True)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-4, atol=2e-5,
                                   msg=lambda m: f"{key}: {m}")
    for key, value in a["method"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, b["method"][key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
