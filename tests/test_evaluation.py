"""Evaluation: metric functions against hand computations, in-training evaluate(), the standalone CLI."""
import json
import math
import os
import pickle
import socket
import types

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import training  # noqa: F401  (registers neuclip-tiny)
from training.eval import evaluation
from training.eval.evaluate import group_lines, main as evaluate_main, resolve_checkpoint
from training.eval.evaluation import (
    EvalSettings, encode_images, encode_texts, evaluate, evaluate_imagefolder, imagefolder_classnames, unique_by_key,
)
from training.eval.metrics import (
    candidate_accuracy, caption_groups, class_embeddings, clip_loss, pair_metrics, retrieval_recall,
    zero_shot_accuracy,
)
from training.eval.datacomp_info import write_info_pkl

ARCH = "neuclip-tiny"
BATCH = 64
TASKS = ("colour", "shape", "size", "position", "background", "relation")


def unit(*rows) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# ------------------------------------------------------------------------- metrics by hand

def test_class_embedding_averages_normalised_templates_then_renormalises():
    # templates of one class at (2, 0) and (0, 1): normalised first, so both weigh the same
    got = class_embeddings(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]))
    assert torch.allclose(got, torch.tensor([[1.0, 1.0]]) / math.sqrt(2))


def test_zero_shot_top1_by_hand_and_no_top5_for_few_classes():
    classes = torch.eye(3)
    images = unit([0.9, 0.1, 0.0],   # label 0: right
                  [0.1, 0.2, 0.9],   # label 1: class 2 wins, wrong
                  [0.0, 1.0, 0.2],   # label 1: right
                  [0.5, 0.2, 0.6])   # label 0: class 2 wins, wrong
    result = zero_shot_accuracy(images, classes, torch.tensor([0, 1, 1, 0]))
    assert result == {"top1": 0.5}
    assert isinstance(result["top1"], float)


def test_zero_shot_top5_by_hand():
    classes = torch.eye(7)
    # image 0: label 6 ranks 1st; image 1: label 0 ranks 5th; image 2: label 0 ranks 6th
    images = torch.tensor([[0, 0, 0, 0, 0, 0, 1.0],
                           [0.3, 0.7, 0.6, 0.5, 0.4, 0.1, 0.2],
                           [0.2, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1]])
    result = zero_shot_accuracy(images, classes, torch.tensor([6, 0, 0]))
    assert result["top1"] == pytest.approx(1 / 3)
    assert result["top5"] == pytest.approx(2 / 3)


def recalls(result: dict) -> dict:
    return {k: v for k, v in result.items() if "_R@" in k}


def test_ties_count_against_the_model():
    # every class scores the same: no class is "predicted", so nothing is right
    assert zero_shot_accuracy(unit([1.0, 0.0]), unit([1.0, 1.0], [1.0, 1.0]), torch.tensor([0]))["top1"] == 0.0
    same = unit([1.0, 0.0], [1.0, 0.0])  # two different captions that embed identically
    assert recalls(retrieval_recall(same, same, ks=(1, 2))) == {
        "image_to_text_R@1": 0.0, "image_to_text_R@2": 1.0, "text_to_image_R@1": 0.0, "text_to_image_R@2": 1.0}


def test_nan_embeddings_score_nothing():
    broken = torch.full((2, 3), float("nan"))
    assert zero_shot_accuracy(broken, torch.eye(3), torch.tensor([0, 1]))["top1"] == 0.0
    assert set(recalls(retrieval_recall(broken, broken, ks=(1,))).values()) == {0.0}
    assert math.isnan(clip_loss(broken, broken, 1.0))


def test_candidate_accuracy_by_hand():
    images = unit([1.0, 0.0], [0.0, 1.0], [1.0, 1.0])
    candidates = torch.stack([unit([0.9, 0.1], [0.1, 0.9], [-1.0, 0.0]),    # label 0: right
                              unit([1.0, 0.0], [0.5, 0.5], [0.2, 0.8]),     # label 1: [0.2, 0.8] wins, wrong
                              unit([1.0, 0.9], [0.0, 1.0], [1.0, 0.0])])    # label 0: right
    assert candidate_accuracy(images, candidates, torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)


def test_retrieval_recall_by_hand():
    images = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    texts = unit([1, 0.1, 0], [1, 0.05, 0], [0, 0, 1])
    # similarities (rows images, columns texts): [[.995, .9988, 0], [.0995, .0499, 0], [0, 0, 1]]
    # image 0 and image 1 each rank their own text 2nd; image 2 1st
    # text 0 -> image 0 first (right); text 1 -> image 0 first, its own image 1 2nd; text 2 -> image 2
    result = retrieval_recall(images, texts, ks=(1, 2, 10))
    assert recalls(result) == pytest.approx({"image_to_text_R@1": 1 / 3, "image_to_text_R@2": 1.0, "image_to_text_R@10": 1.0,
                                    "text_to_image_R@1": 2 / 3, "text_to_image_R@2": 1.0, "text_to_image_R@10": 1.0})
    assert all(isinstance(v, float) for v in result.values())
    # open_clip's ranks (1 = first): images 2, 2, 1; texts 1, 2, 1
    assert result["image_to_text_mean_rank"] == pytest.approx(5 / 3) and result["image_to_text_median_rank"] == 2
    assert result["text_to_image_mean_rank"] == pytest.approx(4 / 3) and result["text_to_image_median_rank"] == 1


def test_identical_captions_match_each_other():
    images = unit([1, 0], [0.9, 0.1], [0, 1])
    texts = unit([1, 0.05], [1, 0.05], [0, 1])  # pairs 0 and 1 have the same caption
    tokens = torch.tensor([[5, 6], [5, 6], [7, 8]])
    assert caption_groups(tokens).tolist()[0] == caption_groups(tokens).tolist()[1]
    assert retrieval_recall(images, texts, ks=(1,))["image_to_text_R@1"] == pytest.approx(1 / 3)  # a tie: wrong
    grouped = retrieval_recall(images, texts, caption_groups(tokens), ks=(1,))
    assert recalls(grouped) == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}


def test_clip_loss_by_hand():
    e = torch.eye(2)
    scale = 2.0
    # logits [[s, 0], [0, s]]: every row and column has cross-entropy log(1 + e^-s)
    assert clip_loss(e, e, scale) == pytest.approx(math.log1p(math.exp(-scale)), rel=1e-5)
    # chunks of one pair have nothing to contrast: zero loss
    assert clip_loss(e, e, scale, batch_size=1) == pytest.approx(0.0, abs=1e-6)
    # 3 pairs in chunks of 2: chunk {0,1} as above, chunk {2} zero, weighted 2:1
    e3 = torch.eye(3)
    assert clip_loss(e3, e3, scale, batch_size=2) == pytest.approx(2 / 3 * math.log1p(math.exp(-scale)), rel=1e-5)
    # image 0 with text 1 and vice versa, one chunk: the loss of the swapped pairs
    swapped = clip_loss(e, e.flip(0), 1.0)
    assert swapped == pytest.approx(math.log1p(math.e))


def test_unique_by_key_keeps_first_of_each_key_in_key_order():
    keys = torch.tensor([7, 3, 9, 3, 7, 1])
    keep = unique_by_key(keys)
    assert keys[keep].tolist() == [1, 3, 7, 9]
    assert keep.tolist() == [5, 1, 0, 2]


# --------------------------------------------------------------- a random model, a run folder

class RecordingTB:
    def __init__(self):
        self.calls = []

    def scalars(self, prefix, values, step):
        self.calls.append((prefix, dict(values), step))


def make_args(**overrides):
    args = dict(zeroshot_frequency=1, val_frequency=1, epochs=2, imagenet_val=None, synthetic_seed=0,
                precision="fp32", device="cpu", batch_size=BATCH, workers=0, is_master=True, rank=0,
                world_size=1, dataset_type="synthetic")
    return types.SimpleNamespace(**(args | overrides))


@pytest.fixture(scope="module")
def small_builtin():
    """Smaller built-in sets keep the module fast."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "BUILTIN_N_PER_TASK", 40)
        mp.setattr(evaluation, "BUILTIN_RETRIEVAL_N", 100)
        yield


@pytest.fixture(scope="module")
def tiny(small_builtin):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH)
    return model, preprocess, open_clip.get_tokenizer(ARCH)


def val_batches(preprocess, tokenizer):
    """Two batches; the second repeats keys 0 and 1, as DistributedSampler pads a rank."""
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    images = torch.stack([preprocess(Image.new("RGB", (40, 40), c)) for c in colours])
    captions = [f"a {c} picture" for c in colours]
    captions[5] = captions[4]  # a repeated caption
    tokens = tokenizer(captions)
    first = (images[:4], tokens[:4], torch.tensor([0, 1, 2, 3]))
    second = (torch.cat([images[4:], images[:2]]), torch.cat([tokens[4:], tokens[:2]]), torch.tensor([4, 5, 0, 1]))
    return [first, second], (images, tokens)


@pytest.fixture(scope="module")
def in_process(tiny, tmp_path_factory):
    model, preprocess, tokenizer = tiny
    run_dir = str(tmp_path_factory.mktemp("run"))
    batches, unique = val_batches(preprocess, tokenizer)
    tb = RecordingTB()
    model.train()
    result = evaluate(model, {"val": types.SimpleNamespace(dataloader=batches)}, 1, make_args(), tokenizer,
                      preprocess, tb, run_dir)
    return types.SimpleNamespace(result=result, run_dir=run_dir, tb=tb, unique=unique, model=model)


def test_evaluate_writes_one_results_line_with_expected_keys(in_process, tiny):
    result = in_process.result
    expected = {"epoch", "builtin/mean_top1", "builtin/colour/top5", "builtin/shape/top5"}
    expected |= {f"builtin/{t}/top1" for t in TASKS}
    expected |= {f"{p}/{d}_R@{k}" for p in ("builtin/retrieval", "val") for d in ("image_to_text", "text_to_image")
                 for k in (1, 5, 10)}
    expected |= {f"{p}/{d}_{r}_rank" for p in ("builtin/retrieval", "val") for d in ("image_to_text", "text_to_image")
                 for r in ("mean", "median")}  # open_clip's ranks
    expected |= {"builtin/retrieval/clip_loss", "val/clip_loss"}
    assert set(result) == expected
    with open(os.path.join(in_process.run_dir, "checkpoints", "results.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines == [result] and result["epoch"] == 1
    for key, value in result.items():
        assert isinstance(value, (int, float))
        if key.endswith("_rank"):  # 1 = first, of 100 built-in pairs or 6 validation pairs
            assert 1.0 <= value <= 100.0, key
        elif key != "epoch" and not key.endswith("clip_loss"):
            assert 0.0 <= value <= 1.0, key
    assert result["builtin/mean_top1"] == pytest.approx(sum(result[f"builtin/{t}/top1"] for t in TASKS) / 6)
    assert 0.03 <= result["builtin/colour/top1"] <= 0.3  # 8 classes: chance is 0.125
    assert result["builtin/retrieval/clip_loss"] > 0
    assert in_process.tb.calls[0] == ("eval", {k: v for k, v in result.items() if k != "epoch"}, 1)
    assert in_process.model.training  # train mode restored


def test_evaluate_reports_open_clips_val_names_too(in_process):
    """Catches dashboards written for open_clip finding nothing: open_clip_train's val/clip_val_loss,
    val/image_to_text_R@1, ... must be reported beside this project's eval/ names, with the same values."""
    result = in_process.result
    prefix, values, step = in_process.tb.calls[1]
    assert (prefix, step) == ("val", 1)
    assert values["clip_val_loss"] == result["val/clip_loss"]
    assert {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)} < set(values)
    assert values["text_to_image_R@5"] == result["val/text_to_image_R@5"]
    assert values["epoch"] == 1 and values["num_samples"] == 6  # the 6 unique validation pairs


def test_val_set_is_deduplicated_by_key(in_process, tiny):
    model, _, _ = tiny
    images, tokens = in_process.unique
    settings = EvalSettings(torch.device("cpu"), "fp32", BATCH)
    with evaluation.eval_mode(model):
        expected = pair_metrics(encode_images(model, [images], settings), encode_texts(model, tokens, settings),
                                tokens, model.logit_scale.exp().item())
    got = {k.removeprefix("val/"): v for k, v in in_process.result.items() if k.startswith("val/")}
    assert got == pytest.approx(expected)


def test_evaluate_only_when_due_and_only_on_rank_0(tiny, tmp_path, small_builtin):
    model, preprocess, tokenizer = tiny
    not_due = make_args(zeroshot_frequency=2, val_frequency=3, epochs=4)
    assert evaluate(model, {}, 1, not_due, tokenizer, preprocess, None, str(tmp_path)) == {}
    assert evaluate(model, {}, 1, make_args(is_master=False, rank=1), tokenizer, preprocess, None, str(tmp_path)) == {}
    assert not os.path.exists(tmp_path / "checkpoints" / "results.jsonl")


def save_run(model, run_dir):
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    ckpt = {"epoch": 1, "name": "x", "state_dict": model.state_dict()}
    for name in ("epoch_1.pt", "epoch_latest.pt"):
        torch.save(ckpt, os.path.join(run_dir, "checkpoints", name))
    with open(os.path.join(run_dir, "params.txt"), "w") as f:
        f.write(f"batch_size: 64\nmodel: {ARCH}\nsynthetic_seed: 0\n")


def make_imagefolder(root):
    for cls, colour in (("dark_red", "darkred"), ("sky_blue", "skyblue"), ("green", "green")):
        os.makedirs(os.path.join(root, cls))
        for i in range(2):
            Image.new("RGB", (40, 40), colour).save(os.path.join(root, cls, f"{i}.png"))
    return root


def read_lines(run_dir):
    with open(os.path.join(run_dir, "eval_results", "epoch_1_builtin_eval_results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_standalone_evaluator_matches_in_process(in_process, tiny, tmp_path, small_builtin, capsys):
    run_dir = str(tmp_path / "run")
    save_run(in_process.model, run_dir)
    builtin = {k: v for k, v in in_process.result.items() if k.startswith("builtin/")}
    folder = make_imagefolder(str(tmp_path / "folder"))

    by_default = evaluate_main(["--train_output_dir", run_dir, "--batch_size", str(BATCH), "--imagenet_val", folder,
                                "--templates", "simple", "--workers", "0"])
    assert {k: v for k, v in by_default.items() if k.startswith("builtin/")} == pytest.approx(builtin, abs=1e-6)
    assert set(by_default) - set(builtin) == {"imagenet/top1"}  # 3 classes: no top5
    lines = read_lines(run_dir)
    assert {f"{line['key']}/{m}": v for line in lines for m, v in line["metrics"].items()
            if m != "main_metric"} == by_default
    assert {line["key"] for line in lines} == {"builtin", "builtin/retrieval", "imagenet"} | {
        f"builtin/{t}" for t in TASKS}
    latest = os.path.abspath(os.path.join(run_dir, "checkpoints", "epoch_latest.pt"))
    with open(os.path.join(run_dir, "info.pkl"), "rb") as f:
        assert pickle.load(f) == {"scale_config": {"model": ARCH}, "checkpoint": latest}

    os.remove(os.path.join(run_dir, "eval_results", "epoch_1_builtin_eval_results.jsonl"))
    by_epoch = evaluate_main(["--train_output_dir", run_dir, "--epoch", "1", "--batch-size", str(BATCH)])
    assert by_epoch == pytest.approx(builtin, abs=1e-6)
    assert len(read_lines(run_dir)) == len(TASKS) + 2
    assert "builtin/colour" in capsys.readouterr().out


def test_standalone_evaluator_leaves_the_datacomp_forks_results_alone(in_process, tmp_path, small_builtin):
    """Catches our evaluator overwriting eval_results/epoch_N_eval_results.jsonl, the DataComp fork's file
    (it used to write that very name with mode "w", erasing the fork's ImageNet and MSCOCO lines)."""
    run_dir = str(tmp_path / "run")
    save_run(in_process.model, run_dir)
    fork_file = os.path.join(run_dir, "eval_results", "epoch_1_eval_results.jsonl")
    os.makedirs(os.path.dirname(fork_file))
    fork_lines = '{"key": "imagenet1k", "dataset": "ImageNet 1k", "metrics": {"acc1": 0.5}}\n'
    with open(fork_file, "w") as f:
        f.write(fork_lines)
    evaluate_main(["--train_output_dir", run_dir, "--epoch", "1", "--batch-size", str(BATCH), "--workers", "0"])
    with open(fork_file) as f:
        assert f.read() == fork_lines
    assert read_lines(run_dir)  # ours went to a file of its own


def test_checkpoint_resolution(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path))
    for name in ("epoch_2.pt", "epoch_10.pt", "epoch_9.pt", "iter_500.pt"):
        (ckpt / name).touch()
    assert resolve_checkpoint(str(tmp_path)).endswith("epoch_10.pt")  # numeric, not lexical
    assert resolve_checkpoint(str(tmp_path), iteration=500).endswith("iter_500.pt")
    with pytest.raises(FileNotFoundError, match="epoch_10.pt"):
        resolve_checkpoint(str(tmp_path), epoch=3)
    (ckpt / "epoch_latest.pt").touch()
    assert resolve_checkpoint(str(tmp_path)).endswith("epoch_latest.pt")


def test_standalone_needs_an_architecture(tmp_path):
    with pytest.raises(SystemExit):
        evaluate_main(["--train_output_dir", str(tmp_path)])


def test_info_pkl(tmp_path):
    path = write_info_pkl(str(tmp_path), "ViT-B-32", "ck/epoch_3.pt")
    with open(path, "rb") as f:
        assert pickle.load(f) == {"scale_config": {"model": "ViT-B-32"}, "checkpoint": os.path.abspath("ck/epoch_3.pt")}


def test_group_lines_main_metrics():
    lines = group_lines({"builtin/colour/top1": 0.5, "builtin/colour/top5": 0.9, "builtin/mean_top1": 0.4,
                         "builtin/retrieval/image_to_text_R@1": 0.2, "builtin/retrieval/text_to_image_R@1": 0.4})
    mains = {line["key"]: line["metrics"]["main_metric"] for line in lines}
    assert mains == pytest.approx({"builtin/colour": 0.5, "builtin": 0.4, "builtin/retrieval": 0.3})


# ------------------------------------------------------------------------------- ImageFolder

def test_imagefolder_classnames(tmp_path):
    assert imagefolder_classnames(str(tmp_path), ["dark_red", "sky"]) == ["dark red", "sky"]
    wnids = [f"n{i:08d}" for i in range(1000)]
    names = imagefolder_classnames(str(tmp_path), wnids)
    assert names[:2] == ["tench", "goldfish"]
    (tmp_path / "classnames.txt").write_text("crimson\nazure\n")
    assert imagefolder_classnames(str(tmp_path), ["dark_red", "sky"]) == ["crimson", "azure"]
    with pytest.raises(ValueError, match="2 names for 3"):
        imagefolder_classnames(str(tmp_path), ["a", "b", "c"])


def test_imagefolder_zero_shot(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    folder = make_imagefolder(str(tmp_path / "folder"))
    seen = []
    with evaluation.eval_mode(model):
        result = evaluate_imagefolder(model, tokenizer, preprocess, folder,
                                      EvalSettings(torch.device("cpu"), "fp32", 4), ["a photo of {}."], seen.append)
    assert set(result) == {"top1"} and 0.0 <= result["top1"] <= 1.0
    assert sum(seen) == 6


# ------------------------------------------------------------------------ sharded validation

class FakeCLIP(torch.nn.Module):
    """Embeds an image as its first pixels and a text as its first tokens."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)

    def encode_image(self, images, normalize=False):
        return images.flatten(1)[:, :2]

    def encode_text(self, tokens, normalize=False):
        return tokens[:, :2].float()


def _gather_worker(rank, world_size, port):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # rank 0 holds keys 2, 0 and a padding repeat of 2; rank 1 has no batch at all
        batches = [(torch.tensor([[2.0, 2.0], [0.0, 0.0], [2.0, 2.0]]), torch.tensor([[12, 12], [10, 10], [12, 12]]),
                    torch.tensor([2, 0, 2]))] if rank == 0 else []
        settings = EvalSettings(torch.device("cpu"))
        image_emb, text_emb, tokens, keys = evaluation.gather_pairs(FakeCLIP(), batches, settings)
        assert keys.tolist() == [0, 2] and image_emb.tolist() == [[0, 0], [2, 2]]
        assert tokens.tolist() == [[10, 10], [12, 12]] and text_emb.tolist() == [[10, 10], [12, 12]]
        mine = torch.arange(6.0).view(3, 2) if rank == 0 else torch.empty(0, 0)  # rank 1 has no batch
        assert evaluation._gather_rows(mine).tolist() == [[0, 1], [2, 3], [4, 5]]
        keys = torch.tensor([4, 0, 2]) if rank == 0 else torch.tensor([1, 3, 4])  # 4: padding repeat
        gathered = evaluation._gather_rows(keys)
        assert gathered.tolist() == [4, 0, 2, 1, 3, 4]
        assert gathered[unique_by_key(gathered)].tolist() == [0, 1, 2, 3, 4]
    finally:
        dist.destroy_process_group()


def test_gather_rows_over_two_gloo_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imported modules (spawn re-imports open_clip: ~10 s)
    torch.multiprocessing.start_processes(_gather_worker, args=(2, port), nprocs=2, start_method="fork")


def test_open_clip_imagenet_names():
    """Catches zero-shot ImageNet results missing under open_clip's val/imagenet-zeroshot-val-top1/top5."""
    from training.eval.open_clip_names import open_clip_val_names

    assert open_clip_val_names({"imagenet/top1": 0.5, "imagenet/top5": 0.9, "builtin/mean_top1": 0.3}, 2) == {
        "imagenet-zeroshot-val-top1": 0.5, "imagenet-zeroshot-val-top5": 0.9, "epoch": 2}
    assert open_clip_val_names({"builtin/mean_top1": 0.3}, 2) == {}
