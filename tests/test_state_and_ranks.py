"""State that must survive a checkpoint or be shared by ranks, each checked where a bug would hide:
the NPN's ring of recent embeddings mid-ring, the loop's own averaging of the method's gradients on two
real gloo ranks whose gradients differ, every rank's own RNG streams through the checkpoint manager,
the loop's logit-scale clamp at its bounds, and the per-sample τ gradient clamp at its bounds."""
import io
import math
import os
import random
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from contrastive import Features
from contrastive.core import batch_log_normalizers
from contrastive.estimator_interface import BatchStats
from contrastive.gcl import GlobalContrastiveMethod
from contrastive.neuclip import NeuCLIPEstimator
from contrastive.openclip import SigLipMethod
from contrastive.temperature import TAU_GRAD_CLAMP, GlobalTemperature, per_sample_tau_gradient
from training.checkpoint import CheckpointManager, atomic_save
from training.loop import MAX_LOGIT_SCALE, _step_optimizer, train_one_epoch
from training.train_state import TrainState

WORLD, DIM = 2, 8

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


def batch(step, n=8):
    g = torch.Generator().manual_seed(50 + step)
    img = F.normalize(torch.randn(n, DIM, generator=g), dim=1)
    txt = F.normalize(img + 0.5 * torch.randn(n, DIM, generator=g), dim=1)
    keys = torch.randperm(100, generator=g)[:n]
    scale = torch.tensor(1 / 0.07)
    log_img, log_txt = batch_log_normalizers(img @ txt.T, scale, scale, 1e-6)
    return Features(img, txt, scale, keys, step=step), BatchStats(log_img, log_txt, scale, scale, 1e-6)


def run(est, steps):
    for step in steps:
        feats, stats = batch(step)
        est.prepare(feats, stats)
        estimate = est.estimate(feats, stats)
    return estimate


# ------------------------------------------------------------------------------------ ring round trip

def test_ring_state_round_trips_at_a_nonzero_write_position():
    """Catches the ring's write position (or fill count) not saved/restored: a checkpoint taken mid-ring
    then continued must equal the uninterrupted run, including the restart that reads the ring."""
    make = lambda: NeuCLIPEstimator(DIM, num_protos=20, repetition=2, restart_every=3, fill="ring")  # noqa: E731
    est = make()
    run(est, [0, 1])
    assert est._ring_next == 16 and est._ring_count == 16  # mid-ring: position 0 would hide the bug
    buffer = io.BytesIO()
    torch.save(est.state_dict(), buffer)
    buffer.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    expected, got = run(est, [2, 3, 4]), run(fresh, [2, 3, 4])  # step 3 restarts from the ring
    assert torch.equal(expected.a_img, got.a_img) and torch.equal(expected.a_txt, got.a_txt)
    for key, value in est.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fresh.state_dict()[key]), key


# ---------------------------------------------------------------------- two gloo ranks, real collectives

def rank_gradients(rank: int, method: nn.Module) -> list[torch.Tensor]:
    """Deterministic, rank-dependent gradients for the method's own parameters."""
    g = torch.Generator().manual_seed(10 + rank)
    params = [p for group in method.trainable_parameter_groups() for p in group["params"]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return [p.grad.clone() for p in params]


def methods_with_own_parameters():
    simultaneous = NeuCLIPEstimator(DIM, num_protos=4, update="simultaneous")
    temperature = GlobalTemperature(nn.Parameter(torch.tensor(0.0)), 0.07, True, True, 0.5)
    return {"siglip_bias": SigLipMethod(), "npn_simultaneous": GlobalContrastiveMethod(simultaneous, temperature, 1e-6)}


def seed_rank(rank: int) -> None:
    torch.manual_seed(1000 + rank)  # the trainer seeds every rank differently (seed + rank)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)


def draws():
    return [torch.rand(4).tolist(), random.random(), float(np.random.rand())]


def checkpoint_rng_round_trip(rank: int, out_dir: str) -> dict:
    """Save mid-stream through CheckpointManager, keep drawing (the uninterrupted run), load, draw again."""
    seed_rank(rank)
    draws()
    model, method = nn.Linear(2, 2), nn.Linear(1, 1)
    args = SimpleNamespace(name="rng", method="none", world_size=WORLD, batch_size=4, accum_freq=1,
                           device="cpu", model="linear", workers=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(out_dir, args, rank == 0, model=model, optimizer=optimizer, scaler=None,
                                method=method)
    ckpt = manager.state(epoch=0, train_state=TrainState(step=3), position={"epoch": 0, "batch": 3})
    path = os.path.join(out_dir, "iter_3.pt")
    if rank == 0:
        atomic_save(ckpt, path)
    dist.barrier()
    uninterrupted = draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)  # a relaunched process: fresh streams
    manager.load(path, None, "cpu")
    return {"uninterrupted": uninterrupted, "resumed": draws()}


def step_optimizer_as_the_loop_does(method: nn.Module) -> None:
    """The loop's own optimizer step (clip, average the method's gradients, step) with lr 0: the gradients
    are left as the step saw them, and a step that forgets to average them is caught, not only a broken
    average_method_grads."""
    params = [p for group in method.trainable_parameter_groups() for p in group["params"]]
    args = SimpleNamespace(grad_clip_norm=None, max_nonfinite_steps=3)
    assert _step_optimizer(nn.Identity(), method, torch.optim.SGD(params, lr=0.0), None, args, TrainState())


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {}
        for name, method in methods_with_own_parameters().items():
            before = rank_gradients(rank, method)
            step_optimizer_as_the_loop_does(method)
            after = [p.grad for group in method.trainable_parameter_groups() for p in group["params"]]
            result[name] = {"before": before, "after": after}
        result["rng"] = checkpoint_rng_round_trip(rank, out_dir)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("state_ranks"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", ["siglip_bias", "npn_simultaneous"])
def test_loop_averages_the_methods_own_gradients_over_ranks(ranks, name):
    """Catches the loop's optimizer step not averaging (or summing, or averaging only some tensors, or
    never calling training.loop.average_method_grads for) the parameters outside DDP: SigLIP's bias and the
    simultaneously trained NPN. The ranks'
    gradients differ, so "every rank keeps its own" fails here."""
    before = [r[name]["before"] for r in ranks]
    assert not torch.equal(before[0][0], before[1][0])
    expected = [(a + b) / 2 for a, b in zip(*before)]
    assert len(expected) == len(ranks[0][name]["after"]) > 0
    for rank in ranks:
        for got, want in zip(rank[name]["after"], expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_every_rank_resumes_its_own_rng_streams(ranks):
    """Catches RNG state not restored on resume, or every rank given rank 0's: after CheckpointManager.load
    each rank's torch, Python and NumPy streams continue exactly where its uninterrupted run does."""
    assert ranks[0]["rng"]["uninterrupted"] != ranks[1]["rng"]["uninterrupted"]  # ranks' streams differ
    for rank in ranks:
        assert rank["rng"]["resumed"] == rank["rng"]["uninterrupted"]


# --------------------------------------------------------------------------------------------- clamps

class ConstantLossModel(nn.Module):
    """Returns fixed unit features; only logit_scale learns."""

    def __init__(self, logit_scale: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale))

    def forward(self, images, texts):
        return F.normalize(images, dim=1), F.normalize(texts, dim=1), self.logit_scale.exp()


class PushLogitScale(nn.Module):
    """loss = direction·logit_scale: its gradient drives logit_scale past a bound."""

    def __init__(self, direction: float):
        super().__init__()
        self.direction = direction

    def before_encoder_step(self, feats):
        return {}

    def forward(self, feats):
        return SimpleNamespace(loss=self.direction * feats.logit_scale.log(), terms={})

    def after_encoder_step(self, feats):
        pass

    def trainable_parameter_groups(self):
        return []

    def scalars(self):
        return {}


@pytest.mark.parametrize("start, direction, bound", [(MAX_LOGIT_SCALE, -1.0, MAX_LOGIT_SCALE), (0.0, 1.0, 0.0)],
                         ids=["at_log100", "at_0"])
def test_loop_clamps_logit_scale_at_its_bounds(start, direction, bound):
    """Catches the loop's clamp of logit_scale to [0, log 100] after the step removed or moved: starting at
    a bound with a gradient pushing outwards, logit_scale must stay exactly at the bound."""
    assert math.isclose(MAX_LOGIT_SCALE, math.log(100.0))
    model, method = ConstantLossModel(start), PushLogitScale(direction)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = [(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4)) for _ in range(3)]
    data = SimpleNamespace(dataloader=loader, num_batches=3, start_batch=0, skipped=lambda: 0)
    scheduler = SimpleNamespace(needs_tau=False, step=lambda step, tau: {})
    args = SimpleNamespace(batch_size=4, world_size=1, accum_freq=1, precision="fp32", log_every_n_steps=100,
                           is_master=False, grad_clip_norm=0.0, max_nonfinite_steps=3)
    seen = []

    class Control:
        def after_step(self, *a):
            seen.append(model.logit_scale.item())
            return False
    train_one_epoch(model=model, method=method, data=data, optimizer=optimizer, scaler=None, scheduler=scheduler,
                    state=TrainState(), epoch=0, args=args, device=torch.device("cpu"), observers=[Control()])
    assert seen == [torch.tensor(bound, dtype=torch.float32).item()] * 3  # the bound, in logit_scale's dtype


def test_per_sample_tau_gradient_is_clamped_at_plus_and_minus_five():
    """Catches the ±5 clamp of the per-sample τ gradient (the reference's) removed, widened or made
    one-sided: anchors whose raw gradient is far above +5 and far below −5 must get exactly ±5, and one
    inside the range must be left alone."""
    assert TAU_GRAD_CLAMP == 5.0
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.2, 0.1, 0.7]], dtype=torch.float64)
    scale = torch.full((3,), 1 / 0.2, dtype=torch.float64)
    log_norm = batch_log_normalizers(sim, scale, scale, 1e-6)[0]
    a = log_norm.clone()
    unclamped = per_sample_tau_gradient(sim, 0, scale, a, log_norm, 0.0)
    assert unclamped.abs().max() < 5
    value = torch.tensor([40.0, -40.0, 0.0], dtype=torch.float64) + log_norm  # shifts the gradient by ±40
    got = per_sample_tau_gradient(sim, 0, scale, a, value, 0.0)
    assert got.tolist() == [5.0, -5.0, pytest.approx(unclamped[2].item(), rel=1e-12)]

