"""Two gloo ranks keep bit-identical NPNs and reproduce a one-process run on the global batch.

Each rank feeds its half of fixed global batches (dealt round-robin) through prepare/estimate for
several steps (with a restart in the middle). Every rank differentiates the NPN objective on its own
anchors and one all-reduce per NPN step averages the gradient, so the NPN weights and optimizer state
must be torch.equal across ranks, and allclose to one process that sees the whole global batch (the
mean of the ranks' local means is the global mean). One pair of processes runs every configuration.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from contrastive.amorlip import AmorLIPEstimator
from contrastive.core import batch_log_normalizers
from contrastive.estimator_interface import BatchStats
from contrastive.features import Features
from contrastive.neuclip import NeuCLIPEstimator
from training.loop import average_method_grads

WORLD, N, DIM, STEPS, EPS = 2, 16, 8, 5, 1e-6

CONFIGS = {
    # m < N: random subset at restarts; restart at step 3 with the AdaGrad state reset
    "prototypes": lambda: NeuCLIPEstimator(DIM, num_protos=12, repetition=3, restart_every=3),
    # m > N: the ring of earlier batches fills the restart at step 3; accumulators kept
    "ring_fill": lambda: NeuCLIPEstimator(DIM, num_protos=40, repetition=3, restart_every=3,
                                          adagrad_reset="never"),
    "resample_fill_per_anchor_tau": lambda: NeuCLIPEstimator(DIM, num_protos=24, repetition=2,
                                                             restart_every=3, fill="resample"),
    "mlp_regression": lambda: NeuCLIPEstimator(DIM, arch="mlp", objective="regression", repetition=3),
    # Algorithm 3: the main optimizer (here SGD after the loop's gradient average) trains the NPN
    "simultaneous": lambda: NeuCLIPEstimator(DIM, num_protos=12, update="simultaneous", restart_every=3),
    "amorlip": lambda: AmorLIPEstimator(DIM, repetition=3, target_mix=0.5, mix_epochs=2),
}


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    img = F.normalize(torch.randn(N, DIM, generator=g), dim=1)
    txt = F.normalize(img + 0.5 * torch.randn(N, DIM, generator=g), dim=1)
    return img, txt


def scale_for(name: str):
    if "per_anchor" in name:  # individual temperatures: one λ per gathered anchor
        return torch.linspace(8.0, 20.0, N)
    return torch.tensor(1 / 0.07)


def run(name: str, rank: int, world: int) -> dict:
    """STEPS steps on this rank's samples; returns the estimator's state and its last estimates in
    sample-key order. Samples are dealt to ranks round-robin, as a sharded loader does, so the gathered
    batch's order differs from the one-process run's: the NPN must not depend on it."""
    est = CONFIGS[name]()
    rows = torch.arange(rank, N, world)
    for step in range(STEPS):
        epoch = step // 2
        img, txt = global_batch(step)
        scale = scale_for(name)
        feats = Features(img[rows], txt[rows], scale[rows] if scale.dim() else scale, rows, step=step,
                         epoch=epoch)
        scale = scale[feats.all_keys] if scale.dim() else scale  # λ of every gathered anchor
        log_img, log_txt = batch_log_normalizers(feats.all_image @ feats.all_text.T, scale, scale, EPS)
        stats = BatchStats(log_img, log_txt, scale, scale, EPS)
        est.on_epoch_start(epoch)
        est.prepare(feats, stats)
        estimate = est.estimate(feats, stats)
        if estimate.extra_loss is not None:
            main_optimizer_step(est, estimate.extra_loss)
    order = torch.argsort(feats.all_keys)
    return {"state": {k: v.clone() for k, v in est.state_dict().items() if isinstance(v, torch.Tensor)},
            "a_img": estimate.a_img[order], "a_txt": estimate.a_txt[order]}


def main_optimizer_step(est, loss, lr=0.1):
    """What the training loop does with `trainable_parameter_groups()`: backward, average the
    gradients over ranks with the loop's own `average_method_grads` (they are outside DDP), step."""
    params = [p for group in est.trainable_parameter_groups() for p in group["params"]]
    for p in params:
        p.grad = None
    loss.backward()
    average_method_grads(est)
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save({name: run(name, rank, world) for name in CONFIGS}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("neuclip_ranks"))
    mp.spawn(_worker, args=(WORLD, _free_port(), out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_npn_state_is_bit_identical_across_ranks(ranks, name):
    first, second = ranks[0][name], ranks[1][name]
    assert first["state"].keys() == second["state"].keys()
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
    assert torch.equal(first["a_img"], second["a_img"]) and torch.equal(first["a_txt"], second["a_txt"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_match_one_process_on_the_global_batch(ranks, name):
    single = run(name, rank=0, world=1)
    distributed = ranks[0][name]
    for key, value in single["state"].items():
        torch.testing.assert_close(distributed["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(distributed["a_img"], single["a_img"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(distributed["a_txt"], single["a_txt"], rtol=1e-4, atol=1e-5)
