"""The user's mistakes as one error type (training.errors): every check's error is one, the command line
turns each into one line and exit status 2, and the module stays on the ground floor."""
from types import SimpleNamespace

import pytest

from training.data.checks import DataConfigError, MissingData
from training.errors import MissingResume, ResumeMismatch, RunFolderExists, UserError, flag_spelling
from training.interop.open_clip_flags import report_to_names
from training.interop.remote_sync import FirstSyncFailed
from training.params import build_parser
from training.startup.cli import run_cli
from training.startup.input_checks import check_global_batch

from test_layout import import_graph


def test_errors_module_imports_nothing_from_the_project():
    """Catches training.errors importing a project module (say training.params, for the flags' spellings):
    every check, the checkpoint wing and the data pipeline import it, so such an import closes a circle as
    soon as that module imports a check."""
    assert import_graph()["training.errors"] == set()


@pytest.mark.parametrize("error", [
    DataConfigError("--train-data 'x.tar' names no shards"), MissingData("--train-data x.tar: no such file"),
    FirstSyncFailed("--remote-sync s3://nowhere: the first sync failed"), RunFolderExists("run folder exists"),
    MissingResume("--resume x.pt: no such checkpoint file"), ResumeMismatch("cannot resume from x.pt")],
    ids=lambda e: type(e).__name__)
def test_every_check_error_is_one_line_and_exit_2(error, capsys):
    """Catches a check whose error type the command line does not take for the user's mistake: a traceback
    on every rank and exit status 1 instead of one line and 2 (the data pipeline's and --remote-sync's errors
    were recognised by name before they derived from UserError)."""
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exited:
        run_cli(main, [])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_flag_checks_outside_startup_raise_the_user_error_type():
    """Catches an open_clip flag check raising a bare ValueError again: a caller that tells the user's
    mistakes from bugs by type (run_cli, main's failure report) would take it for a bug."""
    with pytest.raises(UserError, match="--report-to bogus"):
        report_to_names("bogus")


def test_resume_mismatch_names_the_flags_as_they_are_spelled():
    """Catches the changed flags named by their argparse destination (--batch_size) instead of the
    command line's spelling (--batch-size), which is what the user types to fix it."""
    size_mismatch = RuntimeError("size mismatch for npn.protos: copying a param with shape [8, 4] ...\n")
    line = str(ResumeMismatch.of("iter_4.pt", size_mismatch, ["batch_size: 8 -> 16"], build_parser()))
    assert "flags that differ from the run folder's params.txt: --batch-size 8 -> 16" in line
    assert flag_spelling("npn_num_protos", build_parser()) == "--npn_num_protos"
    assert flag_spelling("batch_size") == "--batch_size"  # no parser: the destination, as a flag


def test_global_batch_refusal_counts_accumulated_micro_batches():
    """Catches the one-sample refusal ignoring --accum-freq: with 2 micro-batches of 1 the losses contrast
    both samples of the step (training.batching), which has a negative; a single sample still has none."""
    check_global_batch(SimpleNamespace(batch_size=1, world_size=1, accum_freq=2))
    with pytest.raises(UserError, match=r"--batch-size 1 on 1 process\(es\) is a global batch of 1"):
        check_global_batch(SimpleNamespace(batch_size=1, world_size=1, accum_freq=1))
