"""scripts/quickstart_summary.py: its first line says what the last launch trained. The out.log lines are
the trainer's own formats (training.main's start-up, resume and done lines), as a run folder holds them
after one, two and three launches."""
import importlib.util
import json
import os
import sys

import pytest

START = ("2026-12-06,13:55:19 | INFO | Run quickstart-neuclip-6000 (gcl/npn): world_size=1 local_batch=64 "
         "global_batch=64 steps_per_epoch=94 total_steps=282\n")
RESUMED = ("2026-12-06,13:57:05 | INFO | Resumed from ./logs/q/checkpoints/{ckpt} at epoch {epoch}, batch {batch}, "
           "step {step}\n")
DONE = "2026-12-06,13:59:09 | INFO | Done: 282 steps; run folder /tmp/logs/q\n"


@pytest.fixture
def quickstart_summary(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "quickstart_summary", os.path.join(os.path.dirname(__file__), "..", "scripts", "quickstart_summary.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "quickstart_summary", module)
    spec.loader.exec_module(module)
    return module


def run_folder(tmp_path, log: str):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "results.jsonl").write_text(json.dumps({"epoch": 3, "builtin/mean_top1": 0.52}) + "\n")
    (tmp_path / "out.log").write_text(log)
    return str(tmp_path)


def test_one_launch_trained_the_whole_run(quickstart_summary, tmp_path):
    """The plain case must keep saying how much was trained."""
    text = quickstart_summary.summary(run_folder(tmp_path, START + DONE), seconds=120)
    assert text.splitlines()[0] == "Trained 3 epoch(s), 282 steps in 2.0 min."


def test_a_resumed_launch_is_credited_with_its_own_steps(quickstart_summary, tmp_path):
    """Bug: "Trained 3 epoch(s) in 1.1 min" after a launch that resumed at step 110 and trained the rest."""
    log = START + START + RESUMED.format(ckpt="iter_110.pt", epoch=1, batch=16, step=110) + DONE
    text = quickstart_summary.summary(run_folder(tmp_path, log), seconds=168)
    assert text.splitlines()[0] == ("Resumed at step 110 (epoch 1, batch 16) and trained to step 282 in 2.8 min: "
                                    "3 epoch(s) in all.")


def test_a_launch_of_a_finished_run_says_nothing_was_trained(quickstart_summary, tmp_path):
    """Bug: rerunning a finished quickstart reported it as having trained the whole run again."""
    log = (START + RESUMED.format(ckpt="iter_110.pt", epoch=1, batch=16, step=110) + DONE
           + START + RESUMED.format(ckpt="epoch_3.pt", epoch=3, batch=0, step=282) + DONE)
    text = quickstart_summary.summary(run_folder(tmp_path, log), seconds=66)
    assert text.splitlines()[0].startswith("Nothing left to train: an earlier launch finished the run's 3 epoch(s)")
