"""The NPN inner loop's GEMMs at GPU precision, and the checks that need a GPU (marked `cuda`).

The `cuda` tests are what scripts/gpu_check.sh runs first; without CUDA they are skipped (there is no GPU in
CI). The CPU tests check the split-bf16 arithmetic with an exact CPU stand-in for CUDA's bf16 GEMM with an
fp32 result: products of bf16 numbers are exact in fp32, so `x.float() @ y.float()` is that GEMM up to the
order of the fp32 additions.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import contrastive.npn as npn_module
from contrastive.npn import OBJECTIVES, PrototypeNPN, split_bf16_mm

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def emulated_bf16_mm(a, b):
    assert a.dtype == b.dtype == torch.bfloat16
    return a.float() @ b.float()


def npn_problem(n=256, m=1024, d=128, seed=0, device="cpu"):
    """Unit anchors, prototypes of the restart's norm (20·√d), positive similarities, λ = 1/0.02, log g."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    weight = F.normalize(txt[torch.randint(n, (m,), generator=g)] + 0.3 * torch.randn(m, d, generator=g,
                                                                                      dtype=torch.float64), dim=1)
    weight = weight * 20 * math.sqrt(d)
    log_norm = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 + 2
    return [t.to(device) for t in (img, (img * txt).sum(1), torch.tensor(50.0, dtype=torch.float64), log_norm,
                                   weight)]


def value_and_grad(problem, dtype, gemm="fp32"):
    anchors, pos, scale, log_norm, weight = (t.to(dtype) for t in problem)
    npn = PrototypeNPN(*weight.shape).to(device=weight.device, dtype=dtype)
    npn.weight.data.copy_(weight)
    value, (grad,) = npn.value_and_grad(anchors, pos, scale, 1e-6, log_norm, "unified", gemm)
    return value.double(), grad.double()


def relative_error(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


def test_split_bf16_product_is_within_a_small_factor_of_fp32():
    """Catches a split GEMM that loses the low half (hi·hi only: plain-bf16 error), adds a term twice, or
    rounds an intermediate to bf16: its error must stay within 32× fp32's own, which plain bf16 misses by far."""
    anchors, _, _, _, weight = npn_problem()
    g = torch.Generator().manual_seed(1)
    grad_rows = torch.randn(256, 1024, generator=g, dtype=torch.float64) * 1e-3
    for a, b in ((anchors, weight.T), (grad_rows.T, anchors)):
        ref = a @ b
        fp32 = relative_error((a.float() @ b.float()).double(), ref)
        split = relative_error(split_bf16_mm(a.float(), b.float(), emulated_bf16_mm).double(), ref)
        plain = relative_error((a.bfloat16() @ b.bfloat16()).double(), ref)
        assert split < 32 * fp32, (split, fp32)
        assert plain > 32 * fp32  # the bound separates the two: a test that could not fail would not
        assert split < plain / 100


def test_inner_loop_step_with_split_gemms_stays_near_fp32(monkeypatch):
    """Catches the split GEMMs wired into the wrong place of the closed-form gradient (the radial term, the
    1/|W| scaling, the transposes): the objective and ∂J/∂W with "bf16x3" stay within a few × fp32's error."""
    problem = npn_problem()
    monkeypatch.setattr(npn_module, "gemm_kernel", lambda gemm, device: (
        torch.mm if gemm == "fp32" else (lambda a, b: split_bf16_mm(a, b, emulated_bf16_mm))))
    ref_value, ref_grad = value_and_grad(problem, torch.float64)
    value32, grad32 = value_and_grad(problem, torch.float32)
    value_split, grad_split = value_and_grad(problem, torch.float32, "bf16x3")
    assert not torch.equal(grad_split, grad32)  # the split GEMMs did run
    e32, e_split = relative_error(grad32, ref_grad), relative_error(grad_split, ref_grad)
    assert e_split < 32 * max(e32, 1e-7), (e_split, e32)
    assert abs(value_split - ref_value) <= 32 * max(abs(value32 - ref_value), 1e-7 * abs(ref_value))


def test_unknown_gemm_precision_is_one_clear_error():
    """Catches a typo in the GEMM mode silently falling back to fp32 on CUDA (the CPU always uses fp32)."""
    assert npn_module.gemm_kernel("bf16x3", torch.device("cpu")) is torch.mm
    with pytest.raises(ValueError, match="fp32 or bf16x3"):
        npn_module.gemm_kernel("bf16", torch.device("cuda"))


# ------------------------------------------------------------------------------------------ CUDA only

@pytest.mark.cuda
@needs_cuda
def test_cuda_split_gemm_kernel_matches_fp64():
    """Catches CUDA's bf16 GEMM with an fp32 result (torch.mm out_dtype) missing or rounding to bf16."""
    problem = npn_problem(512, 4096, 512, device="cuda")
    ref_value, ref_grad = value_and_grad(problem, torch.float64)
    _, grad32 = value_and_grad(problem, torch.float32)
    _, grad_split = value_and_grad(problem, torch.float32, "bf16x3")
    e32 = relative_error(grad32, ref_grad)
    assert relative_error(grad_split, ref_grad) < 32 * max(e32, 1e-7)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_cuda_closed_form_npn_gradient_equals_autograd(autocast):
    """Catches the closed form diverging from autograd on the GPU, in fp32 and with bf16 autocast around it
    (the closed form turns autocast off; autograd's reference runs in fp64)."""
    anchors, pos, scale, log_norm, weight = npn_problem(128, 512, 64, device="cuda")
    npn = PrototypeNPN(*weight.shape).cuda()
    npn.weight.data.copy_(weight)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        value, (grad,) = npn.value_and_grad(anchors.float(), pos.float(), scale.float(), 1e-6, log_norm.float(),
                                            "unified")
    ref = npn.double()
    expected = OBJECTIVES["unified"](ref(anchors, pos, scale, 1e-6), log_norm, scale)
    (expected_grad,) = torch.autograd.grad(expected, [ref.weight])
    assert relative_error(grad.double(), expected_grad) < 1e-4
    assert abs(value.double() - expected.detach()) < 1e-4 * abs(expected.item())


@pytest.mark.cuda
@needs_cuda
def test_cuda_loss_core_matches_cpu():
    """Catches a device-dependent loss core (masking, log-sum-exp shifts, dtype casts): the batch
    log-normalizers and the data term on CUDA equal the CPU's."""
    from contrastive import core
    from contrastive.features import Features
    anchors, _, _, _, _ = npn_problem(64, 8, 32)
    g = torch.Generator().manual_seed(2)
    txt = F.normalize(anchors + 0.4 * torch.randn(anchors.shape, generator=g, dtype=torch.float64), dim=1)
    out = {}
    for device in ("cpu", "cuda"):
        img, t = anchors.float().to(device), txt.float().to(device)
        scale = torch.tensor(1 / 0.05, device=device)
        feats = Features(img, t, scale, torch.arange(64, device=device))
        out[device] = [x.cpu().double() for x in core.batch_log_normalizers(core.similarity(feats), scale, scale,
                                                                            1e-6)]
    for cpu, cuda in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_cuda_two_neuclip_steps_with_bf16_and_torch_compile(tmp_path):
    """Catches the bf16 + torch.compile path of a NeuCLIP run failing on a GPU (dtype mix-ups between the
    compiled encoders and the NPN, the split GEMMs, fused AdamW on CUDA) or producing non-finite losses."""
    from training.data.synthetic.shards import write_shards
    from training.main import main
    write_shards(str(tmp_path / "shards"), 32, seed=0, samples_per_shard=8)
    summary = main(["--logs", str(tmp_path), "--name", "gpu", "--model", "neuclip-tiny", "--batch-size", "16",
                    "--workers", "1", "--train-data", str(tmp_path / "shards" / "{00000..00003}.tar"),
                    "--train-num-samples", "32", "--epochs", "1", "--precision", "amp_bf16", "--torchcompile",
                    "--fastclip", "--multiply_tau", "--lr_tau_scheduler", "step_thresh", "--npn",
                    "--npn_num_protos", "64", "--log-every-n-steps", "1", "--zeroshot-frequency", "0",
                    "--val-frequency", "0", "--report-to", "", "--device", "cuda"])
    assert summary["step"] == 2
    assert all(math.isfinite(v) for _, terms in summary["history"] for v in terms.values())


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", ["openclip", "fastclip", "neuclip"])
def test_cuda_non_logging_steps_do_not_synchronise(family):
    """Catches syncs the CPU count cannot see (inside C++ ops: masked indexing, unique, nonzero): with
    torch.cuda.set_sync_debug_mode("warn") a non-logging, non-restart step of a real CUDA run warns only from
    the host-by-design per-sample table (FastCLIP's moving average)."""
    import warnings
    from test_host_syncs import run_steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            marks = run_steps(family, torch.device("cuda"), lambda: len(caught), precision="amp_bf16")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Step 2 only: step 1 also restarts the NPN, which copies CPU-drawn random rows to the device on purpose
    # (a CPU generator seeded by (seed, step) gives every rank the same prototypes); step 3 logs.
    steps = [caught[a:b] for a, b in zip(marks, marks[1:])][1:2]
    bad = [f"{w.filename}:{w.lineno}: {w.message}" for step in steps for w in step
           if not w.filename.endswith("table.py")]
    assert not bad, bad
