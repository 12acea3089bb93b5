"""The minibatch and moving-average estimators, their γ schedule, state and memory checks."""
import io
import math
from types import SimpleNamespace

import pytest
import torch

from contrastive import Features
from contrastive.estimator_interface import BatchStats
from contrastive.moving_average import MovingAverageEstimator, moving_average_gamma
from contrastive.per_sample_memory import check_memory, per_sample_state_bytes
from contrastive.registry import build_estimator
from contrastive.table import PerSampleTable
from training.scheduler import gamma_at_epoch


def step_inputs(keys, u_img, u_txt):
    """Features carrying only keys, and batch statistics whose normalizers are ε + g = u_img / u_txt."""
    keys = torch.tensor(keys)
    n = len(keys)
    feats = Features(torch.zeros(n, 2), torch.zeros(n, 2), torch.tensor(1.0), keys)
    log_img = torch.tensor(u_img, dtype=torch.float64).log()
    log_txt = torch.tensor(u_txt, dtype=torch.float64).log()
    return feats, BatchStats(log_img, log_txt, torch.tensor(10.0), torch.tensor(10.0), 1e-6)


def moving_average(final_gamma=0.5, schedule="constant", data_size=10):
    return MovingAverageEstimator(data_size, final_gamma, schedule, gamma_decay_epochs=4)


def stored_u(estimator, side="img"):
    return getattr(estimator.table, f"log_u_{side}").double().exp()


def test_moving_average_update_rule_on_known_numbers():
    est = moving_average(final_gamma=0.25)
    est.on_epoch_start(1)
    assert est.gamma == 0.25
    # Never-seen keys take the batch value (u = 0 would otherwise shrink the first average).
    a = est.estimate(*step_inputs([1, 3], [2.0, 4.0], [5.0, 7.0]))
    torch.testing.assert_close(a.a_img.exp(), torch.tensor([2.0, 4.0], dtype=torch.float64))
    # Key 3 seen before: u ← 0.75·4 + 0.25·8 = 5; key 5 new: 6.
    a = est.estimate(*step_inputs([3, 5], [8.0, 6.0], [3.0, 1.0]))
    torch.testing.assert_close(a.a_img.exp(), torch.tensor([5.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(a.a_txt.exp(), torch.tensor([0.75 * 7.0 + 0.25 * 3.0, 1.0], dtype=torch.float64))
    expected_img = torch.zeros(10, dtype=torch.float64)
    expected_img[[1, 3, 5]] = torch.tensor([2.0, 5.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(stored_u(est), expected_img, rtol=1e-6, atol=0)


def test_gamma_one_in_the_first_epoch_replaces_u():
    est = moving_average(final_gamma=0.25)
    est.on_epoch_start(0)
    est.estimate(*step_inputs([4], [3.0], [3.0]))
    a = est.estimate(*step_inputs([4], [9.0], [1.0]))
    torch.testing.assert_close(a.a_img.exp(), torch.tensor([9.0], dtype=torch.float64))


def test_repeated_key_in_a_batch_last_occurrence_wins():
    est = moving_average()
    est.on_epoch_start(1)
    est.estimate(*step_inputs([7], [4.0], [4.0]))
    a = est.estimate(*step_inputs([7, 2, 7], [2.0, 1.0, 10.0], [4.0, 1.0, 4.0]))
    # Both occurrences average from the same old u = 4 ...
    torch.testing.assert_close(a.a_img.exp(), torch.tensor([3.0, 1.0, 7.0], dtype=torch.float64))
    # ... and the last one is stored.
    assert stored_u(est)[7].item() == pytest.approx(7.0, rel=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), math.log(1e-40)],
                         ids=["nan", "inf", "zero", "tiny"])
def test_unusable_u_is_reset_to_the_batch_value_and_estimates_stay_finite(bad):
    est = moving_average()
    est.on_epoch_start(2)
    est.table.log_u_img[6] = bad
    est.table.log_u_txt[6] = bad
    feats, stats = step_inputs([6, 8], [3.0, 2.0], [5.0, 1.0])
    predicted = est.predict(feats, stats)
    estimate = est.estimate(feats, stats)
    for a_img, a_txt in (predicted, (estimate.a_img, estimate.a_txt)):
        assert torch.isfinite(a_img).all() and torch.isfinite(a_txt).all()
        assert a_img[0].exp().item() == pytest.approx(3.0) and a_txt[0].exp().item() == pytest.approx(5.0)


def test_predict_leaves_state_alone():
    est = moving_average()
    est.on_epoch_start(1)
    est.estimate(*step_inputs([1], [4.0], [4.0]))
    before = est.table.log_u_img.clone()
    a_img, _ = est.predict(*step_inputs([1, 2], [100.0, 3.0], [1.0, 1.0]))
    torch.testing.assert_close(a_img.exp(), torch.tensor([4.0, 3.0], dtype=torch.float64))
    assert torch.equal(est.table.log_u_img, before)


def test_minibatch_estimates_are_the_batch_normalizers():
    est = build_estimator("minibatch", SimpleNamespace(), 4)
    feats, stats = step_inputs([0, 1], [2.0, 3.0], [4.0, 5.0])
    a = est.estimate(feats, stats)
    assert a.a_img is stats.log_norm_img and a.a_txt is stats.log_norm_txt
    assert not est.uses_per_sample_state


# ------------------------------------------------------------------------------------- γ schedule

def gamma_args(schedule, gamma=0.2, decay=10):
    return SimpleNamespace(gamma=gamma, gamma_schedule=schedule, gamma_decay_epochs=decay)


def test_cosine_gamma_schedule_values():
    args = gamma_args("cosine")
    expected = {0: 1.0, 1: 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 10)), 5: 0.6, 9: 0.2 + 0.4 * (1 + math.cos(0.9 * math.pi)),
                10: 0.2, 15: 0.2}
    for epoch, gamma in expected.items():
        assert gamma_at_epoch(args, epoch) == pytest.approx(gamma)
        assert moving_average_gamma(epoch, 0.2, "cosine", 10) == pytest.approx(gamma)


def test_constant_gamma_schedule_values():
    # As the reference: epoch 0 uses γ = 1 whatever the schedule, then --gamma.
    args = gamma_args("constant")
    assert [gamma_at_epoch(args, e) for e in (0, 1, 2, 30)] == [1.0, 0.2, 0.2, 0.2]


def test_estimator_follows_the_schedule_per_epoch():
    est = MovingAverageEstimator(4, 0.2, "cosine", gamma_decay_epochs=10)
    assert est.scalars() == {"gamma": 1.0}
    est.on_epoch_start(5)
    assert est.scalars()["gamma"] == pytest.approx(0.6)


# ---------------------------------------------------------------------------------- state, memory

def test_state_survives_a_checkpoint_round_trip_into_a_fresh_estimator():
    est = moving_average()
    est.on_epoch_start(1)
    est.estimate(*step_inputs([0, 9, 4], [2.0, 3.0, 4.0], [5.0, 6.0, 7.0]))
    buffer = io.BytesIO()
    torch.save(est.state_dict(), buffer)
    buffer.seek(0)
    fresh = moving_average()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.table.log_u_img, est.table.log_u_img)
    assert torch.equal(fresh.table.log_u_txt, est.table.log_u_txt)
    fresh.on_epoch_start(1)
    a = fresh.estimate(*step_inputs([9], [5.0], [6.0]))
    assert a.a_img.exp().item() == pytest.approx(4.0)


def test_per_sample_state_stays_on_the_host_in_float32():
    est = moving_average()
    est.to(torch.float64)
    est.double()
    assert est.table.log_u_img.dtype == torch.float32 and est.table.log_u_img.device.type == "cpu"


def test_missing_data_size_and_out_of_range_keys_fail_clearly():
    with pytest.raises(ValueError, match="--data_size"):
        build_estimator("moving_average", SimpleNamespace(data_size=-1, gamma=0.8, gamma_schedule="cosine",
                                                           gamma_decay_epochs=10), 4)
    est = moving_average(data_size=5)
    with pytest.raises(IndexError, match="--data_size"):
        est.estimate(*step_inputs([1, 5], [1.0, 1.0], [1.0, 1.0]))


def memory_args(estimator, scheme, data_size):
    return SimpleNamespace(estimator=estimator, temperature_scheme=scheme, data_size=data_size)


def test_per_sample_state_bytes():
    assert per_sample_state_bytes(memory_args("moving_average", "global_learnable", 1000)) == 8 * 1000
    assert per_sample_state_bytes(memory_args("moving_average", "individual_learnable", 1000)) == 40 * 1000
    assert per_sample_state_bytes(memory_args("npn", "individual_constant", 1000)) == 32 * 1000
    assert per_sample_state_bytes(memory_args("npn", "global_learnable", 10**9)) == 0
    assert PerSampleTable.bytes_per_sample(MovingAverageEstimator.COLUMNS) == 8


def test_check_memory_refuses_state_that_does_not_fit():
    args = memory_args("moving_average", "global_learnable", 414_000_000)
    with pytest.raises(MemoryError, match="3312000000 bytes") as info:
        check_memory(args, processes_per_host=1, available=2 * 2**30)
    assert "--data_size" in str(info.value)
    with pytest.raises(MemoryError, match="13248000000 bytes"):
        check_memory(args, processes_per_host=4, available=8 * 2**30)
    assert check_memory(args, processes_per_host=1, available=4 * 2**30) == 3_312_000_000
    assert check_memory(memory_args("moving_average", "global_learnable", 1000)) == 8000  # this host's RAM
