"""Two gloo ranks under DDP reproduce a one-process run on the whole global batch.

Each rank wraps a tiny linear two-tower "CLIP" in DistributedDataParallel, feeds its half of a fixed
global batch, builds the gcl method from flags and trains two steps (SGD) through the same calls the
loop makes. Gradients (after DDP's average), logged terms, the model after each step and the method's
per-sample state (moving averages u, per-sample τ and their Adam state) must equal the one-process run.
One pair of processes runs every configuration, to pay the start-up once.
"""
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from contrastive import Features, build_method

WORLD, N, D_IN, DIM, STEPS, DATA_SIZE = 2, 8, 6, 4, 2, 16
# Key 5 appears on both ranks in step 0: the last occurrence (rank 1's) must win everywhere.
KEYS = [torch.tensor([0, 5, 9, 2, 5, 7, 11, 3]), torch.tensor([5, 1, 9, 12, 3, 14, 0, 8])]

CONFIGS = {
    "moving_average-v3": dict(estimator="moving_average", multiply_tau=True),
    "moving_average-v3-reference": dict(estimator="moving_average", multiply_tau=True, tau_grad="reference"),
    "minibatch-v0": dict(estimator="minibatch"),
    "moving_average-v2": dict(estimator="moving_average", temperature_scheme="individual_learnable", rho=0.2),
}


def make_args(**overrides):
    args = dict(temperature_scheme="global_learnable", multiply_tau=False, rho=6.5, temperature=0.07,
                fastclip_eps=1e-6, gamma=0.5, gamma_schedule="constant", gamma_decay_epochs=4,
                data_size=DATA_SIZE, estimator="moving_average", tau_grad="exact", lr=0.05, lr_tau=0.01,
                beta1=0.9, beta2=0.98, eps=1e-6)
    args.update(overrides)
    return SimpleNamespace(**args)


class TwoTowers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Linear(D_IN, DIM, dtype=torch.float64)
        self.visual.output_dim = DIM
        self.text = nn.Linear(D_IN, DIM, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def forward(self, images, texts):
        return F.normalize(self.visual(images), dim=1), F.normalize(self.text(texts), dim=1), self.logit_scale.exp()


def global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(N, D_IN, generator=g, dtype=torch.float64),
             torch.randn(N, D_IN, generator=g, dtype=torch.float64), KEYS[s]) for s in range(STEPS)]


def train(config: dict, rank: int, world: int) -> dict:
    """The loop's calls for STEPS steps on this rank's rows of the global batches."""
    model = TwoTowers()
    method = build_method("gcl", make_args(**config), model)  # before DDP: it may freeze logit_scale
    network = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    record = {"grads": [], "terms": []}
    method.on_epoch_start(1)  # γ = --gamma: the second step really averages
    for step, (images, texts, keys) in enumerate(global_batches()):
        image_features, text_features, logit_scale = network(images[rows], texts[rows])
        feats = Features(image_features, text_features, logit_scale, keys[rows], step=step, epoch=1)
        method.before_encoder_step(feats)
        out = method(feats)
        optimizer.zero_grad()
        out.loss.backward()
        record["grads"].append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        record["terms"].append({name: value.clone() for name, value in out.terms.items()})
        optimizer.step()
        method.after_encoder_step(feats)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    record["model"] = {k: v.clone() for k, v in model.state_dict().items()}
    record["method"] = {k: v.clone() for k, v in method.state_dict().items()}
    return record


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, config in CONFIGS.items():
            torch.save(train(config, rank, world), os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gcl_ddp")
    # fork: the ranks inherit the imported modules (a spawned process spends ~10 s importing open_clip);
    # nothing here touches CUDA, and each rank runs single-threaded.
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(out_dir)), nprocs=WORLD, join=True,
                       start_method="fork")
    return {(name, rank): torch.load(out_dir / f"{name}-rank{rank}.pt", weights_only=True)
            for name in CONFIGS for rank in range(WORLD)}


def assert_same(actual: dict, expected: dict, what: str):
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=1e-9, msg=f"{what}: {key}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_match_one_process(name, distributed_runs):
    single = train(CONFIGS[name], rank=0, world=1)
    for rank in range(WORLD):
        run = distributed_runs[(name, rank)]
        for step in range(STEPS):
            assert_same(run["grads"][step], single["grads"][step], f"rank {rank} step {step} gradients")
            assert_same(run["terms"][step], single["terms"][step], f"rank {rank} step {step} terms")
        assert_same(run["model"], single["model"], f"rank {rank} model")
        assert_same(run["method"], single["method"], f"rank {rank} per-sample state")
    state = single["method"]
    if "estimator.table.log_u_img" in state:  # the moving averages were written for every key seen
        seen = torch.unique(torch.cat(KEYS))
        assert torch.isfinite(state["estimator.table.log_u_img"][seen]).all()
    if "temperature.table.tau_img" in state:  # per-sample τ moved for every key seen
        assert (state["temperature.table.tau_img"][torch.unique(torch.cat(KEYS))] != 0.07).all()
