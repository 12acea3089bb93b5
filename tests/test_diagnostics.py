"""The normalizer estimation-error diagnostic (training.eval.estimation_error): the truth, every method's estimate,
reporting, distributed safety and the standalone path on a run folder."""
import json
import logging
import math
import os
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

import training  # noqa: F401  (registers neuclip-tiny)
from contrastive import Features, build_method, comm, core
from training.eval import diagnostics as diag_cli, estimation_error as diag
from training.eval.evaluation import EvalSettings
from training.main import main as train_main
from training.params import parse_args
from training.data.synthetic.samples import get_sample
from training.data.synthetic.shards import write_shards

R = 48          # reference samples
BATCH = 16      # training global batch in these tests
SYNTHETIC = 96  # training set size
METHOD_FLAGS = {
    "openclip": [],
    "siglip": ["--siglip"],
    "minibatch": ["--fastclip", "--estimator", "minibatch"],
    "fastclip": ["--fastclip"],
    "fastclip-v2": ["--fastclip", "--temperature_scheme", "individual_learnable"],
    "neuclip": ["--fastclip", "--npn", "--npn_num_protos", "16", "--npn_repetition", "2"],
    "amorlip": ["--fastclip", "--amorlip", "--npn_repetition", "2"],
}


def make_args(*flags, batch_size=BATCH):
    args = parse_args(["--batch-size", str(batch_size), "--precision", "fp32", "--synthetic-num-samples",
                       str(SYNTHETIC), "--data_size", str(SYNTHETIC), "--fastclip_eps", "1e-6", *flags])
    args.rank, args.world_size, args.is_master, args.device = 0, 1, True, "cpu"
    args.dataset_type = "synthetic"
    return args


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("neuclip-tiny")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer("neuclip-tiny")


@pytest.fixture(scope="module")
def reference(tiny):
    model, preprocess, tokenizer = tiny
    return diag.reference_set(make_args(), preprocess, tokenizer, R)


@pytest.fixture(scope="module")
def embeddings(tiny, reference):
    model = tiny[0]
    return diag.encode_reference(model, reference, EvalSettings(torch.device("cpu"), "fp32", BATCH))


def fresh_method(model, name, **arg_overrides):
    args = make_args(*METHOD_FLAGS[name])
    vars(args).update(arg_overrides)
    with torch.no_grad():
        saved = model.logit_scale.clone()
    method = build_method(args.method, args, model)
    with torch.no_grad():  # the gcl temperature schemes re-initialise the shared model's τ: keep it
        model.logit_scale.copy_(saved)
    return method, args


def truth(embeddings, scale_img, scale_txt, eps=1e-6):
    image, text = embeddings
    return core.batch_log_normalizers(image @ text.T, scale_img, scale_txt, eps)


def mse(a, b):
    return (a.double() - b.double()).square().mean().item()


# ------------------------------------------------------------------------------------------ the truth

@pytest.mark.parametrize("per_anchor", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_tiled_truth_equals_the_full_matrix(per_anchor, eps):
    g = torch.Generator().manual_seed(1)
    n, dim = 37, 16
    image = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(n, dim, generator=g), dim=1)
    if per_anchor:
        scale_img, scale_txt = (10 + 90 * torch.rand(n, generator=g) for _ in range(2))
    else:
        scale_img = scale_txt = torch.tensor(100.0)  # τ = 0.01: exp(s·λ) leaves fp32's range
    expected = core.batch_log_normalizers(image @ text.T, scale_img, scale_txt, eps)
    for block in (1, 5, 8, 37, 4096):
        got = diag.true_log_normalizers(image, text, scale_img, scale_txt, eps, block=block)
        for side_got, side_expected in zip(got, expected):
            assert torch.isfinite(side_got).all()
            torch.testing.assert_close(side_got, side_expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, batch", [(10, 3), (10, 5), (10, 10), (10, 25), (7, 1), (48, 16), (40, 16)])
def test_reference_chunks_score_every_anchor_once_in_full_batches(n, batch):
    chunks = diag.reference_chunks(n, batch)
    scored = torch.cat([rows[part] for rows, part in chunks])
    assert sorted(scored.tolist()) == list(range(n))
    for rows, _ in chunks:
        assert rows.numel() == min(batch, n) == rows.unique().numel()
    assert [r.tolist() for r, _ in chunks] == [r.tolist() for r, _ in diag.reference_chunks(n, batch)]


# --------------------------------------------------------------------------------- the estimates

@pytest.mark.parametrize("name", ["openclip", "siglip", "minibatch"])
def test_minibatch_estimate_over_the_whole_set_is_exact(tiny, reference, name):
    model = tiny[0]
    method, args = fresh_method(model, name)
    result = diag.estimation_error(model, method, reference, args, "cpu", batch_size=R)
    assert set(diag.METRIC_KEYS) <= set(result)
    for key in diag.METRIC_KEYS:
        assert result[key] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("n", [R, 40])  # 40: the last batch overlaps the one before
def test_minibatch_estimate_matches_a_hand_computation(tiny, reference, embeddings, n):
    """OpenCLIP / SigLIP (log_normalizers is None) and the gcl minibatch estimator give the same error, that
    of per-batch log(ε + g(i, B)) against log(ε + g(i, S_ref))."""
    model = tiny[0]
    subset = diag.ReferenceSet(reference.images[:n], reference.tokens[:n], reference.keys[:n])
    image, text = (e[:n] for e in embeddings)
    scale = model.logit_scale.detach().exp()
    truth_img, truth_txt = truth((image, text), scale, scale)
    est_img, est_txt = torch.empty(n), torch.empty(n)
    for rows, part in diag.reference_chunks(n, BATCH):
        a_img, a_txt = core.batch_log_normalizers(image[rows] @ text[rows].T, scale, scale, 1e-6)
        est_img[rows[part]], est_txt[rows[part]] = a_img[part], a_txt[part]
    expected_img, expected_txt = mse(est_img, truth_img), mse(est_txt, truth_txt)
    assert expected_img > 1e-4 and expected_txt > 1e-4  # batches of 16 out of 48 are not the whole set
    for name in ("openclip", "siglip", "minibatch"):
        method, args = fresh_method(model, name)
        result = diag.estimation_error(model, method, subset, args, "cpu")
        assert result["est_err/image"] == pytest.approx(expected_img, rel=1e-4)
        assert result["est_err/text"] == pytest.approx(expected_txt, rel=1e-4)
        assert result["est_err/mean"] == pytest.approx((expected_img + expected_txt) / 2, rel=1e-4)


@pytest.mark.parametrize("name", ["fastclip", "fastclip-v2"])
def test_moving_average_error_is_the_offset_squared(tiny, reference, embeddings, name):
    """u set to the true normalizers (+ a constant c in log u): the error is c², in batches of any size. For
    FastCLIP-v2 the truth must use each anchor's own τ_i, which are made to differ here."""
    model = tiny[0]
    method, args = fresh_method(model, name)
    keys = reference.keys
    if name == "fastclip-v2":
        table = method.temperature.table
        g = torch.Generator().manual_seed(2)
        table.tau_img[keys] = 0.02 + 0.2 * torch.rand(R, generator=g)
        table.tau_txt[keys] = 0.02 + 0.2 * torch.rand(R, generator=g)
        scale_img, scale_txt = 1 / table.tau_img[keys], 1 / table.tau_txt[keys]
    else:
        scale_img = scale_txt = model.logit_scale.detach().exp()
    truth_img, truth_txt = truth(embeddings, scale_img, scale_txt)
    table = method.estimator.table
    for c_img, c_txt in ((0.0, 0.0), (0.5, -0.25)):
        table.log_u_img[keys] = truth_img + c_img
        table.log_u_txt[keys] = truth_txt + c_txt
        for batch_size in (BATCH, R):
            result = diag.estimation_error(model, method, reference, args, "cpu", batch_size=batch_size)
            assert result["est_err/image"] == pytest.approx(c_img ** 2, rel=1e-5, abs=1e-9)
            assert result["est_err/text"] == pytest.approx(c_txt ** 2, rel=1e-5, abs=1e-9)
            assert result["est_err/mean"] == pytest.approx((c_img ** 2 + c_txt ** 2) / 2, rel=1e-5, abs=1e-9)
            assert result["est_bias/image"] == pytest.approx(c_img, abs=1e-5)
            assert result["est_bias/text"] == pytest.approx(c_txt, abs=1e-5)


def prepared(model, reference, embeddings, name):
    """A method whose estimator has taken one step on the reference set's first batch."""
    method, args = fresh_method(model, name)
    image, text = embeddings
    feats = Features.precomputed(image[:BATCH], text[:BATCH], model.logit_scale.detach().exp(),
                                 reference.keys[:BATCH])
    method.on_epoch_start(0)
    method.before_encoder_step(feats)
    method(feats)
    method.after_encoder_step(feats)
    return method, args


def test_npn_fitted_to_the_whole_set_scores_far_below_minibatch(tiny, reference, embeddings):
    """Bug: the diagnostic scores the network against the wrong truth (another τ, the other modality's
    normalizers, rows and columns swapped, a chunk's mini-batch values instead of the network's): an NPN
    whose T_u = 10 inner steps ran on the whole reference set (m = R prototypes, restarted from it) predicts
    that set's log-normalizers almost exactly, so its error must be far below mini-batch estimates from
    batches of 16 (measured: about 0.0005 against 0.077 here)."""
    model = tiny[0]
    method, args = fresh_method(model, "neuclip", npn_num_protos=R, npn_repetition=10)
    image, text = embeddings
    feats = Features.precomputed(image, text, model.logit_scale.detach().exp(), reference.keys)
    method.on_epoch_start(0)
    method.before_encoder_step(feats)
    method(feats)
    method.after_encoder_step(feats)
    fitted = diag.estimation_error(model, method, reference, args, "cpu")
    baseline_method, baseline_args = fresh_method(model, "minibatch")
    minibatch = diag.estimation_error(model, baseline_method, reference, baseline_args, "cpu")
    assert fitted["est_err/mean"] < minibatch["est_err/mean"] / 10, (fitted, minibatch)
    for side in ("image", "text"):  # text: 0.00025 against 0.0024 here
        assert fitted[f"est_err/{side}"] < minibatch[f"est_err/{side}"] / 5, side


@pytest.mark.parametrize("name", ["neuclip", "amorlip"])
def test_network_estimates_are_the_networks_own(tiny, reference, embeddings, name):
    """Once the NPN has been trained on a batch its estimates are its own (not the mini-batch values), do not
    depend on which batch an anchor is in, and measuring changes none of the method's state."""
    model = tiny[0]
    method, args = prepared(model, reference, embeddings, name)
    before = {k: v.clone() for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
    result = diag.estimation_error(model, method, reference, args, "cpu")
    baseline_method, baseline_args = fresh_method(model, "minibatch")
    minibatch = diag.estimation_error(model, baseline_method, reference, baseline_args, "cpu")
    assert all(math.isfinite(result[k]) and result[k] >= 0 for k in diag.METRIC_KEYS)
    assert result["est_err/mean"] != pytest.approx(minibatch["est_err/mean"], rel=1e-3)
    whole = diag.estimation_error(model, method, reference, args, "cpu", batch_size=R)
    for key in diag.METRIC_KEYS:
        assert whole[key] == pytest.approx(result[key], rel=1e-5, abs=1e-9)
    for key, value in method.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", sorted(METHOD_FLAGS))
def test_no_collective_as_rank_1_of_2(tiny, reference, embeddings, name, monkeypatch):
    """Every method is measured without entering a collective, even where a process group exists and only
    some ranks measure (here: this process claims to be rank 1 of 2 and every collective raises)."""
    model = tiny[0]
    method, args = prepared(model, reference, embeddings, name)
    expected = diag.estimation_error(model, method, reference, args, "cpu")

    def collective(*_, **__):
        raise AssertionError("the estimation error entered a collective")
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(comm, "world_size", lambda: 2)
    monkeypatch.setattr(comm, "rank", lambda: 1)
    for name_ in ("all_gather_no_grad", "all_gather_with_grad", "all_reduce_mean_"):
        monkeypatch.setattr(comm, name_, collective)
    for name_ in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
                  "all_gather_object"):
        monkeypatch.setattr(torch.distributed, name_, collective)
    assert diag.estimation_error(model, method, reference, args, "cpu") == expected


# ---------------------------------------------------------------------------------- reference sets

def test_synthetic_reference_set_is_the_first_samples_by_key(tiny, reference, caplog):
    model, preprocess, tokenizer = tiny
    assert reference.keys.tolist() == list(range(R))
    for i in (0, R - 1):
        image, caption = get_sample(0, i)
        torch.testing.assert_close(reference.images[i], preprocess(image))
        assert torch.equal(reference.tokens[i], tokenizer([caption])[0])
    with caplog.at_level(logging.WARNING):
        everything = diag.reference_set(make_args(), preprocess, tokenizer, 10 * SYNTHETIC)
    assert len(everything) == SYNTHETIC and "only 96 usable samples" in caplog.text
    with pytest.raises(ValueError, match="at least 2"):
        diag.reference_set(make_args(), preprocess, tokenizer, 1)


def test_shard_reference_set_reads_the_first_shards_in_order(tiny, tmp_path):
    model, preprocess, tokenizer = tiny
    write_shards(str(tmp_path), 20, seed=0, samples_per_shard=8)
    args = make_args("--train-data", str(tmp_path / "{00000..00002}.tar"), "--dataset-type", "auto")
    args.dataset_type = "auto"
    assert diag.training_data_kind(args) == "webdataset"
    reference = diag.reference_set(args, preprocess, tokenizer, 12)
    assert reference.keys.tolist() == list(range(12))
    assert reference.images.shape == (12, 3, 32, 32) and reference.tokens.shape == (12, 16)
    assert len(diag.reference_set(args, preprocess, tokenizer, 50)) == 20


# --------------------------------------------------------------------------------------- reporting

class RecordingTensorBoard:
    def __init__(self):
        self.calls = []

    def scalars(self, prefix, values, step):
        self.calls.append((prefix, dict(values), step))


def test_log_estimation_error_reports_to_log_tensorboard_and_results(tiny, reference, tmp_path, caplog):
    model = tiny[0]
    method, args = fresh_method(model, "fastclip")
    tb = RecordingTensorBoard()
    with caplog.at_level(logging.INFO, logger="training.eval.estimation_error"):
        record = diag.log_estimation_error(model, method, reference, args, "cpu", step=6, epoch=1.5, tb=tb,
                                           run_dir=str(tmp_path))
    metrics = {k: v for k, v in record.items() if k.startswith(("est_err/", "est_bias/"))}
    assert set(diag.METRIC_KEYS) <= set(metrics)
    assert tb.calls == [("diag", metrics, 6)]
    assert "Estimation error at step 6" in caplog.text
    lines = (tmp_path / "checkpoints" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [record]
    assert record["step"] == 6 and record["epoch"] == 1.5 and record["samples_seen"] == 6 * BATCH
    assert record["est_err_samples"] == R and record["est_err_batch"] == BATCH
    args.is_master = False
    assert diag.log_estimation_error(model, method, reference, args, "cpu", step=7, epoch=1.6) == {}
    assert diag.log_estimation_error(model, method, None, make_args(), "cpu", step=7, epoch=1.6) == {}


def test_monitor_measures_every_n_steps_and_at_epoch_ends_on_rank_0_only(tiny, monkeypatch):
    model, preprocess, tokenizer = tiny
    args = make_args("--est-err-every", "3", "--est-err-samples", "8")
    monitor = diag.EstimationErrorMonitor.from_args(args, preprocess, tokenizer, "cpu")
    assert len(monitor.reference) == 8
    assert [monitor.due(step) for step in range(1, 7)] == [False, False, True, False, False, True]
    assert monitor.due(4, epoch_end=True)
    method, _ = fresh_method(model, "minibatch")
    assert monitor.after_step(model, method, step=1, epoch=0.1) == {}
    assert monitor.after_step(model, method, step=3, epoch=0.3)["step"] == 3

    def never(*_, **__):
        raise AssertionError("only rank 0 builds the reference set")
    monkeypatch.setattr(diag, "reference_set", never)
    args.is_master = False
    other_rank = diag.EstimationErrorMonitor.from_args(args, preprocess, tokenizer, "cpu")
    assert other_rank.after_step(model, method, step=3, epoch=0.3, epoch_end=True) == {}
    off = diag.EstimationErrorMonitor.from_args(make_args(), preprocess, tokenizer, "cpu")
    assert not off.enabled and not off.due(3, epoch_end=True)
    with pytest.raises(ValueError, match="--est-err-samples"):
        diag.EstimationErrorMonitor.from_args(make_args("--est-err-every", "1", "--est-err-samples", "1"),
                                              preprocess, tokenizer, "cpu")


# -------------------------------------------------------------------------------------- standalone

def test_standalone_on_a_run_folder(tmp_path, capsys):
    flags = ["--logs", str(tmp_path), "--name", "npn", "--model", "neuclip-tiny", "--batch-size", "16",
             "--epochs", "1", "--synthetic-num-samples", "64", "--workers", "0", "--warmup", "2", "--lr", "1e-3",
             "--precision", "fp32", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
             "--fastclip", "--npn", "--npn_num_protos", "16", "--npn_repetition", "2", "--est-err-samples", "32"]
    train_main(flags)
    run_dir = str(tmp_path / "npn")

    args = diag_cli.run_args(run_dir)  # params.txt round trip: every value as main() had it
    with open(os.path.join(run_dir, "params.txt")) as f:
        for line in f:
            name, value = line.rstrip("\n").split(": ", 1)
            assert str(getattr(args, name)) == value, name
    assert args.method == "gcl" and args.estimator == "npn" and args.world_size == 1 and args.npn is True

    record = diag_cli.main(["--train_output_dir", run_dir])
    out = os.path.join(run_dir, "eval_results", "epoch_1_estimation_error.json")
    with open(out) as f:
        assert json.load(f) == record
    assert "est_err/mean" in capsys.readouterr().out
    assert record["step"] == 4 and record["samples_seen"] == 64 and record["est_err_samples"] == 32
    assert all(math.isfinite(record[k]) and record[k] >= 0 for k in diag.METRIC_KEYS)

    # the checkpoint's NPN state is what is measured: a fresh NPN gives the mini-batch estimate instead
    device = torch.device("cpu")
    checkpoint = os.path.join(run_dir, "checkpoints", "epoch_1.pt")
    args.device, args.is_master, args.rank = "cpu", True, 0
    model, method, preprocess, tokenizer, _ = diag_cli.load_run(run_dir, checkpoint, args, device)
    reference = diag.reference_set(args, preprocess, tokenizer, 32)
    fresh = build_method(args.method, args, open_clip.create_model("neuclip-tiny"))
    with_npn = diag.estimation_error(model, method, reference, args, device)
    without = diag.estimation_error(model, fresh, reference, args, device)
    assert with_npn["est_err/mean"] == pytest.approx(record["est_err/mean"], rel=1e-6)
    assert without["est_err/mean"] != pytest.approx(with_npn["est_err/mean"], rel=1e-3)


# ---------------------------------------------------------------------------------------------- plots

def test_plot_runs_reads_a_run_folder_and_draws_the_grid(tmp_path, monkeypatch):
    import matplotlib  # noqa: F401  (requirements-test.txt installs it: fail, never skip, when missing)
    import importlib.util

    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    spec = importlib.util.spec_from_file_location(
        "plot_runs", os.path.join(os.path.dirname(__file__), "..", "scripts", "plot_runs.py"))
    plot_runs = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "plot_runs", plot_runs)  # dataclasses look their module up there
    spec.loader.exec_module(plot_runs)

    run = tmp_path / "run-a"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text("batch_size: 16\nmodel: neuclip-tiny\nworld_size: 2\n")
    (run / "out.log").write_text("x | INFO | Run run-a (gcl/npn): world_size=2 steps_per_epoch=5 total_steps=10\n")
    writer = SummaryWriter(str(run / "tensorboard"))
    for step in range(1, 11):
        writer.add_scalar("train/loss", 10.0 - step, step)
        writer.add_scalar("train/logit_scale", 10.0 + step, step)
    writer.add_scalar("diag/est_err/mean", 0.5, 5)
    writer.add_scalar("diag/est_err/mean", 0.25, 10)
    writer.add_scalar("train/loss", 100.0, 10)  # a resumed run logs step 10 again: the later value wins
    writer.close()
    lines = [{"epoch": 1, "builtin/mean_top1": 0.2}, {"step": 10, "samples_seen": 320, "est_err/mean": 0.25},
             {"epoch": 2, "builtin/mean_top1": 0.3}]
    (run / "checkpoints" / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    loaded = plot_runs.load_run(str(run))
    assert loaded.label == "run-a" and loaded.global_batch == 32
    assert loaded.loss[0] == [32.0 * s for s in range(1, 11)] and loaded.loss[1][-1] == 100.0
    assert loaded.tau[1][0] == pytest.approx(1 / 11)
    assert loaded.est_err == ([160, 320], [0.5, 0.25])
    assert loaded.accuracy == ([160, 320], [0.2, 0.3])  # epoch x 5 steps x 32 samples

    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    out = tmp_path / "figures" / "runs.png"
    assert plot_runs.main([str(run), str(bare), "--out", str(out), "--title", "test"]) == str(out)
    with Image.open(out) as image:
        assert image.size[0] > 1000 and image.size[1] > 700
