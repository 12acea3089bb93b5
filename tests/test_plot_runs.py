"""scripts/plot_runs.py's loss and temperature lines: smoothing that follows the raw values, and runs
with a single point. matplotlib comes from requirements-test.txt: a missing one fails here."""
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
