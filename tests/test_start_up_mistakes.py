"""Every start-up mistake a new user makes is one line on stderr, exit status 2, said once, and leaves no
run folder behind (training.startup.preflight runs before the folder is made). Most cases go through the
command line's own wrapper (`run_cli(main, argv)`) in-process; one goes through a real subprocess."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from training.data.synthetic.shards import write_shards
from training.main import main
from training.startup.cli import run_cli

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["--model", "neuclip-tiny", "--synthetic-num-samples", "64", "--batch-size", "4", "--epochs", "1",
        "--warmup", "1", "--precision", "fp32", "--workers", "0", "--zeroshot-frequency", "0",
        "--val-frequency", "0", "--report-to", ""]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with an image, CSVs good and bad, and 2 shards of 32 samples."""
    root = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (8, 8)).save(root / "a.png")
    image = str(root / "a.png")
    (root / "good.csv").write_text("filepath\ttitle\n" + "".join(f"{image}\ta shape {i}\n" for i in range(3)))
    (root / "commas.csv").write_text(f"filepath,title\n{image},a shape\n")
    (root / "no_images.csv").write_text("filepath\ttitle\nnowhere/a.png\ta shape\n")
    (root / "empty.csv").write_text("")
    (root / "latin1.csv").write_bytes("filepath\ttitle\n".encode() + "caf\xe9\ta\n".encode("latin-1"))
    (root / "folder.csv").mkdir()
    write_shards(str(root / "shards"), 64, seed=0, samples_per_shard=32)
    return root


CASES = {  # name: (flags, a fragment of the one line)
    "model typo": (["--model", "ViT-B-3"], "--model ViT-B-3: no such model (closest: ViT-B-32"),
    "batch of one": (["--batch-size", "1"], "--batch-size 1 on 1 process(es) is a global batch of 1"),
    "missing CSV": (["--train-data", "{root}/missing.csv"], "--train-data {root}/missing.csv: no such file"),
    "CSV folder": (["--train-data", "{root}/folder.csv"], "--train-data {root}/folder.csv: not a file"),
    "empty CSV": (["--train-data", "{root}/empty.csv"], "the file is empty"),
    "wrong separator": (["--train-data", "{root}/commas.csv"], "no column --csv-img-key 'filepath'"),
    "not UTF-8": (["--train-data", "{root}/latin1.csv"], "not a UTF-8 CSV/TSV file"),
    "CSV images missing": (["--train-data", "{root}/no_images.csv"], "none of the first 1 image paths exist"),
    "CSV smaller than a batch": (["--train-data", "{root}/good.csv", "--batch-size", "8"],
                                 "--train-data {root}/good.csv has 3 rows, less than one global batch (8)"),
    "missing val CSV": (["--val-data", "{root}/val.csv"], "--val-data {root}/val.csv: no such file"),
    "missing shards": (["--train-data", "{root}/nowhere/{{0..3}}.tar", "--train-num-samples", "64"],
                       "4 of 4 expanded shards do not exist"),
    "no --train-num-samples": (["--train-data", "{root}/shards/{{00000..00001}}.tar"],
                               "--train-num-samples is required with webdataset shards"),
    "missing ImageFolder": (["--imagenet-val", "{root}/imagenet/val"], "--imagenet-val {root}/imagenet/val: no such"),
    "missing --resume": (["--resume", "{root}/nowhere.pt"], "--resume {root}/nowhere.pt: no such checkpoint file"),
    "unwritable --logs": (["--logs", "{root}/good.csv/logs"], "--logs {root}/good.csv/logs: cannot create it"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_start_up_mistake_is_one_line_exit_2_and_no_run_folder(tmp_path, files, capsys, case):
    """Bugs: the model typo, a missing/malformed CSV, a CSV folder, missing --val-data and --batch-size 1
    ended in tracebacks (exit 1; the model's with a 7 KB list of names); missing shards, a missing
    --train-num-samples, the wrong model and CSV mistakes left an empty run folder; a missing --imagenet-val
    trained a whole epoch before failing."""
    flags, fragment = CASES[case]
    flags = [f.format(root=files) for f in flags]
    with pytest.raises(SystemExit) as stop:
        run_cli(main, ["--logs", str(tmp_path), "--name", "run", *TINY, *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert fragment.format(root=files) in err[0], err[0]
    assert not (tmp_path / "run").exists()


def test_model_typo_on_the_command_line_prints_one_line_and_nothing_else(tmp_path):
    """Bug: `--model ViT-B-3` printed an 18-line traceback ending in every model name, exit 1, and left an
    empty run folder."""
    done = subprocess.run([sys.executable, "-u", os.path.join(SRC, "training", "main.py"), "--logs", str(tmp_path),
                           *TINY, "--model", "ViT-B-3"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "closest: ViT-B-32" in done.stderr and len(done.stderr) < 400
    assert os.listdir(tmp_path) == []


def test_a_good_csv_still_trains(tmp_path, files, single_torch_thread):
    """The start-up CSV check must not refuse a file the loader reads (a tab-separated file with a header,
    absolute image paths): guards the check against rejecting good input."""
    summary = main(["--logs", str(tmp_path), "--name", "run", *TINY, "--train-data", str(files / "good.csv"),
                    "--batch-size", "2"])
    assert summary["step"] == 1
