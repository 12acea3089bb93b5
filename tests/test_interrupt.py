"""Ctrl-C at a terminal: a checkpoint, one line with the command that resumes, exit status 130; a second
Ctrl-C stops at once. The interrupted run is a real subprocess signalled the way a terminal does (SIGINT to
its whole process group, data-loader worker included); the resume and the uninterrupted baseline run
in-process through `main()`, whose history holds every step's loss terms (as in test_reliability.py).
"""
import glob
import os
import shlex
import signal
import sys

import pytest

from training.checkpoint import read_checkpoint
from training.main import main
from training.preemption import StopSignals, resume_command
from training.startup.user_errors import run_cli

from test_reliability import (SCRIPT, STEPS_PER_EPOCH, EPOCHS, assert_same_losses, baselines, clean_env,  # noqa: F401
                              flags, launch, resumed_step, wait_until)

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest.py


def test_ctrl_c_mid_epoch_checkpoints_exits_130_and_its_printed_command_resumes_exactly(tmp_path, baselines):
    """Ctrl-C raised KeyboardInterrupt mid-step: a 32-line traceback, exit 1, no checkpoint (the steps since
    the last one lost) and no word on how to go on. Also catches a data-loader worker dying of the
    terminal's SIGINT (the step fails), and a printed command that does not resume this run."""
    argv = flags(tmp_path, "run", "neuclip", "--workers", "1")
    run = tmp_path / "run"
    console = tmp_path / "console.log"
    proc = launch(argv, console, start_new_session=True)
    wait_until(lambda: (run / "out.log").exists() and "Train Epoch: 0 [3/8" in (run / "out.log").read_text(),
               [proc], what="step 3")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    assert proc.wait(60) == 130, console.read_text()[-3000:]
    text = console.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    written = glob.glob(str(run / "checkpoints" / "iter_*.pt"))
    assert len(written) == 1
    step = read_checkpoint(written[0])["step"]
    assert 3 <= step < STEPS_PER_EPOCH * EPOCHS
    lines = [line for line in text.splitlines() if "to resume:" in line]
    assert len(lines) == 1, text[-3000:]
    assert f"stopped at step {step} after writing {written[0]}" in lines[0]
    command = shlex.split(lines[0].split("to resume: ", 1)[1])
    assert command[0] == f"PYTHONPATH={clean_env()['PYTHONPATH']}"
    assert command[1:4] == [sys.executable, "-u", SCRIPT]  # the interpreter and script as launched
    printed_flags = command[4:]
    assert argv[:2] == ["--logs", str(tmp_path)] and argv[2:4] == ["--name", "run"]
    assert printed_flags == argv[:2] + argv[4:] + ["--name", "run"]

    summary = main(printed_flags)  # the printed command's flags
    assert resumed_step(run) == step
    assert_same_losses(summary["history"], baselines("neuclip"), step + 1)


def test_a_second_ctrl_c_stops_at_once():
    """With SIGINT taken over for the checkpoint, a hung step or a slow evaluation could not be stopped
    from the keyboard at all: the second Ctrl-C must raise KeyboardInterrupt in place."""
    signals = StopSignals([]).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next bytecode
        assert signals.code == 3
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # give the interpreter the chance to run the handler
                pass
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is not signals._handle


def test_the_second_ctrl_c_on_the_command_line_is_one_line_and_exit_130(capsys):
    """A second Ctrl-C printed a KeyboardInterrupt traceback (exit 1) over the line that said what happened."""
    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        run_cli(interrupted, [])
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "second Ctrl-C" in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "2"], ["--epochs", "2", "--name", "auto_2026"]),  # a default (timestamped) name is added
    (["--name", "a", "--epochs", "2"], ["--epochs", "2", "--name", "a"]),
    (["--name=a", "--resume", "x.pt", "--resume-fresh", "--no-auto-resume", "--lr", "1"], ["--lr", "1", "--name", "a"]),
])
def test_resume_command_names_the_run_and_drops_flags_that_would_not_resume(argv, expected):
    """A default run name is timestamped: the same command without --name would start a new run. And
    --resume PATH would go back to that older checkpoint, --resume-fresh would delete the new one,
    --no-auto-resume would refuse the folder."""
    name = "auto_2026" if "--epochs" == argv[0] else "a"
    line = resume_command(argv, name, env={})
    assert shlex.split(line) == ["python", "-u", "src/training/main.py", *expected]
    assert resume_command(argv, name, env={"PYTHONPATH": "my src"}).startswith("PYTHONPATH='my src' python ")

