"""--report-to: TensorBoard and/or Weights & Biases, behind the one `scalars(prefix, values, step)` call the
trainer makes. Rank 0 only; elsewhere nothing is written.

wandb is optional (`pip install wandb`) and imported only when asked for; params.py refuses
`--report-to wandb` at start-up when it is missing. WANDB_MODE=offline writes the run under
logs/NAME/wandb/ for a later `wandb sync`. A resumed run continues the same wandb run (its id is the
run name, as open_clip does).
"""
import os

from training.interop.open_clip_flags import report_to_names
from training.logger import TensorBoard

EPOCH_INDEXED = ("eval", "val")  # evaluation results: x is the epoch


class Wandb:
    """open_clip's layout: train/ rows carry `step` and are logged at wandb step = the training step; eval/
    and val/ rows carry `epoch` and are logged at the step count at the epoch's end. The project's own
    x-axis keys (train/step, eval/step, val/step, diag/step) stay beside them."""

    def __init__(self, args, run_dir: str, resuming: bool, steps_done: int = 0):
        self.steps_done = steps_done  # training steps logged so far: the wandb step of an epoch's results
        import wandb  # optional dependency: only runs that report to wandb need it
        self.wandb = wandb
        self.run = wandb.init(project=args.wandb_project_name, name=args.name, id=args.name, notes=args.wandb_notes,
                              dir=run_dir, config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool, type(None)))},
                              resume="allow" if resuming else None, tags=[args.method])

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        # wandb's own step must only grow: step-indexed rows at their step, epoch-indexed ones at the steps
        # done by then (open_clip's num_batches_per_epoch * epoch), which no later train row precedes.
        row = {**{f"{prefix}/{name}": float(v) for name, v in values.items()}, f"{prefix}/step": step}
        if prefix in EPOCH_INDEXED:
            self.run.log({**row, "epoch": step}, step=self.steps_done)
            return
        if prefix == "train":
            row["step"] = step
            self.steps_done = max(self.steps_done, step + 1)
        self.run.log(row, step=max(step, self.steps_done - 1))

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """Fans `scalars` out to every reporter --report-to names."""

    def __init__(self, reporters: list):
        self.reporters = reporters

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for reporter in self.reporters:
            reporter.scalars(prefix, values, step)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def build_reporters(args, run_dir: str, purge_step: int | None) -> Reporters:
    names = report_to_names(args.report_to)
    if not args.is_master:
        return Reporters([])
    reporters = []
    if "tensorboard" in names:
        reporters.append(TensorBoard(os.path.join(run_dir, "tensorboard"), purge_step=purge_step))
    if "wandb" in names:
        reporters.append(Wandb(args, run_dir, resuming=bool(purge_step), steps_done=purge_step or 0))
    return Reporters(reporters)
