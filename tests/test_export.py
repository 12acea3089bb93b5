"""Portable checkpoints: every run folder carries open_clip_config.json, and `training.export` writes a
folder that plain open_clip loads with `local-dir:` in a process that never imports this project."""
import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image

import training  # noqa: F401  (registers neuclip-tiny in this process only)
from training.export import CONFIG_NAME, WEIGHTS_NAME, main as export_main
from training.main import main as train_main

CAPTIONS = ["a red circle on a blue background", "two green squares", "a small yellow triangle"]

# Runs in a bare interpreter: no PYTHONPATH, cwd outside the repository, so `training` cannot be imported.
LOADER = r"""
import sys
import open_clip, torch
from PIL import Image
folder, image_path, out = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
model.eval()
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
image = preprocess(Image.open(image_path)).unsqueeze(0)
with torch.no_grad():
    feats = {"image": model.encode_image(image, normalize=True),
             "text": model.encode_text(tokenizer(sys.argv[4:]), normalize=True)}
assert not any(m.split(".")[0] in ("training", "contrastive") for m in sys.modules), "imported the project"
torch.save(feats, out)
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    train_main(["--logs", str(logs), "--name", "ex", "--model", "neuclip-tiny", "--batch-size", "16",
                "--epochs", "1", "--synthetic-num-samples", "32", "--workers", "0", "--warmup", "1",
                "--lr", "1e-3", "--precision", "fp32", "--zeroshot-frequency", "0", "--val-frequency", "0",
                "--report-to", ""])
    return str(logs / "ex")


def test_run_folder_carries_its_model_config(run_dir):
    """Catches a run folder without its model config: `neuclip-tiny` then loads nowhere but here."""
    with open(os.path.join(run_dir, CONFIG_NAME)) as f:
        config = json.load(f)
    assert config["model_cfg"] == open_clip.get_model_config("neuclip-tiny")
    image_size = config["model_cfg"]["vision_cfg"]["image_size"]
    assert config["preprocess_cfg"]["size"] in (image_size, [image_size, image_size])
    assert {"mean", "std", "interpolation", "resize_mode"} <= set(config["preprocess_cfg"])


def test_export_loads_in_plain_open_clip_with_the_same_embeddings(run_dir, tmp_path):
    """Catches an export open_clip's `local-dir:` loader cannot read (wrong file names or config layout),
    weights that do not fit, or a preprocess/tokenizer that differs from the trained model's: a subprocess
    that never imports this project must give the embeddings the project computes in-process."""
    out = str(tmp_path / "export")
    export_main(["--train_output_dir", run_dir, "--epoch", "1", "--out", out])
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    image_path = str(tmp_path / "probe.png")
    Image.new("RGB", (50, 40), (200, 30, 60)).save(image_path)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    feats_path = str(tmp_path / "feats.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, out, image_path, feats_path, *CAPTIONS], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(feats_path)

    checkpoint = os.path.join(run_dir, "checkpoints", "epoch_1.pt")
    model, _, preprocess = open_clip.create_model_and_transforms("neuclip-tiny", pretrained=checkpoint)
    model.eval()
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(image_path)).unsqueeze(0), normalize=True)
        text = model.encode_text(open_clip.get_tokenizer("neuclip-tiny")(CAPTIONS), normalize=True)
    torch.testing.assert_close(theirs["image"], image, rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs["text"], text, rtol=0, atol=1e-6)


def test_pretrained_from_an_open_clip_train_checkpoint(tmp_path):
    """Catches a checkpoint written by open_clip_train (DDP's "module." keys, its own optimizer groups and
    top-level keys) not loading as --pretrained here: training must start from its weights."""
    torch.manual_seed(123)
    source = open_clip.create_model("neuclip-tiny")
    with torch.no_grad():
        source.logit_scale.fill_(2.0)
    decay = [p for n, p in source.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in source.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.2}])
    path = tmp_path / "open_clip_train_epoch_3.pt"
    torch.save({"epoch": 3, "name": "theirs", "optimizer": optimizer.state_dict(),
                "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    train_main(["--logs", str(tmp_path), "--name", "ours", "--model", "neuclip-tiny", "--pretrained", str(path),
                "--batch-size", "16", "--epochs", "1", "--synthetic-num-samples", "32", "--workers", "0",
                "--warmup", "1", "--lr", "1e-12", "--wd", "0", "--precision", "fp32", "--zeroshot-frequency", "0",
                "--val-frequency", "0", "--report-to", ""])
    trained = torch.load(tmp_path / "ours" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    for key, value in source.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=1e-9, msg=key)
