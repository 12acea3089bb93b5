"""The reference NeuCLIP command (DFN-14M slurm script) with its flags verbatim, on 2 CPU processes.

Only what cannot run here is swapped: paths, sample counts, batch size, workers and the model; the
built-in evaluation is switched off and the run folder goes to a temporary directory.
"""
import os
import socket
import subprocess
import sys

import open_clip
import torch

import training  # noqa: F401  (registers neuclip-tiny)
from training.data.synthetic.shards import write_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_flags(shards: str, logs: str) -> list[str]:
    return ("--save-frequency 1 --train-data {shards} --train-num-samples 64 --data_size 64 --warmup 500 "
            "--batch-size 8 --epochs 24 --workers 1 --model neuclip-tiny --name neuclip --seed 2026 --wd 0.2 "
            "--local-loss --fastclip --multiply_tau --temperature_scheme global_learnable --temperature 0.07 "
            "--lr 5e-4 --lr_tau 6.25e-5 --lr_tau_scheduler step_thresh --rho 11.0 --fastclip_eps 1e-6 "
            "--gamma 0.42 --gamma_schedule cosine --gamma_decay_epochs 24 "
            "--npn --npn_lr 1.0 --npn_num_protos 4096 --npn_repetition 10 --npn_restart_iter 500 "
            "--logs {logs} --zeroshot-frequency 0 --val-frequency 0").format(shards=shards, logs=logs).split()


def test_reference_command_trains_on_two_processes_and_open_clip_loads_it(tmp_path):
    write_shards(str(tmp_path / "shards"), 64, seed=0, samples_per_shard=16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "training.main", "--",
           *reference_flags(str(tmp_path / "shards" / "{00000..00003}.tar"), str(tmp_path / "logs"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "logs" / "neuclip"
    log = (run / "out.log").read_text()
    assert "world_size=2 local_batch=8 global_batch=16 steps_per_epoch=4 total_steps=96" in log
    ckpt_path = run / "checkpoints" / "epoch_24.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["epoch"] == 24 and ckpt["step"] == 96
    for name in ("estimator.npn_img.weight", "estimator.npn_txt.weight"):  # m = 4096 prototypes each
        assert ckpt["method"][name].shape == (4096, 64)
        assert torch.isfinite(ckpt["method"][name]).all()
    model, _, _ = open_clip.create_model_and_transforms("neuclip-tiny", pretrained=str(ckpt_path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][key]), key


def test_reference_command_runs_the_temperature_gradient_its_rho_was_tuned_with():
    """Bug: the default --tau_grad stops being `reference`, or the flag stops reaching the method: the
    reference command (which passes no --tau_grad) then follows the objective's own τ gradient, which for
    its ρ 11 settles τ elsewhere than the paper's runs did (scripts/tau_grad_study.py), and no longer
    reproduces the paper. Independent reference: eq. 12 with the NPN's α held fixed, re-stated here,
    F(t) = τ·(D(t) + Σ_m mean(α − 1) + 2ρ) with D = Σ_m mean exp(−α)(ε + g(t)) and τ = e^−t; the
    reference code's gradient is dF/dt + τ·dD/dt, `--tau_grad exact`'s is dF/dt."""
    from contrastive import Features, build_method
    from training.params import method_name, parse_args

    flags = reference_flags("unused/{00000..00003}.tar", "unused-logs")
    n, dim = 16, 8
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(n, dim, generator=g), dim=1)
    got = {}
    for extra in ([], ["--tau_grad", "exact"]):
        args = parse_args(flags + extra)
        model = torch.nn.Module()
        model.logit_scale = torch.nn.Parameter(torch.tensor(1 / args.temperature).log())
        model.text_projection = torch.nn.Parameter(torch.zeros(3, dim))
        torch.manual_seed(0)
        method = build_method(method_name(args), args, model)
        feats = Features(img, txt, model.logit_scale.exp(), torch.arange(n))
        method.before_encoder_step(feats)
        out = method(feats)
        (grad,) = torch.autograd.grad(out.loss, model.logit_scale)
        estimate = next(v for k, v in feats.extras.items() if hasattr(v, "a_img"))
        got[args.tau_grad] = (grad, estimate.a_img.detach().double(), estimate.a_txt.detach().double(), args)
    assert set(got) == {"reference", "exact"}  # the reference command's own default is "reference"

    for mode, (grad, a_img, a_txt, args) in got.items():
        t = torch.tensor(1 / args.temperature, dtype=torch.float64).log().requires_grad_()
        sim = img.double() @ txt.double().T
        off = ~torch.eye(n, dtype=torch.bool)

        def side(s, a):
            g_i = (((s - s.diagonal()[:, None]) * t.exp()).exp() * off).sum(1) / (n - 1)
            return (torch.exp(-a) * (args.fastclip_eps + g_i)).mean(), (a - 1).mean()

        (d_img, rest_img), (d_txt, rest_txt) = side(sim, a_img), side(sim.T, a_txt)
        data = d_img + d_txt
        tau = torch.exp(-t)
        objective = tau * (data + rest_img + rest_txt + 2 * args.rho)
        d_f, d_data = torch.autograd.grad(objective, t, retain_graph=True)[0], torch.autograd.grad(data, t)[0]
        expected = d_f + tau.detach() * d_data if mode == "reference" else d_f
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got["reference"][0], got["exact"][0], rtol=1e-3)
