#!/usr/bin/env python
"""Put a training run on Slurm with submitit, as DINO's and MAE's run_with_submitit.py do.

    python scripts/submitit_train.py --job-dir ./jobs --nodes 2 --tasks-per-node 4 --gpus-per-node 4 \\
        --timeout-min 2880 --partition gpu -- --train-data 'shards/{00000..01926}.tar' ... --name neuclip

Everything after `--` goes to training.main. One task per GPU (or per CPU process); MASTER_ADDR is the job's
first node, MASTER_PORT derived from the job id, rank and world size come from srun's variables.

Preemption and time-outs: submitit asks Slurm for SIGUSR1 `--signal-delay-s` seconds before the time limit
(SUBMITIT_PREEMPT_SIGNAL=USR1; submitit's own default, USR2, would reach the trainer unhandled). The trainer
hears it first: every rank writes the step checkpoint and stops (it does not requeue: --no-requeue); then
rank 0 hands over to submitit's handler, which calls `Trainer.checkpoint` (a new submission of the same
command: the requeued job resumes from the run folder) and requeues the job, counting time-outs against
`--max-num-timeout`. A preemption that requeues by itself (SIGTERM) needs no hook: the trainer writes its
step checkpoint, Slurm requeues, the same command resumes. Without --name the run is named after the job
id, which a requeue keeps.
"""
import argparse
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")  # read when submitit is imported

import submitit  # noqa: E402


class Trainer:
    """What each task runs: training.main with srun's rank variables."""

    def __init__(self, train_argv: list[str]):
        self.train_argv = list(train_argv)

    def __call__(self):
        env = submitit.JobEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(12805 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        if SRC not in sys.path:
            sys.path.insert(0, SRC)
        from training.main import main
        from training.preemption import Preempted
        submitit_handler = signal.getsignal(signal.SIGUSR1)  # checkpoint_and_try_requeue, installed by submitit
        try:
            return main([*self.train_argv, "--no-requeue"])
        except Preempted as stop:
            if stop.signal_name == "SIGUSR1" and env.global_rank == 0 and callable(submitit_handler):
                submitit_handler(signal.SIGUSR1, None)  # Trainer.checkpoint, requeue, exit
            raise

    def checkpoint(self, *args, **kwargs):
        """submitit's hook after the trainer's own step checkpoint: the same command again; it resumes."""
        return submitit.helpers.DelayedSubmission(Trainer(self.train_argv))


def parse(argv):
    if "--" in argv:
        i = argv.index("--")
        argv, train_argv = argv[:i], argv[i + 1:]
    else:
        train_argv = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job-dir", default="./submitit_jobs", help="submitit's folder (pickles, job logs)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1, help="processes per node: one per GPU")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=6)
    p.add_argument("--mem-gb", type=int, default=0, help="0: the partition's default")
    p.add_argument("--timeout-min", type=int, default=60 * 24)
    p.add_argument("--signal-delay-s", type=int, default=120, help="SIGUSR1 this long before the time limit")
    p.add_argument("--max-num-timeout", type=int, default=20, help="requeues after time-outs before giving up")
    p.add_argument("--partition", default=None)
    p.add_argument("--job-name", default="neuclip")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    args = p.parse_args(argv)
    if not train_argv:
        p.error("give training.main's flags after --")
    return args, train_argv


def submit(args, train_argv):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))  # for the job
    executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=args.max_num_timeout)
    params = dict(nodes=args.nodes, tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                  timeout_min=args.timeout_min, name=args.job_name, slurm_signal_delay_s=args.signal_delay_s,
                  slurm_additional_parameters={"open-mode": "append"})
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    return executor.submit(Trainer(train_argv))


def main(argv=None):
    args, train_argv = parse(sys.argv[1:] if argv is None else argv)
    job = submit(args, train_argv)
    print(job.job_id, flush=True)
    if args.wait:
        print(job.result())


if __name__ == "__main__":
    main()
