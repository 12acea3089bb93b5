"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture
def single_torch_thread(monkeypatch):
    """One torch thread for the test. The tensors in tests are tiny, so extra threads only add OpenMP
    synchronisation (badly so on a few shared cores), and subprocess runs get OMP_NUM_THREADS=1: in-process
    runs must match them, as another thread count may round differently. OMP_NUM_THREADS=1 tells main()'s
    thread policy (training.startup.threads) the same."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
