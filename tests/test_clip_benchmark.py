"""clip-benchmark, the zero-shot client the DataComp evaluation builds on, scores a checkpoint written by
our trainer exactly as our own evaluator does, with the DataComp fork's settings: autocast off and 4
data-loader workers reading at least 4 shards per task.

clip-benchmark is in requirements-test.txt, so a failed import FAILS this module (it skipped before: 1.6.2
imports `requests` without declaring it, and a skip hid that the client could not run at all).

The built-in zero-shot tasks are exported as clip-benchmark's local webdataset layout (what
`clip_benchmark.datasets.builder.build_wds_dataset` reads):

    ROOT/<task>/test/{0..3}.tar                     NNNNNN.png (lossless: the exact pixels) + NNNNNN.cls (label)
    ROOT/<task>/test/nshards.txt                    "4"
    ROOT/<task>/classnames.txt                      one class name per line, in label order
    ROOT/<task>/zeroshot_classification_templates.txt   one template per line, "{c}" for the class name

and clip-benchmark's real command line (`clip_benchmark.cli.main`, in this process, where `import training`
has registered `neuclip-tiny` with open_clip) evaluates `--model neuclip-tiny --pretrained CKPT`. `--no_amp`:
its default autocast would run the encoders in bf16 on a CPU (fp16 on CUDA) and move the scores.

clip-benchmark 1.6.2's `zeroshot_classification.accuracy` calls float() on a 1-element numpy array, a
TypeError under numpy >= 2.4 (the same bug as open_clip's zero_shot.accuracy). The test environment shares
the trainer's numpy 2.4, so when it fails the test swaps in the same computation with `.item()`; the
evaluation environment (requirements-eval.txt) pins numpy < 2.4 instead, which the DataComp fork needs.
"""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from clip_benchmark import cli  # a missing client fails here: pip install -r requirements-test.txt
from clip_benchmark.metrics import zeroshot_classification

import open_clip  # noqa: E402

import training  # noqa: E402,F401  (registers neuclip-tiny in this process, for clip-benchmark's loader)
from training.eval.evaluation import (BUILTIN_N_PER_TASK, EvalSettings, builtin_tasks,  # noqa: E402
                                 evaluate_builtin_zero_shot)
from training.main import main as train_main  # noqa: E402

SEED = 0
SHARDS, WORKERS = 4, 4  # the DataComp fork's data loader: 4 workers, each needs a shard of its own
# clip-benchmark's own WebDataset(...) call leaves shardshuffle unset, which webdataset 1.0.2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle=...\\) is None")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """epoch_1.pt of a real one-epoch neuclip-tiny run (NeuCLIP on the built-in data set)."""
    logs = tmp_path_factory.mktemp("logs")
    train_main(["--logs", str(logs), "--name", "cb", "--model", "neuclip-tiny", "--batch-size", "16",
                "--epochs", "1", "--synthetic-num-samples", "64", "--synthetic-seed", str(SEED), "--workers", "0",
                "--warmup", "2", "--lr", "1e-3", "--precision", "fp32", "--zeroshot-frequency", "0",
                "--val-frequency", "0", "--report-to", "", "--fastclip", "--npn", "--npn_num_protos", "16"])
    return str(logs / "cb" / "checkpoints" / "epoch_1.pt")


def write_wds_classification(root: str, task) -> None:
    """One built-in zero-shot task as a clip-benchmark webdataset folder of SHARDS shards."""
    os.makedirs(os.path.join(root, "test"))
    samples = list(enumerate(zip(task.images, task.labels)))
    for shard in range(SHARDS):
        with tarfile.open(os.path.join(root, "test", f"{shard}.tar"), "w") as tar:
            for i, (image, label) in samples[shard::SHARDS]:
                png = io.BytesIO()
                image.save(png, format="PNG")
                for name, data in ((f"{i:06d}.png", png.getvalue()), (f"{i:06d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    files = {os.path.join("test", "nshards.txt"): str(SHARDS),
             "classnames.txt": "\n".join(task.classnames),
             "zeroshot_classification_templates.txt": "\n".join(t.replace("{}", "{c}") for t in task.templates)}
    for name, text in files.items():
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            f.write(text + "\n")


def numpy_safe_accuracy(output, target, topk=(1,)):
    """clip-benchmark's `accuracy` with .item() where it calls float() on a 1-element numpy array."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def accuracy_works() -> bool:
    try:
        zeroshot_classification.accuracy(torch.eye(6), torch.arange(6), topk=(1, 5))
    except TypeError:  # numpy >= 2.4: "only 0-dimensional arrays can be converted to Python scalars"
        return False
    return True


@pytest.fixture(scope="module")
def tasks():
    tasks = {name: task for name, task in builtin_tasks(SEED, BUILTIN_N_PER_TASK).items() if task.is_zero_shot}
    assert len(tasks) == 5
    return tasks


@pytest.fixture(scope="module")
def root(tasks, tmp_path_factory):
    """The built-in zero-shot tasks in clip-benchmark's webdataset layout."""
    root = tmp_path_factory.mktemp("wds")
    for name, task in tasks.items():
        write_wds_classification(str(root / name), task)
    return root


@pytest.fixture(scope="module")
def ours(checkpoint):
    model, _, preprocess = open_clip.create_model_and_transforms("neuclip-tiny", pretrained=checkpoint)
    model.eval()
    return evaluate_builtin_zero_shot(model, open_clip.get_tokenizer("neuclip-tiny"), preprocess,
                                      EvalSettings(torch.device("cpu"), "fp32", 256), SEED)


def test_clip_benchmark_matches_our_evaluator(checkpoint, tasks, root, ours, tmp_path, monkeypatch):
    """Catches a checkpoint clip-benchmark cannot load or scores differently from our evaluator, and a
    client that breaks with the fork's settings (no autocast, 4 workers over 4 shards)."""
    out = tmp_path / "results"
    out.mkdir()

    if not accuracy_works():
        monkeypatch.setattr(zeroshot_classification, "accuracy", numpy_safe_accuracy)
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--model", "neuclip-tiny", "--pretrained", checkpoint,
        "--dataset", *[f"wds/{name}" for name in tasks], "--dataset_root", str(root / "{dataset}"),
        "--task", "zeroshot_classification", "--no_amp", "--num_workers", str(WORKERS), "--batch_size", "128",
        "--output", str(out / "{dataset}.json"), "--quiet"])
    cli.main()

    for name, task in tasks.items():
        with open(out / f"{name}.json") as f:
            result = json.load(f)
        assert result["model"] == "neuclip-tiny" and result["pretrained"] == checkpoint
        metrics = result["metrics"]
        assert metrics["acc1"] == pytest.approx(ours[f"builtin/{name}/top1"], abs=1e-6), name
        if len(task.classnames) > 5:  # our evaluator reports top-5 only where it is not trivially 1
            assert metrics["acc5"] == pytest.approx(ours[f"builtin/{name}/top5"], abs=1e-6), name
    assert any(ours[f"builtin/{name}/top1"] != ours["builtin/colour/top1"] for name in tasks)  # not degenerate


# clip-benchmark's CLI in a bare interpreter (no PYTHONPATH, cwd outside the repository): only open_clip's
# local-dir: loader can find the model. The numpy-2.4 patch is the one above, for the same reason.
BARE_CLI = r"""
import sys
import torch
from clip_benchmark import cli
from clip_benchmark.metrics import zeroshot_classification as zc
try:
    zc.accuracy(torch.eye(6), torch.arange(6), topk=(1, 5))
except TypeError:
    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]
    zc.accuracy = accuracy
sys.argv = ["clip_benchmark"] + sys.argv[1:]
cli.main()
assert not any(m.split(".")[0] in ("training", "contrastive") for m in sys.modules), "imported the project"
"""


def test_clip_benchmark_cli_scores_an_export_without_the_project(checkpoint, tasks, root, ours, tmp_path):
    """Catches an exported model the clip-benchmark CLI cannot load where this project is not importable
    (`neuclip-tiny` is unknown there: "Model config for 'neuclip-tiny' not found"), or scores differently."""
    from training.export import main as export_main

    run_dir = os.path.dirname(os.path.dirname(checkpoint))
    export = str(tmp_path / "export")
    export_main(["--train_output_dir", run_dir, "--epoch", "1", "--out", export])
    names = ["colour", "shape"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", BARE_CLI, "eval", "--model", f"local-dir:{export}",
                           "--pretrained", "none", "--dataset", *[f"wds/{n}" for n in names],
                           "--dataset_root", str(root / "{dataset}"), "--task", "zeroshot_classification",
                           "--no_amp", "--num_workers", "0", "--batch_size", "128",  # workers: tested above
                           "--output", str(tmp_path / "{dataset}.json"), "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in names:
        with open(tmp_path / f"{name}.json") as f:
            metrics = json.load(f)["metrics"]
        assert metrics["acc1"] == pytest.approx(ours[f"builtin/{name}/top1"], abs=1e-6), name
