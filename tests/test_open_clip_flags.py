"""open_clip_train's flags: every one is supported with open_clip's meaning or refused at start-up with a
reason, and the supported ones change what they claim to."""
import argparse
import glob
import json
import math
import struct

import open_clip
import open_clip_train.params
import pytest
import torch

import training  # noqa: F401  (registers neuclip-tiny)
from training.main import main
from training.interop.open_clip_flags import REFUSED
from training.params import build_parser, parse_args
from training.scheduler import ConstantCooldown


class _Stop(Exception):
    pass


def open_clip_train_flags() -> list[str]:
    """The option strings of the installed open_clip_train's parser (it builds and parses in one call)."""
    captured = {}

    def grab(self, *args, **kwargs):
        captured["parser"] = self
        raise _Stop

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        open_clip_train.params.parse_args([])
    except _Stop:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return [a.option_strings[0] for a in captured["parser"]._actions if a.option_strings and a.dest != "help"]


def test_every_open_clip_train_flag_is_supported_or_refused():
    """Catches an open_clip_train flag that this trainer rejects as unknown (argparse's "unrecognized
    arguments", no reason given) -- the 44 flags missing before -- and a refusal table entry for a flag that
    is also defined as supported."""
    theirs = open_clip_train_flags()
    assert len(theirs) >= 90
    actions = {s: a for a in build_parser()._actions for s in a.option_strings}
    missing = [flag for flag in theirs if flag not in actions]
    assert not missing, f"open_clip_train flags neither supported nor refused: {missing}"
    refused_as_supported = [f for f in REFUSED if type(actions[f]).__name__ != "Refuse"]
    assert not refused_as_supported


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_refused_flag_exits_2_with_one_line_reason(flag, capsys):
    """Catches a refused flag that parses (accepted and ignored) or fails without saying why."""
    argv = [flag] if flag in {"--torchscript", "--trace", "--copy-codebase", "--horovod", "--ddp-static-graph",
                              "--no-set-device-rank"} else [flag, "1"]
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} is not supported: {REFUSED[flag]}" in line and line.count("not supported") == 1


@pytest.mark.parametrize("argv, message", [
    (["--opt", "sgd"], "--opt sgd"),
    (["--report-to", "mlflow"], "--report-to mlflow"),
    (["--loss-dist-impl", "gather"], "--loss-dist-impl only applies to --siglip"),
    (["--lock-text-unlocked-layers", "1"], "needs --lock-text"),
])
def test_refused_values_exit_2_with_one_line_reason(argv, message, capsys):
    """Catches a value open_clip accepts but this trainer cannot honour being taken silently (--report-to
    wandb used to do nothing; any unknown reporter was ignored the same way)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("model, beta2, eps", [("RN50", 0.999, 1e-8), ("convnext_base", 0.999, 1e-8),
                                               ("ViT-B-32", 0.98, 1e-6), ("neuclip-tiny", 0.98, 1e-6)])
def test_optimizer_defaults_follow_open_clip(model, beta2, eps):
    """Catches RN (and other non-ViT) models silently getting the ViT betas/eps: open_clip's
    get_default_params gives them beta2 0.999, eps 1e-8. An explicit flag still wins."""
    args = parse_args(["--model", model])
    assert (args.beta2, args.eps) == (beta2, eps)
    assert (parse_args(["--model", model, "--beta2", "0.95", "--eps", "1e-7"]).beta2) == 0.95


def test_opt_skip_scheduler_and_precision_spellings():
    """Catches open_clip's spellings being accepted with another meaning: --opt is --optimizer,
    --skip-scheduler a constant lr from step 0 for every group, amp_bfloat16 is amp_bf16."""
    args = parse_args(["--opt", "lamb", "--skip-scheduler", "--precision", "amp_bfloat16"])
    assert args.optimizer == "lamb" and args.precision == "amp_bf16"
    assert (args.lr_scheduler, args.lr_tau_scheduler, args.warmup) == ("const", "const", 0)


def test_lr_cooldown_power():
    """Catches --lr-cooldown-power being ignored: open_clip decays by (1 - progress) ** power."""
    linear, squared = ConstantCooldown(0, 100, 50, 0.0), ConstantCooldown(0, 100, 50, 0.0, power=2.0)
    assert linear(1.0, 75) == pytest.approx(0.5) and squared(1.0, 75) == pytest.approx(0.25)


def run(tmp_path, name, *extra, epochs=1):
    return main(["--logs", str(tmp_path), "--name", name, "--model", "neuclip-tiny", "--batch-size", "16",
                 "--epochs", str(epochs), "--synthetic-num-samples", "32", "--workers", "0", "--warmup", "1",
                 "--lr", "1e-2", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
                 "--log-every-n-steps", "1", *extra])


def test_lock_image_and_text_freeze_the_towers(tmp_path):
    """Catches --lock-image/--lock-text accepted without freezing: the towers' weights must not move
    between epochs while the temperature still trains."""
    run(tmp_path, "lock", "--lock-image", "--lock-text", "--lock-text-freeze-layer-norm", "--precision", "fp32",
        epochs=2)
    first, second = (torch.load(tmp_path / "lock" / "checkpoints" / f"epoch_{e}.pt", weights_only=True)["state_dict"]
                     for e in (1, 2))
    towers = [k for k in first if k != "logit_scale"]
    assert any(k.startswith("visual.") for k in towers) and any(k.startswith("transformer.") for k in towers)
    assert all(torch.equal(first[k], second[k]) for k in towers)
    assert not torch.equal(first["logit_scale"], second["logit_scale"])


def test_lock_text_keeps_layer_norms_trainable_unless_asked():
    """Catches --lock-text crashing on native CLIP text towers without --lock-text-freeze-layer-norm
    (open_clip's own lock_text_tower asserts it) or freezing the LayerNorms that flag says stay trainable."""
    from training.interop.model_setup import apply_model_flags

    for freeze in (False, True):
        model = open_clip.create_model("neuclip-tiny")
        args = parse_args(["--lock-text", "--lock-text-unlocked-layers", "2"] +
                          (["--lock-text-freeze-layer-norm"] if freeze else []))
        args.world_size = 1
        apply_model_flags(model, torch.nn.Module(), args)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        # open_clip counts groups from the end: 1 = the projection, 2 = + the last block and ln_final
        assert {"text_projection", "transformer.resblocks.1.attn.in_proj_weight"} <= trainable
        assert "transformer.resblocks.0.attn.in_proj_weight" not in trainable
        assert ("transformer.resblocks.0.ln_1.weight" in trainable) is not freeze
        assert "visual.conv1.weight" in trainable


def test_model_and_transform_flags_reach_open_clip(tmp_path):
    """Catches the open_clip model flags being parsed and dropped: the run's model (open_clip_config.json,
    the checkpoint's shapes) and its transforms must be the ones asked for."""
    run(tmp_path, "force", "--precision", "fp32", "--force-image-size", "16", "--force-quick-gelu",
        "--force-context-length", "12", "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.25", "0.25", "0.25",
        "--image-interpolation", "bilinear", "--image-resize-mode", "squash", "--aug-cfg", "scale=(0.5,1.0)")
    with open(tmp_path / "force" / "open_clip_config.json") as f:
        config = json.load(f)
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 16 and config["model_cfg"]["quick_gelu"] is True
    assert config["model_cfg"]["text_cfg"]["context_length"] == 12
    pre = config["preprocess_cfg"]
    assert pre["mean"] == [0.5] * 3 and pre["std"] == [0.25] * 3
    assert (pre["interpolation"], pre["resize_mode"]) == ("bilinear", "squash")
    state = torch.load(tmp_path / "force" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert state["positional_embedding"].shape[0] == 12
    assert state["visual.positional_embedding"].shape[0] == (16 // 8) ** 2 + 1


def test_pure_bf16_trains_a_bf16_model(tmp_path):
    """Catches --precision pure_bf16 refused or silently fp32: open_clip casts the whole model to bf16
    (and its inputs), and the loss stays finite."""
    summary = run(tmp_path, "pbf16", "--precision", "pure_bf16")
    assert all(math.isfinite(terms["loss"]) for _, terms in summary["history"])
    state = torch.load(tmp_path / "pbf16" / "checkpoints" / "epoch_1.pt", weights_only=True)["state_dict"]
    assert state["visual.conv1.weight"].dtype == torch.bfloat16


def wandb_history(run_dir) -> list[dict]:
    """History rows of an offline wandb run: its .wandb file is a LevelDB-style log (7-byte file header,
    32 KiB blocks, chunks of crc32/length/type) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, pos, buf, rows = open(path, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.parametrize("method", [[], ["--fastclip", "--multiply_tau", "--npn", "--npn_num_protos", "16"]],
                         ids=["openclip", "neuclip"])
def test_report_to_wandb_writes_a_run_with_open_clips_names(tmp_path, monkeypatch, method):
    """Catches --report-to wandb accepted and doing nothing (as before), and runs without open_clip's
    train/loss and train/scale (OpenCLIP runs had only train/contrastive_loss and train/logit_scale)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = run(tmp_path, "wb", "--precision", "fp32", "--report-to", "wandb", "--wandb-project-name", "t",
                  *method)
    rows = [r for r in wandb_history(tmp_path / "wb") if "train/loss" in r]
    # logged at open_clip's step numbers, from 0: the history counts steps done (from 1)
    assert [r["train/step"] for r in rows] == [step - 1 for step, _ in summary["history"]]
    assert [r["train/loss"] for r in rows] == pytest.approx([t["loss"] for _, t in summary["history"]])
    assert all(r["train/scale"] > 0 and "train/samples_per_second_per_gpu" in r for r in rows)
    assert not (tmp_path / "wb" / "tensorboard").exists()  # open_clip's meaning: only what is named


def test_remote_sync_fsspec_copies_the_run_folder(tmp_path):
    """Catches --remote-sync accepted without copying anything (or refused): with fsspec and a local
    target, REMOTE/NAME ends as a byte-identical copy of the run folder, checkpoints included."""
    remote = tmp_path / "remote"
    run(tmp_path / "logs", "rs", "--precision", "fp32", "--remote-sync", str(remote), "--remote-sync-protocol",
        "fsspec", "--remote-sync-frequency", "1", "--report-to", "tensorboard")
    local = tmp_path / "logs" / "rs"
    files = sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file())
    assert local.joinpath("checkpoints", "epoch_1.pt") in [local / f for f in files]
    for rel in files:
        assert (remote / "rs" / rel).read_bytes() == (local / rel).read_bytes(), rel


def test_remote_sync_s3_without_the_aws_cli_is_refused(monkeypatch, capsys):
    """Catches a run that starts, trains and only fails (or silently never syncs) when the aws CLI that
    --remote-sync-protocol s3 runs is missing."""
    monkeypatch.setenv("PATH", "")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--remote-sync", "s3://bucket/runs"])
    assert exc.value.code == 2 and "aws CLI" in capsys.readouterr().err.strip().splitlines()[-1]


def test_train_data_upsampling_factors_weight_each_source():
    """Catches --train-data-upsampling-factors accepted and ignored: with '1::3' the resampled shard stream
    draws a shard of the second source 3 times as often as one of the first (open_clip's meaning)."""
    from itertools import islice

    from training.data.info import SharedEpoch
    from training.data.loader import EpochResampledShards, shard_weights

    pattern = "a/{0..3}.tar::b/{0..1}.tar"
    weights = shard_weights(pattern, "1::3")
    assert weights == [1.0] * 4 + [3.0] * 2
    urls = [f"a/{i}.tar" for i in range(4)] + ["b/0.tar", "b/1.tar"]
    drawn = [d["url"] for d in islice(EpochResampledShards(urls, 0, SharedEpoch(), 0, weights), 6000)]
    from_b = sum(u.startswith("b/") for u in drawn) / len(drawn)
    assert from_b == pytest.approx(6 / 10, abs=0.03)  # 2 shards x 3 against 4 shards x 1
    uniform = [d["url"] for d in islice(EpochResampledShards(urls, 0, SharedEpoch(), 0), 6000)]
    assert sum(u.startswith("b/") for u in uniform) / 6000 == pytest.approx(2 / 6, abs=0.03)


@pytest.mark.parametrize("argv", [["--train-data", "a.tar::b.tar", "--train-data-upsampling-factors", "1::2"],
                                  ["--train-data", "a.tar::b.tar", "--dataset-resampled",
                                   "--train-data-upsampling-factors", "1::2::3"]])
def test_train_data_upsampling_factors_need_resampling_and_one_factor_per_source(argv, capsys):
    """Catches factors that would be ignored without --dataset-resampled, or misassigned to sources."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2 and "--train-data-upsampling-factors" in capsys.readouterr().err.splitlines()[-1]
