"""--accum-freq k: k micro-batches give the same update as one batch k times larger, for every method.

As in test_distributed_main.py, AdamW with β1 = β2 = 0, no weight decay and ε = lr = 1e3 moves each
parameter by ≈ −g in its first step, so equal parameters after one step mean equal gradients.
"""
import pytest
import torch

from training.main import main

GRADIENT_REVEALING = ["--lr", "1000", "--lr_tau", "1000", "--eps", "1000", "--beta1", "0", "--beta2", "0",
                      "--wd", "0", "--warmup", "1", "--lr-scheduler", "const", "--lr_tau_scheduler", "const"]
RGCL = ["--fastclip", "--multiply_tau", "--fastclip_eps", "1e-6", "--gamma", "0.5", "--gamma_schedule", "constant"]
METHODS = {
    "openclip": [],
    "siglip": ["--siglip"],
    "fastclip_v3": RGCL,
    "fastclip_v2": ["--fastclip", "--temperature_scheme", "individual_learnable", "--fastclip_eps", "1e-6"],
    "neuclip": [*RGCL, "--npn", "--npn_num_protos", "24", "--npn_repetition", "3"],
    "amorlip": [*RGCL, "--amorlip", "--npn_repetition", "2"],
}


def run(tmp_path, name, batch_size, accum, extra):
    return main(["--logs", str(tmp_path), "--name", name, "--model", "neuclip-tiny", "--dataset-type", "synthetic",
                 "--synthetic-num-samples", "16", "--batch-size", str(batch_size), "--accum-freq", str(accum),
                 "--workers", "0", "--epochs", "1", "--precision", "fp32", "--seed", "7", "--no-train-augmentation",
                 "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0",
                 "--report-to", "", *GRADIENT_REVEALING, *extra])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_four_micro_batches_equal_one_big_batch(tmp_path, method):
    accumulated = run(tmp_path, "accum", 4, 4, METHODS[method])
    big = run(tmp_path, "big", 16, 1, METHODS[method])
    assert accumulated["step"] == big["step"] == 1
    for name, value in big["history"][0][1].items():
        assert accumulated["history"][0][1][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    a = torch.load(tmp_path / "accum" / "checkpoints" / "epoch_1.pt", weights_only=True)
    b = torch.load(tmp_path / "big" / "checkpoints" / "epoch_1.pt", weights_only=True)
    for key in b["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-4, atol=2e-5,
                                   msg=lambda m: f"{key}: {m}")
    for key, value in b["method"].items():
        if value.is_floating_point():
            torch.testing.assert_close(a["method"][key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
