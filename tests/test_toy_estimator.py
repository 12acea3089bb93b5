"""A new normalizer estimator is one registry entry: this file defines one and runs the real trainer with it.

The toy, "exact", is the exact full-data normalizer of a small data set: it keeps the latest embedding of every
sample key it has seen (one table per modality, rows indexed by key) and estimates each anchor's
log-normalizer against ALL stored embeddings of the other modality, not just the batch's:
    a_i = log(ε + 1/(n−1) Σ_{j seen, j≠i} exp((e_i·f_j − e_i·f_i)·λ_i)),
with the batch's own rows taken from the current features. Its one flag, --exact_table_size (rows of the
tables; 0: --data_size), is resume-fixed. Nothing under src/ names it.
"""
import json
import math

import open_clip
import pytest
import torch

import training  # noqa: F401  (registers neuclip-tiny)
from contrastive import registry
from contrastive.estimator_interface import Estimate, NormalizerEstimator
from contrastive.registry import ESTIMATOR, Entry, both_spellings
from training.eval import diagnostics as diag_cli
from training.main import main
from training.params import default_run_name, parse_args

NAME = "exact"
SAMPLES, BATCH = 64, 16


class ExactNormalizers(NormalizerEstimator):
    uses_per_sample_state = True

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.register_buffer("image_table", torch.zeros(rows, dim))
        self.register_buffer("text_table", torch.zeros(rows, dim))
        self.register_buffer("seen", torch.zeros(rows, dtype=torch.bool))
        self.predict_calls = 0
        self.tables_at_epoch_start = []  # (epoch, image table, text table, seen): what a resume restored

    def on_epoch_start(self, epoch: int) -> None:
        self.tables_at_epoch_start.append((epoch, self.image_table.clone(), self.text_table.clone(),
                                           self.seen.clone()))

    def estimate(self, feats, stats) -> Estimate:
        keys = feats.all_keys.long()
        self.image_table[keys] = feats.all_image.detach().float()
        self.text_table[keys] = feats.all_text.detach().float()
        self.seen[keys] = True
        return Estimate(*self._log_normalizers(feats, stats, self.image_table, self.text_table, self.seen))

    def predict(self, feats, stats):
        self.predict_calls += 1
        keys = feats.all_keys.long()
        image_table, text_table, seen = self.image_table.clone(), self.text_table.clone(), self.seen.clone()
        image_table[keys], text_table[keys], seen[keys] = feats.all_image.float(), feats.all_text.float(), True
        return self._log_normalizers(feats, stats, image_table, text_table, seen)

    @staticmethod
    def _log_normalizers(feats, stats, image_table, text_table, seen):
        keys, seen_keys = feats.all_keys.long(), seen.nonzero().squeeze(1)
        own = keys[:, None] == seen_keys[None, :]     # each anchor's own key among the stored columns
        n = seen_keys.numel()

        def side(anchors, positives, columns, scale):
            lam = scale if scale.dim() == 0 else scale[:, None]
            logits = (anchors @ columns.T - (anchors * positives).sum(-1, keepdim=True)) * lam
            log_g = logits.masked_fill(own, -math.inf).logsumexp(dim=1) - math.log(n - 1)
            return torch.logaddexp(log_g, torch.full_like(log_g, math.log(stats.eps)))

        image, text = feats.all_image.float(), feats.all_text.float()
        return (side(image, text, text_table[seen_keys], stats.scale_img),
                side(text, image, image_table[seen_keys], stats.scale_txt))


BUILT: list[ExactNormalizers] = []


def add_exact_arguments(group) -> None:
    group.add_argument(*both_spellings("exact_table_size"), dest="exact_table_size", type=int, default=0,
                       help="rows of the exact estimator's embedding tables (0: --data_size)")


def validate_exact(args) -> None:
    if args.exact_table_size < 0:
        raise ValueError(f"--exact_table_size must be ≥ 0 (0: --data_size), got {args.exact_table_size}")


def exact_bytes_per_sample(args) -> int:
    return 2 * 4 * open_clip.get_model_config(args.model)["embed_dim"] + 1  # two fp32 rows and a bool


def build_exact(args, embed_dim: int) -> ExactNormalizers:
    BUILT.append(ExactNormalizers(args.exact_table_size or args.data_size, embed_dim))
    return BUILT[-1]


@pytest.fixture
def exact_estimator():
    BUILT.clear()
    registry.register(Entry(NAME, ESTIMATOR, build_exact, add_arguments=add_exact_arguments,
                            validate=validate_exact, per_sample_state_bytes=exact_bytes_per_sample,
                            resume_fixed_flags={"exact_table_size": "the embedding tables are not resized"},
                            flag_group="exact normalizers (test)"))
    try:
        yield
    finally:
        registry.unregister(ESTIMATOR, NAME)
        BUILT.clear()


def flags(tmp_path, *extra):
    return ["--logs", str(tmp_path), "--name", "toy", "--model", "neuclip-tiny", "--batch-size", str(BATCH),
            "--synthetic-num-samples", str(SAMPLES), "--workers", "0", "--warmup", "2", "--lr", "1e-3",
            "--precision", "fp32", "--seed", "3", "--log-every-n-steps", "1", "--report-to", "",
            "--zeroshot-frequency", "1", "--val-frequency", "0", "--builtin-eval",
            "--est-err-every", "2", "--est-err-samples", "32",
            "--fastclip", "--estimator", NAME, "--exact-table-size", "0", "--epochs", "2", *extra]


def test_a_toy_estimator_in_one_file_trains_checkpoints_resumes_and_evaluates(tmp_path, exact_estimator):
    """Bugs caught: a trainer file that still hard-codes the estimator list (--estimator choices fixed in params,
    an estimator's flags written in params); per-sample state sized from estimator names (the toy's table would
    go unchecked, --data_size not required); naming or the start-up line crashing on an unknown estimator;
    an estimator's state missing from checkpoints or not restored on resume; resume checks that ignore an
    entry's resume-fixed flags (here the tables would load silently under another --exact_table_size); the
    estimation-error diagnostic (in training and standalone) not reading the method's own estimates."""
    run_dir = tmp_path / "toy"
    first = main(flags(tmp_path, "--stop_epochs", "1"))
    assert first["step"] == SAMPLES // BATCH
    assert all(math.isfinite(terms["loss"]) for _, terms in first["history"])
    assert "(gcl/exact)" in (run_dir / "out.log").read_text()

    ckpt = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert ckpt["size_flags"] == {"model": "neuclip-tiny", "estimator": NAME, "npn_num_protos": "4096",
                                  "exact_table_size": "0"}
    saved = ckpt["method"]
    assert saved["estimator.seen"].all()  # one epoch of the synthetic set shows every key once
    assert saved["estimator.image_table"].shape == (SAMPLES, 64) and saved["estimator.image_table"].norm(dim=1).gt(0).all()

    second = main(flags(tmp_path))  # the same --name: the run folder resumes by itself
    assert [step for step, _ in second["history"]] == list(range(SAMPLES // BATCH + 1, 2 * SAMPLES // BATCH + 1))
    resumed = BUILT[-1]
    epoch, image_table, text_table, seen = resumed.tables_at_epoch_start[0]
    assert epoch == 1
    assert torch.equal(image_table, saved["estimator.image_table"])
    assert torch.equal(text_table, saved["estimator.text_table"]) and torch.equal(seen, saved["estimator.seen"])
    assert resumed.predict_calls > 0  # the in-training diagnostic asked the toy

    lines = [json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    builtin = [line for line in lines if "builtin/mean_top1" in line]
    est_err = [line for line in lines if "est_err/mean" in line]
    assert sorted(line["epoch"] for line in builtin) == [1, 2]
    assert est_err and all(math.isfinite(line["est_err/mean"]) for line in est_err)
    assert {line["step"] for line in est_err} >= {2, 4, 6, 8}

    record = diag_cli.main(["--train_output_dir", str(run_dir)])  # standalone: params.txt carries the toy's flag
    assert record["method"] == "gcl" and record["estimator"] == NAME and math.isfinite(record["est_err/mean"])

    with pytest.raises(ValueError) as refused:
        main(flags(tmp_path, "--exact_table_size", str(SAMPLES), "--epochs", "3"))
    message = str(refused.value)
    assert "\n" not in message and "--exact_table_size 0" in message and f"--exact_table_size {SAMPLES}" in message


def test_the_toy_names_runs_and_its_rules_reach_the_command_line(exact_estimator, capsys):
    """Bugs caught: default run names built from a fixed method/estimator list (crash or wrong tag for a new
    estimator); an entry's validate not run by parse_args (or not turned into a usage error, exit 2)."""
    args = parse_args(["--fastclip", "--estimator", NAME, "--model", "neuclip-tiny"])
    assert args.uses_per_sample_state and args.estimator == NAME
    assert f"-{NAME}-model_neuclip-tiny-" in default_run_name(args)
    with pytest.raises(SystemExit) as usage:
        parse_args(["--fastclip", "--estimator", NAME, "--exact_table_size", "-1"])
    assert usage.value.code == 2
    assert "--exact_table_size must be ≥ 0 (0: --data_size), got -1" in capsys.readouterr().err
