"""training.bench.cli: a smoke run of every part at tiny sizes (--quick plus smaller overrides), and its pieces."""
import json
import math
import os

import pytest
import torch

import training.eval.evaluation as evaluation
from training.bench import cli as bench, cost as bench_cost, memory as bench_memory, train as bench_train
from training.bench.common import markdown_table, method_spec, quantile

TINY = ["--quick", "--workers", "0", "--no-memory", "--no-estimate",
        "--cost-batch", "8", "--cost-warmup", "1", "--cost-repeats", "2", "--cost-data-batches", "1",
        "--cost-methods", "openclip,neuclip", "--npn-protos", "8",
        "--error-methods", "neuclip", "--error-batches", "4,8", "--error-n", "8", "--error-samples", "80",
        "--error-checkpoints", "2", "--error-reference", "32",
        "--quality-methods", "openclip", "--quality-batch", "8", "--quality-n", "16", "--quality-samples", "16"]


@pytest.fixture
def small_builtin_eval(monkeypatch):
    """The built-in evaluation on 20 images per task instead of 500: the smoke test checks plumbing."""
    monkeypatch.setattr(evaluation, "BUILTIN_N_PER_TASK", 20)
    monkeypatch.setattr(evaluation, "BUILTIN_RETRIEVAL_N", 20)


@pytest.fixture
def one_thread():
    """--threads 1 (the default, said explicitly); the test session's own setting comes back afterwards."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def test_quick_report_has_every_part(tmp_path, small_builtin_eval, one_thread):
    out = tmp_path / "bench"
    result = bench.main(["--out", str(out), *TINY, *one_thread])
    report = (out / "report.md").read_text()

    # header: command, commit, versions, machine
    assert report.startswith("# NeuCLIP benchmark report")
    for needle in ("- Command: `PYTHONPATH=src python -m training.bench --out", "- Git commit: `",
                   f"torch {torch.__version__}", "- Machine: ", "GPU: ", "--quick: smoke-test sizes"):
        assert needle in report, needle
    for title in bench.PART_TITLES.values():
        assert f"## {title}" in report, title

    # part 1: every method timed, ratios to OpenCLIP, the target stated, comm 0 on one process
    cost = json.loads((out / "cost.json").read_text())
    assert set(cost["summary"]) == {"openclip", "neuclip-m4096", "neuclip-m8"}
    assert cost["summary"]["openclip"]["ratio"]["median"] == pytest.approx(1.0)
    for key, entry in cost["summary"].items():
        assert entry["total"]["median"] > 0, key
        assert entry["comm"]["median"] == 0, key
        assert len(cost["raw"][key]) == 2
    assert cost["summary"]["neuclip-m4096"]["npn_inner"]["median"] > 0
    assert "Target (NeuCLIP step ≤ 1.05× OpenCLIP's" in report
    assert "*comm* is 0 by construction" in report
    neuclip_state = next(r for r in cost["state"] if r["key"] == "neuclip-m4096" and r["dim"] == 512)
    assert neuclip_state["per_sample_bytes"] == 0 and neuclip_state["formula_matches_allocated"]
    assert (out / "cost_profile_neuclip-m4096.txt").read_text().strip()

    # part 2: every setting has a finite error at both checkpoints
    error = json.loads((out / "error.json").read_text())
    assert len(error["runs"]) == 4
    for run in error["runs"]:
        assert [r["step"] for r in run["scheduled"]] == run["steps"], run["setting"]
        assert all(math.isfinite(r["est_err/mean"]) for r in run["scheduled"])
        assert not run["problems"]
        assert not any(name.endswith(".pt") for name in os.listdir(os.path.join(run["run_dir"], "checkpoints")))
    assert [r["steps"] for r in error["runs"]] == [[10, 20], [5, 10], [10, 20], [5, 10]]
    assert "Missing values" not in report

    # part 3: the evaluation came back
    quality = json.loads((out / "quality.json").read_text())
    assert quality["runs"][0]["metrics"]["builtin/mean_top1"] >= 0
    assert "| OpenCLIP |" in report.split("## 3.")[1]

    # part 4: skipped on a machine without CUDA, with a line saying so
    if not torch.cuda.is_available():
        assert "Skipped: no CUDA device" in report
    for name in ("cost_step_time.png", "cost_state_size.png", "error_bars.png", "error_curves.png", "quality.png"):
        assert (out / name).stat().st_size > 1000, name
    assert result["report"] == str(out / "report.md")


def test_bad_sizes_fail_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_opts(["--out", str(tmp_path), "--parts", "error", "--error-batches", "48,64", "--error-n", "100"])
    with pytest.raises(SystemExit):
        bench.parse_opts(["--out", str(tmp_path), "--parts", "nonsense"])
    opts = bench.parse_opts(["--out", str(tmp_path), "--quick"])
    assert opts.error_batches == [16, 32] and opts.seeds == [0]


def test_state_grows_with_n_only_for_per_sample_estimators():
    specs = [method_spec("openclip"), method_spec("fastclip"), method_spec("neuclip", protos=16, key="neuclip")]
    rows = {r["key"]: r for r in bench_memory.state_sizes(specs, [8], [100, 1000], [10 ** 8])}
    assert rows["openclip"]["sizes"]["100000000"]["bytes"] == 0
    fast = rows["fastclip"]
    assert fast["per_sample_bytes"] > 0 and fast["formula_matches_allocated"]
    assert fast["sizes"]["100000000"]["bytes"] == fast["fixed_bytes"] + 10 ** 8 * fast["per_sample_bytes"]
    assert fast["sizes"]["100000000"]["how"] == "computed"
    neu = rows["neuclip"]
    assert neu["sizes"]["100"]["bytes"] == neu["sizes"]["100000000"]["bytes"] > 16 * 8 * 4


def test_paired_ratios_and_phase_remainder():
    def step(total, **phases):
        return {**dict.fromkeys(bench_cost.PHASES, 0.0), **phases, "total": total, "npn_inner": math.nan}
    results = {"a": [step(1.0, forward=0.5), step(2.0, forward=1.0), step(1.0, forward=0.5)],
               "b": [step(2.0, forward=1.0, before=0.5), step(4.0, forward=2.0), step(3.0, forward=1.0)]}
    summary = bench_cost.summarize(results, "a")
    assert summary["a"]["ratio"]["median"] == 1.0
    assert summary["b"]["ratio"]["median"] == 2.0          # per-round ratios 2, 2, 3
    assert summary["b"]["other_median"] == pytest.approx(2.0)  # per-step remainders 0.5, 2, 2
    assert summary["b"]["npn_inner"] is None
    assert quantile([1, 2, 3, 4], 0.25) == 1.75
    assert markdown_table(["x"], [["1"]]).splitlines()[1] == "| --- |"


def test_finished_runs_are_reused(tmp_path, monkeypatch):
    calls = []

    def fake_main(flags):
        calls.append(flags)
        os.makedirs(tmp_path / "run" / "checkpoints", exist_ok=True)
        (tmp_path / "run" / "checkpoints" / "iter_1.pt").write_bytes(b"x")
        return {"step": 1, "skipped_nonfinite": 0, "history": [], "results": {}}

    monkeypatch.setattr("training.main.main", fake_main)
    extract = lambda run_dir, summary: {"value": 7}  # noqa: E731
    first = bench_train.run_once(["--a"], str(tmp_path / "run"), True, extract, lambda m: None)
    second = bench_train.run_once(["--a"], str(tmp_path / "run"), True, extract, lambda m: None)
    assert first["value"] == second["value"] == 7 and len(calls) == 1
    assert not (tmp_path / "run" / "checkpoints" / "iter_1.pt").exists()  # checkpoints dropped once read
    bench_train.run_once(["--b"], str(tmp_path / "run"), True, extract, lambda m: None)
    assert len(calls) == 2


def test_memory_probe_reports_a_peak():
    spec = method_spec("openclip")
    result = bench_memory.memory_probe({"model": "neuclip-tiny", "batch": 4, "batches": 1, "steps": 1, "threads": 0,
                                      "spec": {"key": spec.key, "family": spec.family, "label": spec.label,
                                               "flags": list(spec.flags)}})
    assert result["rss_after"] >= result["rss_before"] > 0 and result["delta"] >= 0


def _error_run(method, batch, n, values):
    label = {"openclip": "OpenCLIP", "fastclip": "FastCLIP-v3", "neuclip": "NeuCLIP (m=8, T_u=10)"}[method]
    return {"method": method, "label": label, "batch": batch, "n": n,
            "scheduled": [{"est_err/mean": v} for v in values]}


def test_error_targets_are_judged_from_the_numbers():
    """NeuCLIP lowest everywhere and flattest in batch, but not in data size: the verdicts must say exactly that."""
    from training.bench.targets import error_target_lines, growth, error_cells
    table = {"openclip": {(64, 10): 4.0, (128, 10): 1.0, (64, 100): 4.0, (128, 100): 1.0},
             "fastclip": {(64, 10): 2.0, (128, 10): 1.0, (64, 100): 2.0, (128, 100): 1.0},
             "neuclip": {(64, 10): 0.3, (128, 10): 0.2, (64, 100): 0.6, (128, 100): 0.4}}
    runs = [_error_run(m, b, n, [v, v]) for m, cells in table.items() for (b, n), v in cells.items()]
    data = {"methods": list(table), "runs": runs}
    by_batch, by_data = growth(error_cells(runs), "neuclip", [64, 128], [10, 100], 0)
    assert by_batch == pytest.approx(1.5) and by_data == pytest.approx(2.0)
    text = "\n".join(error_target_lines(data))
    assert "lowest of the methods (mean): met, in 4 of 4" in text
    assert "grows least when the batch halves (128 → 64) (mean): met" in text
    assert "grows least when the data grows 10× (10 → 100) (mean): MISSED" in text


def test_quality_target_uses_paired_seed_differences():
    from training.bench.targets import quality_target_lines
    acc = {"openclip": [0.50, 0.52, 0.51], "fastclip": [0.51, 0.53, 0.52], "neuclip": [0.52, 0.54, 0.53]}
    runs = [{"method": m, "seed": s, "metrics": {"builtin/mean_top1": v}} for m, vs in acc.items()
            for s, v in enumerate(vs)]
    text = "\n".join(quality_target_lines({"methods": list(acc), "runs": runs, "batch": 64}))
    assert "at batch 64): met" in text
    # Every seed improves by exactly 1 point: sd 0, so the paired difference is resolved.
    assert "NeuCLIP − FastCLIP-v3, paired by seed: 1.00 points" in text and "larger than twice" in text
    runs[-1]["metrics"]["builtin/mean_top1"] = 0.40  # one bad NeuCLIP seed
    assert "MISSED" in "\n".join(quality_target_lines({"methods": list(acc), "runs": runs, "batch": 64}))


def test_input_part_compares_both_pipelines_per_loader_core(tmp_path, one_thread):
    """Catches the input part timing one pipeline twice (or none), counting the main process instead of the
    loader worker, or losing images: both pipelines run on the same photo shards, every round sees every
    sample, the worker's CPU time is measured, and the report states the ratio and the target."""
    out = tmp_path / "bench"
    bench.main(["--out", str(out), "--parts", "input", "--quick", "--no-estimate", "--input-sizes", "96",
                "--input-samples", "16", "--input-rounds", "2", "--input-batch", "4", *one_thread])
    data = json.loads((out / "input.json").read_text())
    size = data["sizes"]["96"]
    assert size["jpeg_kb"] > 0 and len(size["rounds"]) == 2
    for rnd in size["rounds"]:
        assert rnd["open_clip"]["batch_dtype"] == "float32" and rnd["fast"]["batch_dtype"] == "uint8"
        assert rnd["device"]["batch_dtype"] == "uint8" and rnd["device"]["batch_bytes"] < rnd["fast"]["batch_bytes"]
        for pipeline in ("open_clip", "fast", "device"):
            assert rnd[pipeline]["images"] == 16 and rnd[pipeline]["worker_cpu_s"] > 0
        assert rnd["ratio"] == pytest.approx(rnd["fast"]["images_per_core_s"] / rnd["open_clip"]["images_per_core_s"])
    assert set(size["decoders"]) == {"PIL (full size)", "PIL draft (DCT-scaled)", "torchvision decode_jpeg"}
    report = (out / "report.md").read_text()
    assert "## Input pipeline" in report and "| 96x72 |" in report and ">= 2.5x" in report
    # End to end (catches the loader-bound comparison running this trainer in place of open_clip_train, one
    # pipeline under both names, or a ratio taken against the wrong run): three trainings, each its own process
    # and run folder, the peer's written by open_clip_train (no `input_pipeline` in its params), ours by this
    # trainer with the pipeline its name says.
    e2e = data["end_to_end"]
    assert set(e2e["runs"]) == {"peer", "open_clip", "fast"} and e2e["rounds"] == 1
    runs = out / "input_e2e" / "runs"
    assert "input_pipeline" not in (runs / "peer-r0" / "params.txt").read_text()
    for key in ("open_clip", "fast"):
        assert f"input_pipeline: {key}" in (runs / f"{key}-r0" / "params.txt").read_text()
        (run,), (peer,) = e2e["runs"][key], e2e["runs"]["peer"]
        assert e2e["summary"][key]["vs_peer"]["median"] == pytest.approx(run["samples_per_s"] / peer["samples_per_s"])
        assert run["samples_per_s"] > 0
    assert "## Input pipeline end to end" in report and ">= 2x open_clip_train" in report


def test_regime_part_writes_tables_and_both_figure_rows_at_matched_epochs(tmp_path, one_thread):
    """Catches the regime part's report or figure failing on a method without a relative error (OpenCLIP's is the
    mini-batch estimate itself), --regime-epochs not reaching the runs through the command line, and --reuse
    retraining runs it already has."""
    out = tmp_path / "regime"
    argv = ["--out", str(out), "--parts", "regime", "--quick", "--no-estimate", "--regime-epochs", "1",
            "--regime-arms", "fixed", "--regime-methods", "openclip,neuclip", "--no-regime-calibration", *one_thread]
    bench.main(argv)
    data = json.loads((out / "regime.json").read_text())
    assert data["sizes"]["epochs"] == 1.0
    assert sorted((r["ratio"], r["method"], r["steps"]) for r in data["runs"]) == [
        (10.0, "neuclip", 10), (10.0, "openclip", 10), (30.0, "neuclip", 30), (30.0, "openclip", 30)]
    report = (out / "report.md").read_text()
    assert "1 epochs at every n/B" in report and "relative to the mini-batch estimate" in report
    assert (out / "regime_error.png").stat().st_size > 10_000
    bench.main(argv + ["--reuse"])  # timings would differ in a run trained again
    assert json.loads((out / "regime.json").read_text())["runs"] == data["runs"]
