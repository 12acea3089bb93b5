"""The real `main([...])` end to end on CPU: run folder, checkpoints, resume, open_clip loading."""
import math
import os

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers neuclip-tiny)
from training.main import main
from training.data.synthetic.shards import write_shards

N_SAMPLES = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shards(str(out), N_SAMPLES, seed=0, samples_per_shard=8)
    return str(out / "{00000..00007}.tar")


def base_flags(tmp_path, name, *extra):
    return ["--logs", str(tmp_path), "--name", name, "--model", "neuclip-tiny", "--batch-size", "16",
            "--workers", "1", "--warmup", "2", "--lr", "1e-3", "--precision", "fp32", "--seed", "3",
            "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--val-frequency", "0",
            "--report-to", "", *extra]


def test_main_end_to_end_on_shards(tmp_path, shards):
    summary = main(base_flags(tmp_path, "e2e", "--train-data", shards, "--train-num-samples",
                              str(N_SAMPLES), "--epochs", "2", "--save-most-recent", "--report-to",
                              "tensorboard"))
    run = tmp_path / "e2e"
    assert summary["step"] == 2 * N_SAMPLES // 16
    assert all(math.isfinite(terms["contrastive_loss"]) for _, terms in summary["history"])
    assert (run / "out.log").read_text().count("Train Epoch: 1") >= 1
    params = (run / "params.txt").read_text().splitlines()
    assert params == sorted(params) and "model: neuclip-tiny" in params
    assert os.listdir(run / "tensorboard")
    for name in ("epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"):
        assert (run / "checkpoints" / name).is_file()
    ckpt = torch.load(run / "checkpoints" / "epoch_2.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["name"] == "e2e" and ckpt["step"] == summary["step"]
    model = open_clip.create_model("neuclip-tiny")
    assert set(ckpt["state_dict"]) == set(model.state_dict())


def test_open_clip_loads_checkpoint_strictly(tmp_path, shards):
    main(base_flags(tmp_path, "load", "--train-data", shards, "--train-num-samples", "32", "--epochs", "1"))
    path = tmp_path / "load" / "checkpoints" / "epoch_1.pt"
    model, _, _ = open_clip.create_model_and_transforms("neuclip-tiny", pretrained=str(path))
    saved = torch.load(path, weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("method_flags", [
    [],
    ["--fastclip", "--multiply_tau", "--lr_tau_scheduler", "step_thresh", "--fastclip_eps", "1e-6"],
])
def test_resume_continues_exactly(tmp_path, shards, method_flags):
    """Two epochs in one go == one epoch, then --resume latest for the second."""
    common = ["--train-data", shards, "--train-num-samples", str(N_SAMPLES), "--data_size", str(N_SAMPLES),
              "--epochs", "2", "--save-most-recent", *method_flags]
    straight = main(base_flags(tmp_path, "straight", *common))
    main(base_flags(tmp_path, "split", *common, "--stop_epochs", "1"))
    resumed = main(base_flags(tmp_path, "split", *common, "--resume", "latest"))
    second_epoch = {step: terms for step, terms in straight["history"] if step > N_SAMPLES // 16}
    assert [s for s, _ in resumed["history"]] == sorted(second_epoch)
    for step, terms in resumed["history"]:
        for name, value in terms.items():
            assert value == pytest.approx(second_epoch[step][name], rel=1e-6, abs=1e-9), (step, name)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "epoch_2.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "epoch_2.pt", weights_only=True)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-7)


def test_existing_run_folder_resumes_unless_refused(tmp_path, shards):
    """open_clip refuses an existing run folder; here the same command resumes it (a finished run has
    nothing left to do), and --no-auto-resume brings the refusal back."""
    flags = base_flags(tmp_path, "again", "--train-data", shards, "--train-num-samples", "16", "--epochs", "1")
    first = main(flags)
    again = main(flags)
    assert again["step"] == first["step"] and again["history"] == []
    with pytest.raises(FileExistsError, match="--no-auto-resume"):
        main([*flags, "--no-auto-resume"])


@pytest.mark.parametrize("flags, message", [
    (["--npn"], "--npn only applies to the global contrastive loss family: add --fastclip"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--siglip", "--fastclip"], "--siglip and --fastclip"),
    (["--fastclip", "--npn", "--amorlip"], "--npn and --amorlip"),
    (["--accum-freq", "0"], "--accum-freq must be ≥ 1"),
])
def test_bad_flags_fail_at_once_naming_the_flag(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        main(base_flags(tmp_path, "bad", *flags))
    assert message in capsys.readouterr().err


def test_cpu_refuses_fp16(tmp_path):
    with pytest.raises(ValueError, match="40x slower"):
        main(base_flags(tmp_path, "fp16", "--precision", "amp"))


def test_missing_shard_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        main(base_flags(tmp_path, "missing", "--train-data", str(tmp_path / "nothing-here" / "{0..3}.tar"),
                        "--train-num-samples", "16"))


def test_key_beyond_data_size_names_both_numbers(tmp_path, shards):
    with pytest.raises(Exception, match=r"(?s)(?=.*\b40\b)(?=.*--data_size)"):
        main(base_flags(tmp_path, "keys", "--train-data", shards, "--train-num-samples", "64",
                        "--workers", "0", "--fastclip", "--data_size", "40", "--epochs", "1"))
