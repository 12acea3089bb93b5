"""The project's job scripts under a real Slurm (scripts/slurm_local.sh: slurmctld + slurmd + munge on this
machine), 2 tasks on CPU with gloo: what a cluster does to a job, done by the cluster.

- USR1 before the time limit (`--signal=USR1@N`; here `scancel --signal=USR1`, what slurm sends) → a step
  checkpoint, the job requeues itself, the requeued job (same id, no --name) finds its folder and resumes,
  and its steps have the losses of an uninterrupted job.
- `scontrol requeue` (preemption with PreemptMode=REQUEUE: SIGTERM) → the requeued job resumes.
- The time limit (SIGTERM, SIGKILL KillWait=5 s later) → a step checkpoint before the kill; submitting the
  recipe again resumes.
- plain `scancel` → a step checkpoint, nothing lost; an array of two runs → two run folders, each resumable.

A requeued job waits ~120 s (BeginTime) before it may start again; the tests move its start to now.
The Slurm must start: a test fails, never skips, when it cannot.
"""
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reliability import tensorboard_losses
from training.checkpoint import read_checkpoint
from training.data.synthetic.shards import write_shards

REPO = Path(__file__).resolve().parent.parent
SAMPLES, BATCH, EPOCHS = 512, 4, 2  # 2 ranks x 4: 64 steps an epoch, 128 in all
STEPS = SAMPLES // (2 * BATCH) * EPOCHS
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm():
    up = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "up"], capture_output=True, text=True,
                        timeout=300)
    assert up.returncode == 0, f"the local Slurm did not start: {up.stderr[-2000:]}"
    return True


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(str(out), SAMPLES, samples_per_shard=SAMPLES // 2)
    return f"{out}/{{00000..00001}}.tar"


def train_flags(shards, logs, *extra):
    return ["--train-data", shards, "--train-num-samples", str(SAMPLES), "--data_size", str(SAMPLES),
            "--model", "neuclip-tiny", "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--workers", "0",
            "--warmup", "3", "--lr", "1e-3", "--precision", "fp32", "--seed", "7", "--log-every-n-steps", "1",
            "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "tensorboard",
            "--logs", str(logs), *extra]


NEUCLIP = ["--fastclip", "--multiply_tau", "--fastclip_eps", "1e-6", "--npn", "--npn_num_protos", "16",
           "--npn_repetition", "2", "--npn_restart_iter", "5", "--npn_lr", "0.05"]


def user_job_script(path: Path, flags: list[str], array: str | None = None) -> Path:
    """A job script as a user writes one: no --name (the job id names the run), requeue-safe #SBATCH lines."""
    lines = ["#!/bin/bash", "#SBATCH --ntasks=2", "#SBATCH --cpus-per-task=1", "#SBATCH --requeue",
             "#SBATCH --signal=USR1@120", "#SBATCH --open-mode=append"]
    if array:
        lines.append(f"#SBATCH --array={array}")
    lines += ['export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "export MASTER_PORT=$((12805 + SLURM_JOB_ID % 20000))",
              f"export PYTHONPATH={shlex.quote(str(REPO / 'src'))}",
              "srun python -u src/training/main.py " + " ".join(map(shlex.quote, flags))]
    path.write_text("\n".join(lines) + "\n")
    return path


def environment():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))
           and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTEST_CURRENT_TEST")}
    return {**env, "OMP_NUM_THREADS": "1"}


def sbatch(*argv, env=None) -> str:
    done = subprocess.run(["sbatch", "--parsable", *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          env={**environment(), **(env or {})}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]  # an array's first task
    return dict(re.findall(r"(\w+)=(\S*)", first))


def wait_for(condition, what: str, timeout: float = 240.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)


def the_run_folder(logs: Path) -> Path:
    """The one run folder a job without --name creates under `logs`, once it exists."""
    return logs / wait_for(lambda: next(iter(os.listdir(logs)), None) if logs.exists() else None, "the run folder")


def log_has(path: Path, pattern: str):
    return lambda: path.exists() and re.search(pattern, path.read_text())


def requeued_start_now(job_id: str) -> None:
    """A requeued job waits for its BeginTime (~120 s later); a cluster's next free slot, here: now."""
    wait_for(lambda: job(job_id)["JobState"] == "PENDING", f"job {job_id} pending again after its requeue", 60)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], check=True, timeout=30)


def finished(job_id: str, timeout: float = 300.0) -> dict:
    return wait_for(lambda: (lambda j: j if j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                             else None)(job(job_id)), f"job {job_id} to end", timeout, every=0.5)


def losses_by_step(run_dir: Path) -> dict:
    """train/loss of every step (TensorBoard numbers them from 0, as open_clip does), later launches
    overriding earlier ones (a resume rewrites the steps after its checkpoint)."""
    merged = {}
    for launch in tensorboard_losses(run_dir):
        merged.update(launch)
    return merged


def resumed_from(out_log: Path) -> list[tuple[str, int]]:
    return [(Path(p).name, int(s)) for p, s in
            re.findall(r"Resumed from (\S+) at epoch \d+, batch \d+, step (\d+)", out_log.read_text())]


def test_usr1_before_the_time_limit_requeues_and_the_job_resumes_to_uninterrupted_losses(slurm, shards, tmp_path):
    """Bugs caught: the requeued job (same id, no --name) refused its own run folder as 'two runs in one
    second' and exited 2; the requeue not happening; a resume that does not continue exactly."""
    flags = train_flags(shards, tmp_path / "logs", *NEUCLIP)
    base_flags = train_flags(shards, tmp_path / "base", *NEUCLIP)
    run = sbatch("-o", tmp_path / "job.log", user_job_script(tmp_path / "job.sh", flags))
    base = sbatch("-o", tmp_path / "base.log", user_job_script(tmp_path / "base.sh", base_flags))
    run_dir = the_run_folder(tmp_path / "logs")
    assert run_dir.name.startswith(f"slurm_{run}-npn-")
    wait_for(log_has(run_dir / "out.log", r"Train Epoch: 0 \[5/"), "step 5")
    subprocess.run(["scancel", "--signal=USR1", run], check=True, timeout=30)
    signalled = time.monotonic()
    requeued_start_now(run)
    wait_for(lambda: resumed_from(run_dir / "out.log"), "the requeued job to resume", 180)
    resumed_after = time.monotonic() - signalled
    end, end_base = finished(run), finished(base)
    log = (tmp_path / "job.log").read_text()
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "1", log[-3000:]
    assert end_base["JobState"] == "COMPLETED", (tmp_path / "base.log").read_text()[-3000:]
    assert "requeued slurm job" in log and "exists already" not in log
    [(ckpt, step)] = resumed_from(run_dir / "out.log")
    assert ckpt == f"iter_{step}.pt" and 5 <= step < STEPS
    assert read_checkpoint(str(run_dir / "checkpoints" / ckpt))["step"] == step
    losses = losses_by_step(run_dir)
    (base_dir,) = (tmp_path / "base").iterdir()
    baseline = losses_by_step(base_dir)
    assert sorted(losses) == sorted(baseline) == list(range(STEPS))
    assert [losses[s] for s in range(STEPS)] == pytest.approx([baseline[s] for s in range(STEPS)],
                                                                      rel=1e-6)
    print(f"USR1 -> resumed training: {resumed_after:.0f} s (requeue start moved to now)")


def reference_srun_line(script: Path) -> list[str]:
    text = script.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith("srun ")]
    return shlex.split(line)


def test_cpu_job_script_runs_the_reference_srun_line_verbatim():
    """Bug caught: the CPU variant drifting from the reference job's srun line (then the Slurm tests would
    test another command than the one users submit). Only "$@", the overrides, may follow."""
    reference = reference_srun_line(REPO / "scripts" / "slurm" / "neuclip_dfn14m.sh")
    cpu = reference_srun_line(REPO / "scripts" / "slurm" / "neuclip_cpu.sh")
    assert cpu == reference + ["$@"]
    head = (REPO / "scripts" / "slurm" / "neuclip_cpu.sh").read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=USR1@120", "#SBATCH --open-mode=append"):
        assert line in head


def cpu_job(tmp_path: Path, shards: str, name: str, *sbatch_opts, extra=()) -> str:
    """scripts/slurm/neuclip_cpu.sh, the reference's flags overridden down to a tiny CPU run."""
    flags = train_flags(shards, tmp_path / "logs", "--name", name, "--npn_num_protos", "16",
                        "--npn_restart_iter", "5", "--npn_repetition", "2", "--npn_lr", "0.05", *extra)
    return sbatch("-o", tmp_path / f"{name}.log", *sbatch_opts, REPO / "scripts" / "slurm" / "neuclip_cpu.sh", *flags)


def test_preemption_requeue_and_scancel_checkpoint_and_resume(slurm, shards, tmp_path):
    """`scontrol requeue` (what PreemptMode=REQUEUE does) and plain `scancel` both SIGTERM the tasks and
    SIGKILL them KillWait (5 s) later. Bugs caught: no step checkpoint before the kill (the run loses the
    steps since the last one), a requeued job that does not resume, a relaunch that starts over."""
    preempted, cancelled = cpu_job(tmp_path, shards, "preempted"), cpu_job(tmp_path, shards, "cancelled")
    for name in ("preempted", "cancelled"):
        wait_for(log_has(tmp_path / "logs" / name / "out.log", r"Train Epoch: 0 \[5/"), f"{name}: step 5")
    subprocess.run(["scontrol", "requeue", preempted], check=True, timeout=30)
    subprocess.run(["scancel", cancelled], check=True, timeout=30)
    signalled = time.monotonic()
    requeued_start_now(preempted)
    wait_for(lambda: resumed_from(tmp_path / "logs" / "preempted" / "out.log"), "the requeued job to resume", 180)
    print(f"scontrol requeue -> resumed training: {time.monotonic() - signalled:.0f} s (requeue start moved to now)")
    end = finished(cancelled)
    assert end["JobState"] == "CANCELLED"
    log = (tmp_path / "logs" / "cancelled" / "out.log").read_text()
    stopped = re.search(r"SIGTERM received: stopping at step (\d+) after writing (\S+iter_\d+\.pt)", log)
    assert stopped, log[-3000:]
    assert read_checkpoint(stopped.group(2))["step"] == int(stopped.group(1))

    resubmitted = time.monotonic()
    relaunched = cpu_job(tmp_path, shards, "cancelled")  # submitting the same job again resumes
    wait_for(lambda: resumed_from(tmp_path / "logs" / "cancelled" / "out.log"), "the resubmitted job to resume", 180)
    print(f"scancel -> job ended: {resubmitted - signalled:.0f} s; resubmitted -> resumed: "
          f"{time.monotonic() - resubmitted:.0f} s")
    for job_id, name in ((preempted, "preempted"), (relaunched, "cancelled")):
        end = finished(job_id)
        out_log = tmp_path / "logs" / name / "out.log"
        assert end["JobState"] == "COMPLETED", (tmp_path / f"{name}.log").read_text()[-3000:]
        [(ckpt, step)] = resumed_from(out_log)
        assert ckpt == f"iter_{step}.pt" and step >= 5
        assert sorted(losses_by_step(tmp_path / "logs" / name)) == list(range(STEPS))
    assert int(stopped.group(1)) == resumed_from(tmp_path / "logs" / "cancelled" / "out.log")[0][1]


def test_time_limit_checkpoints_before_the_kill_and_the_recipe_resumes(slurm, shards, tmp_path):
    """The recipes' LAUNCH=srun path at a 1-minute time limit: SIGTERM, SIGKILL 5 s later. Bug caught: the
    step checkpoint not written (or not complete) within KillWait; the resubmitted recipe not resuming."""
    env = {"LAUNCH": "srun", "TRAIN_DATA": shards, "NUM_SAMPLES": str(SAMPLES), "DATA_SIZE": str(SAMPLES),
           "GLOBAL_BATCH": str(2 * BATCH), "EPOCHS": "60", "WORKERS": "0", "NAME": "timed", "LOGS": str(tmp_path / "logs"),
           "MASTER_PORT": str(14000 + os.getpid() % 1000)}
    recipe = ["bash", "scripts/recipes/run.sh", "cc3m", "neuclip", "--model", "neuclip-tiny", "--precision", "fp32",
              "--npn_num_protos", "16", "--zeroshot-frequency", "0", "--val-frequency", "0", "--warmup", "3"]
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    wrap = f"cd {shlex.quote(str(REPO))} && {exports} " + " ".join(map(shlex.quote, recipe))
    first = sbatch("-n", "2", "--time=1", "--open-mode=append", "-o", tmp_path / "timed.log", "--wrap", wrap)
    end = finished(first, timeout=400)
    out_log = tmp_path / "logs" / "timed" / "out.log"
    assert end["JobState"] == "TIMEOUT", (tmp_path / "timed.log").read_text()[-3000:]
    stopped = re.search(r"SIGTERM received: stopping at step (\d+) after writing (\S+iter_\d+\.pt)", out_log.read_text())
    assert stopped, out_log.read_text()[-3000:]
    step = int(stopped.group(1))
    ckpt = read_checkpoint(stopped.group(2))
    assert ckpt["step"] == step
    stop_epochs = ckpt["data_position"]["epoch"] + 1  # finish the epoch it was in, then stop
    resubmitted = time.monotonic()
    again = sbatch("-n", "2", "-o", tmp_path / "again.log", "--wrap", wrap + f" --stop-epochs {stop_epochs}")
    wait_for(lambda: resumed_from(out_log), "the resubmitted recipe to resume", 180)
    print(f"time limit: step checkpoint iter_{step}.pt before the kill; resubmitted -> resumed: "
          f"{time.monotonic() - resubmitted:.0f} s")
    end = finished(again)
    assert end["JobState"] == "COMPLETED", (tmp_path / "again.log").read_text()[-3000:]
    assert resumed_from(out_log) == [(f"iter_{step}.pt", step)]


def test_array_of_two_runs_gives_two_folders_each_resumable(slurm, shards, tmp_path):
    """`sbatch --array=0-1`, no --name: each task its own run folder (slurm_JOB_TASK); USR1 to one task
    requeues that task alone, which resumes. Bugs caught: two tasks sharing one folder (or refusing each
    other's lock), the requeue of an array task hitting the whole array or another task's folder."""
    flags = train_flags(shards, tmp_path / "logs", "--seed", "3")
    array = sbatch("-o", tmp_path / "array_%a.log", user_job_script(tmp_path / "array.sh", flags, array="0-1"))
    folders = {t: tmp_path / "logs" / f"slurm_{array}_{t}-openclip-model_neuclip-tiny-lr_0.001-b_4-j_0-p_fp32"
               for t in (0, 1)}
    for folder in folders.values():
        wait_for(log_has(folder / "out.log", r"Train Epoch: 0 \[5/"), f"{folder.name}: step 5")
    subprocess.run(["scancel", "--signal=USR1", f"{array}_1"], check=True, timeout=30)
    signalled = time.monotonic()
    requeued_start_now(f"{array}_1")
    wait_for(lambda: resumed_from(folders[1] / "out.log"), "the requeued array task to resume", 180)
    print(f"array task USR1 -> resumed training: {time.monotonic() - signalled:.0f} s")
    for t, folder in folders.items():
        end = finished(f"{array}_{t}")
        assert end["JobState"] == "COMPLETED", (tmp_path / f"array_{t}.log").read_text()[-3000:]
        assert end["Restarts"] == str(t)
        assert sorted(losses_by_step(folder)) == list(range(STEPS))
    assert resumed_from(folders[0] / "out.log") == []
    [(ckpt, step)] = resumed_from(folders[1] / "out.log")
    assert ckpt == f"iter_{step}.pt"


def test_submitit_launcher_checkpoints_requeues_through_its_hook_and_resumes(slurm, shards, tmp_path):
    """scripts/submitit_train.py (DINO/MAE-style): SIGUSR1 before the time limit → the trainer's step
    checkpoint, then submitit's handler calls Trainer.checkpoint and requeues; the requeued job resumes in the
    same run folder. Bugs caught: submitit's signal reaching the trainer unhandled (no checkpoint), the hook
    not requeuing, the requeued submission starting a new run."""
    import submitit  # noqa: F401  (installed by requirements-test.txt: fail, never skip, without it)
    flags = train_flags(shards, tmp_path / "logs", *NEUCLIP)
    submitted = subprocess.run([sys.executable, str(REPO / "scripts" / "submitit_train.py"), "--job-dir",
                                str(tmp_path / "jobs"), "--tasks-per-node", "2", "--cpus-per-task", "1",
                                "--timeout-min", "10", "--signal-delay-s", "60", "--", *flags],
                               capture_output=True, text=True, env=environment(), timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split()[-1]
    run_dir = the_run_folder(tmp_path / "logs")
    assert run_dir.name.startswith(f"slurm_{job_id}-")
    wait_for(log_has(run_dir / "out.log", r"Train Epoch: 0 \[5/"), "step 5")
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    signalled = time.monotonic()
    requeued_start_now(job_id)
    wait_for(lambda: resumed_from(run_dir / "out.log"), "the requeued submission to resume", 180)
    print(f"submitit USR1 -> resumed training: {time.monotonic() - signalled:.0f} s")
    end = finished(job_id)
    job_log = (tmp_path / "jobs" / f"{job_id}_0_log.err").read_text()
    assert end["JobState"] == "COMPLETED" and end["Restarts"] == "1", job_log[-3000:]
    assert "Caught signal SIGUSR1" in job_log  # submitit's own handler ran (after the trainer's checkpoint)
    out_log = (run_dir / "out.log").read_text()
    stopped = re.search(r"SIGUSR1 received: stopping at step (\d+)", out_log)
    assert stopped and stopped.start() < out_log.index("Caught signal SIGUSR1")
    assert resumed_from(run_dir / "out.log") == [(f"iter_{stopped.group(1)}.pt", int(stopped.group(1)))]
    assert sorted(losses_by_step(run_dir)) == list(range(STEPS))
