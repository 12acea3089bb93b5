"""Ctrl-C at a terminal: a checkpoint, one line with the command that resumes, exit status 130; a second
Ctrl-C stops at once. The interrupted run is a real subprocess signalled the way a terminal does (SIGINT to
its whole process group, data-loader worker included); the resume and the uninterrupted baseline run
in-process through `main()`, whose history holds every step's loss terms (as in test_reliability.py).
"""
import glob
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from training.checkpoint import read_checkpoint
from training.main import main
from training.preemption import StopSignals, resume_command
from training.startup.cli import run_cli

from test_reliability import (ROOT, SCRIPT, STEPS_PER_EPOCH, EPOCHS, assert_same_losses,  # noqa: F401
                              baselines, clean_env, flags, launch, resumed_step, wait_until)

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


def test_ctrl_c_while_torch_imports_is_one_line_exit_130_and_no_run_folder(tmp_path):
    """Ctrl-C in the first seconds of a launch (importing torch and open_clip, before main() installs its
    handlers) printed a 40-line KeyboardInterrupt traceback through importlib. The signal is sent once the
    process has mapped libtorch, i.e. while `import torch` is still running its Python modules."""
    main_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "training", "main.py")
    proc = subprocess.Popen([sys.executable, "-u", main_py, "--model", "neuclip-tiny", "--logs", str(tmp_path),
                             "--name", "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/maps") as maps:
            if "libtorch" in maps.read():
                break
        time.sleep(0.005)
    assert proc.poll() is None, "the process ended before torch was loaded"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and err.strip().splitlines() == [
        "interrupted while starting up, before the run folder was made: nothing was written"], err[-2000:]
    assert not (tmp_path / "run").exists()


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



def test_quickstart_after_ctrl_c_says_how_to_resume_and_running_it_again_resumes(tmp_path):
    """The quickstart named each run by the clock: after a Ctrl-C, running it again started a new run
    from step 0 without a word about the interrupted one (and the trainer's exit status ended the script
    with no hint). Its summary then credited the resumed launch with the whole run, and the figure step
    printed TensorBoard's "Detected out of order event.step" purge."""
    for name in ("src", "scripts", "requirements-training.txt"):
        (tmp_path / name).symlink_to(os.path.join(ROOT, name))
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    env.update(SAMPLES="512", EPOCHS="2", INSTALL="0", WORKERS="1")
    command = ["bash", "scripts/quickstart.sh", "--log-every-n-steps", "1"]
    first = tmp_path / "first.log"
    with open(first, "w") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    out_log = tmp_path / "logs" / "quickstart-neuclip-512" / "out.log"
    wait_until(lambda: out_log.exists() and "Train Epoch: 0 [2/8" in out_log.read_text(), [proc], what="step 2")
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches bash and the trainer
    assert proc.wait(120) == 130, first.read_text()[-3000:]
    text = first.read_text()
    assert "Traceback" not in text, text[-3000:]
    hint = [line for line in text.splitlines() if line.startswith("Interrupted. To resume")]
    assert hint == ["Interrupted. To resume logs/quickstart-neuclip-512 from its checkpoint: INSTALL=0 "
                    "SAMPLES=512 EPOCHS=2 WORKERS=1 bash scripts/quickstart.sh --log-every-n-steps 1"], text[-3000:]
    step = read_checkpoint(glob.glob(str(out_log.parent / "checkpoints" / "iter_*.pt"))[0])["step"]

    again = subprocess.run(["bash", "-c", hint[0].split(": ", 1)[1]], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "logs/quickstart-neuclip-512 exists from an earlier launch: resuming it" in again.stdout
    assert resumed_step(out_log.parent) == step
    # the summary counts what this launch trained (it said "Trained 2 epoch(s)" after half an epoch)
    assert f"Resumed at step {step} (epoch 0, batch {step}) and trained to step 16 in " in again.stdout
    assert "zero-shot accuracy" in again.stdout and "Detected out of order" not in again.stderr
