"""What runs before the first step: flags and inputs checked in one line each (user_errors, schedule_checks,
input_checks, resume_checks), one writer per run folder (run_lock), thread and worker counts (threads) and a
quiet console (quiet). Nothing here imports torch at package import: flag errors answer at once."""
