"""What runs before the first step: process set-up and the start-up checks.

Process set-up: the command line (cli: one line and exit status 2 for a user's mistake), the run's name
(run_name), its folder and params.txt (run_folder), one writer per folder (run_lock), thread and worker
counts (threads), a quiet console (quiet).

Checks, each raising training.errors.UserError (or a subclass) with one line naming the flag and the fix:
the data defaults and what they imply (data_defaults), the schedule against the data (schedule_checks),
the global batch and shard keys (input_checks), the model name, data paths and --logs before any run
folder exists (preflight). Elsewhere, by what they check: the flag values themselves
(training.params.validate, and open_clip's flags in training.interop.open_clip_flags, with
--remote-sync's in training.interop.remote_sync), what a resumed run may not change
(training.checkpoint.resume_checks), and damaged data found while reading it (training.data.checks).

Nothing here imports torch at package import: flag errors answer at once."""
