"""open_clip architectures beyond plain CLIP: configs with init_logit_bias (every ViT-*-SigLIP*, SO400M,
nllb-siglip) train with every loss, and CoCa is refused at start-up."""
import json
import math

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers neuclip-tiny)
from training.main import main
from training.params import parse_args

# neuclip-tiny's towers with the SigLIP configs' init_logit_scale/init_logit_bias. No "siglip" in the name:
# open_clip.get_tokenizer would pick the SigLIP tokenizer by name, a download.
ARCH = "tiny-logit-bias"


@pytest.fixture(scope="module", autouse=True)
def bias_config(tmp_path_factory):
    cfg = {**open_clip.get_model_config("neuclip-tiny"), "init_logit_scale": math.log(10), "init_logit_bias": -10}
    path = tmp_path_factory.mktemp("configs") / f"{ARCH}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)  # in this process only, like a user's own config
    assert open_clip.create_model(ARCH).logit_bias is not None


def run(tmp_path, name, *extra):
    summary = main(["--logs", str(tmp_path), "--name", name, "--model", ARCH, "--batch-size", "16", "--epochs", "1",
                    "--synthetic-num-samples", "32", "--workers", "0", "--warmup", "1", "--lr", "1e-2",
                    "--precision", "fp32", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
                    "--log-every-n-steps", "1", *extra])
    return summary, torch.load(tmp_path / name / "checkpoints" / "epoch_1.pt", weights_only=True)


@pytest.mark.parametrize("flags", [[], ["--siglip"], ["--fastclip", "--multiply_tau", "--npn", "--npn_num_protos",
                                                         "16", "--accum-freq", "2", "--batch-size", "8"]],
                         ids=["openclip", "siglip", "neuclip-accum"])
def test_init_logit_bias_models_train(tmp_path, flags):
    """Catches `too many values to unpack (expected 3)` at the first step (such models return the bias as
    a 4th output), a bias that no loss uses left trainable (DDP would fail on it), and --siglip training
    a bias of its own instead of the model's (the checkpoint's logit_bias would never move)."""
    summary, ckpt = run(tmp_path, "bias", *flags)
    assert summary["step"] == 2
    assert all(math.isfinite(terms["loss"]) for _, terms in summary["history"])
    bias = ckpt["state_dict"]["logit_bias"]
    if "--siglip" in flags:
        assert bias.item() != -10.0  # the model's own bias is SigLIP's, trained
        assert summary["history"][-1][1]["logit_bias"] == pytest.approx(bias.item())
        assert "logit_bias" not in ckpt["method"]  # no second bias beside the model's
    else:
        assert bias.item() == -10.0  # unused by this loss: kept fixed
    open_clip.create_model_and_transforms(ARCH, pretrained=str(tmp_path / "bias" / "checkpoints" / "epoch_1.pt"))


def test_coca_is_refused_at_start_up(capsys):
    """Catches CoCa models starting to train and crashing at the first step (they return a dict with
    caption logits that no loss here uses): refused with one line naming the way out."""
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "coca_ViT-B-32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "CoCa" in err and "CLIP architecture" in err
