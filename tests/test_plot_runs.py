"""scripts/plot_runs.py: smoothing that follows the raw values, runs with a single point, resumed
runs that keep every point, and the zero-shot/retrieval panels. matplotlib comes from
requirements-test.txt: a missing one fails here."""
import importlib.util
import os
import sys

import matplotlib.pyplot as plt
import pytest


@pytest.fixture
def plot_runs(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "plot_runs", os.path.join(os.path.dirname(__file__), "..", "scripts", "plot_runs.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "plot_runs", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def drawn_lines(plot_runs, monkeypatch, tmp_path, runs):
    """plot() with plt.close disabled, so the figure's lines can be read back."""
    monkeypatch.setattr(plot_runs.plt, "close", lambda fig: None)
    plot_runs.plot(runs, str(tmp_path / "f.png"))
    fig = plt.figure(plt.get_fignums()[-1])
    lines = {ax.get_title(loc="left"): ax.get_lines() for ax in fig.axes}
    plt.close(fig)
    return lines


def test_smoothed_loss_follows_a_falling_loss_with_few_points(plot_runs, monkeypatch, tmp_path):
    """Bug: TensorBoard's forward EMA lags, so with a dozen points the smoothed loss sat above every
    raw value after the first."""
    xs = [float(64 * 50 * i) for i in range(1, 13)]
    ys = [4.0 / (1 + 0.5 * i) for i in range(12)]
    run = plot_runs.Run("r", 64, loss=(xs, ys), loss_name="loss")
    raw, smoothed = drawn_lines(plot_runs, monkeypatch, tmp_path, [run])["Training loss"]
    drawn = list(smoothed.get_ydata())
    assert list(raw.get_ydata()) == ys and len(drawn) == len(ys)
    above = [d > y + 1e-12 for d, y in zip(drawn, ys)]
    assert not all(above[1:])
    spread = max(ys) - min(ys)
    assert abs(sum(d - y for d, y in zip(drawn, ys)) / len(ys)) < 0.05 * spread
    forward = plot_runs.ema(ys, 0.6)  # the old line: above every raw point but the first
    assert all(f > y for f, y in zip(forward[1:], ys[1:]))


def test_a_one_point_run_draws_a_marker(plot_runs, monkeypatch, tmp_path):
    """Bug: a run with one logged step drew an invisible zero-length line in the loss and τ panels."""
    run = plot_runs.Run("one", 64, loss=([64.0], [3.0]), loss_name="loss", tau=([64.0], [0.07]))
    lines = drawn_lines(plot_runs, monkeypatch, tmp_path, [run])
    for title in ("Training loss", "Temperature"):
        (line,) = lines[title]
        assert line.get_marker() == "o" and list(line.get_ydata()) == [3.0 if title == "Training loss" else 0.07]


def two_launches(log_dir, first_launch_purge):
    """TensorBoard files of a run resumed from a checkpoint at step 12: launch 1 logged steps 1-12 (and
    an estimation error at step 8), launch 2 steps 13-16. `first_launch_purge`: the second writer's
    purge_step, as the trainer passed it."""
    from torch.utils.tensorboard import SummaryWriter
    first = SummaryWriter(str(log_dir))
    for step in range(1, 13):
        first.add_scalar("train/loss", 1.0 / step, step)
    first.add_scalar("diag/est_err/mean", 0.5, 8)
    first.close()
    second = SummaryWriter(str(log_dir), purge_step=first_launch_purge)
    for step in range(13, 17):
        second.add_scalar("train/loss", 1.0 / step, step)
    second.close()


def test_a_resumed_run_keeps_every_point(plot_runs, tmp_path):
    """Bug: the event files of all launches were read as one stream, and TensorBoard's "out of order"
    purge dropped the points at and after the resumed step (a gap at every resume; the quickstart's
    figure lost points) with a "Detected out of order event.step" message."""
    run = tmp_path / "run"
    two_launches(run / "tensorboard", first_launch_purge=12)  # what the trainer wrote before the fix
    scalars = plot_runs.tensorboard_scalars(str(run))
    assert sorted(scalars["train/loss"]) == list(range(1, 17))
    assert scalars["diag/est_err/mean"] == {8: 0.5}


def test_the_trainer_keeps_the_checkpoint_step_in_tensorboard(tmp_path):
    """Bug: a resumed launch purged TensorBoard from the checkpoint's own step, whose values it does not
    log again: TensorBoard itself (its EventAccumulator, as the dashboard reads) lost that step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from training.logger import TensorBoard
    log_dir = tmp_path / "tb"
    first = TensorBoard(str(log_dir))
    for step in range(1, 13):
        first.scalars("train", {"loss": 1.0 / step}, step)
    first.close()
    second = TensorBoard(str(log_dir), purge_step=12)  # resumed from a checkpoint written after step 12
    for step in range(13, 17):
        second.scalars("train", {"loss": 1.0 / step}, step)
    second.close()
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, 17))


def test_figure_has_chance_line_retrieval_panel_axes_from_zero_and_a_caption(plot_runs, monkeypatch, tmp_path):
    """Bugs: the zero-shot panel had no chance line (the summary quotes chance) and its axis started at the
    lowest value (41%), making a small rise look large; retrieval recall was not drawn; nothing said what
    the panels show."""
    from training.data.synthetic.tasks import chance_top1
    chance = sum(chance_top1().values()) / len(chance_top1())
    run = plot_runs.Run("r", 64, accuracy=([100.0, 200.0], [0.41, 0.52]),
                        retrieval={"image→text": ([100.0, 200.0], [0.1, 0.2]),
                                   "text→image": ([100.0, 200.0], [0.12, 0.25])})
    monkeypatch.setattr(plot_runs.plt, "close", lambda fig: None)
    plot_runs.plot([run], str(tmp_path / "f.png"))
    fig = plt.figure(plt.get_fignums()[-1])
    axes = {ax.get_title(loc="left"): ax for ax in fig.axes}
    accuracy, retrieval = axes["Zero-shot accuracy"], axes["Retrieval R@1"]
    flat = [line for line in accuracy.get_lines() if len(set(line.get_ydata())) == 1]
    assert [list(line.get_ydata())[0] for line in flat] == [pytest.approx(chance)]
    assert accuracy.get_ylim()[0] == 0 and accuracy.get_ylim()[1] >= 0.52
    assert retrieval.get_ylim()[0] == 0 and len(retrieval.get_lines()) == 2
    captions = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("Zero-shot accuracy" in c and "chance" in c and "Retrieval R@1" in c for c in captions)
    plt.close(fig)
