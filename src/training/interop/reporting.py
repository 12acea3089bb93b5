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


class Wandb:
    def __init__(self, args, run_dir: str, resuming: bool):
        import wandb  # optional dependency: only runs that report to wandb need it
        self.wandb = wandb
        self.run = wandb.init(project=args.wandb_project_name, name=args.name, id=args.name, notes=args.wandb_notes,
                              dir=run_dir, config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool, type(None)))},
                              resume="allow" if resuming else None, tags=[args.method])

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        # Each prefix has its own x-axis (train: steps, eval: epochs), so wandb's own step is not used:
        # it must only grow, and an epoch-indexed point after a step-indexed one would be dropped.
        self.run.log({**{f"{prefix}/{name}": float(v) for name, v in values.items()}, f"{prefix}/step": step})

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
        reporters.append(Wandb(args, run_dir, resuming=bool(purge_step)))
    return Reporters(reporters)
