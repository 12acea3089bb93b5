"""Every GPU figure in one call (scripts/gpu_check.sh): the CUDA-marked tests, then part 4 of `training.bench`
at the paper's shapes, then one report.

    PYTHONPATH=src python -m training.bench.gpu_check [--out docs/results/gpu] [--dry-run]

1. `pytest -m cuda tests/test_npn_precision.py`: the NPN's closed-form gradient vs autograd (fp32 and inside bf16
   autocast), the split-bf16 GEMMs vs fp64, the loss core on CUDA vs CPU, a 2-step NeuCLIP run with
   --precision amp_bf16 --torchcompile, and the host-sync check under torch.cuda.set_sync_debug_mode;
   `tests/test_rank_flags.py`: the preemption flags' exchange does not wait for queued GPU work (NCCL); and
   `tests/test_device_decode.py`: a mixed batch decoded by nvJPEG matches the CPU decode.
2. `python -m training.bench --parts gpu`: ViT-B/32, bf16 autocast, local batch 512, NeuCLIP m = 4096, T_u = 10,
   interleaved with OpenCLIP: samples/s, the NPN share next to the paper's Table 5 (6.03%), the NPN FLOP share
   (the limit), peak memory.
3. `python -m training.bench.gpu_decode`: `--input-pipeline device` (JPEGs decoded by nvJPEG, cropped, resized
   and normalised on the GPU) on photo-like 512x384 JPEGs in batches of 256 and 512: images/s and the main
   process's CPU seconds per image (target >= 3000 images/s at <= 1 core), and the workers' CPU cost next to
   the fast pipeline's.
Writes OUT/report.md (sections: Machine, CUDA tests, Throughput, GPU JPEG decoding, Verdict), OUT/gpu.json and
the logs. `--dry-run` runs the same steps on the CPU at tiny sizes (neuclip-tiny, batch 8, m 16, 1 + 2 rounds;
96 px JPEGs, batch 4): the CUDA tests are then skipped, and the numbers only show that the plumbing works.
Budget: well under 8 minutes on one GPU (each step has its own timeout, so a hang in one still leaves a report;
step 3's is cut to what is left of BUDGET_S).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from training.bench.common import REPO_ROOT, SRC_DIR, git_commit, machine_info
from training.bench.gpu_decode import summary_lines as decode_summary_lines
from training.bench.gpu_decode import verdict as decode_verdict

CUDA_TEST_FILES = ("tests/test_npn_precision.py", "tests/test_rank_flags.py",  # their `cuda`-marked tests
                   "tests/test_device_decode.py")
NPN_SHARE_TARGET = 2.0  # % of the step at the paper's shapes (paper: 6.03%; FLOP limit about 1%)
REAL = dict(model="ViT-B-32", batch=512, protos=4096, warmup=5, repeats=20, device="cuda",
            decode=["--size", "512", "--distinct", "64", "--batches", "256,512", "--warmup", "3", "--repeats", "10"])
DRY = dict(model="neuclip-tiny", batch=8, protos=16, warmup=1, repeats=2, device="cpu",
           decode=["--size", "96", "--distinct", "4", "--batches", "4", "--warmup", "1", "--repeats", "1"])
SECTIONS = ("## Machine", "## CUDA tests", "## Throughput at the paper's shapes", "## GPU JPEG decoding", "## Verdict")
BUDGET_S = 450  # the whole check's seconds (scripts/gpu_check.sh kills it at 470)


def parse(argv):
    p = argparse.ArgumentParser(prog="training.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "docs", "results", "gpu"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the plumbing, not the GPU")
    p.add_argument("--tests-timeout", type=int, default=240, help="seconds for the CUDA tests")
    p.add_argument("--bench-timeout", type=int, default=200, help="seconds for the benchmark")
    p.add_argument("--decode-timeout", type=int, default=60,
                   help="seconds for the device-decoding step (at most what is left of the budget)")
    return p.parse_args(argv)


def run(cmd: list[str], timeout: int, log_path: str) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": SRC_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, text = 124, out + f"\n(timed out after {timeout} s)"
    with open(log_path, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n\n" + text)
    return rc, text, time.perf_counter() - start


def test_outcomes(text: str) -> list[tuple[str, str]]:
    """(outcome, test id) from pytest's -v lines."""
    return [(o, n) for n, o in re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, flags=re.M)]


def main(argv=None) -> str:
    opts = parse(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    sizes = DRY if opts.dry_run else REAL
    os.makedirs(opts.out, exist_ok=True)
    info, git = machine_info(), git_commit()
    print(f"gpu_check: {'dry run on CPU' if opts.dry_run else 'GPU'} -> {opts.out}", flush=True)

    tests_rc, tests_text, tests_s = run([sys.executable, "-m", "pytest", "-v", "-rs", "-m", "cuda", "-p",
                                         "no:cacheprovider", *CUDA_TEST_FILES],
                                        opts.tests_timeout, os.path.join(opts.out, "cuda_tests.log"))
    print(f"[tests] rc {tests_rc} in {tests_s:.0f} s", flush=True)

    bench_dir = os.path.join(opts.out, "bench")
    bench_cmd = [sys.executable, "-m", "training.bench", "--out", bench_dir, "--parts", "gpu", "--no-estimate",
                 "--gpu-device", sizes["device"], "--gpu-model", sizes["model"], "--gpu-batch", str(sizes["batch"]),
                 "--gpu-protos", str(sizes["protos"]), "--gpu-warmup", str(sizes["warmup"]),
                 "--gpu-repeats", str(sizes["repeats"]), "--gpu-methods", "openclip,neuclip"]
    bench_rc, bench_text, bench_s = run(bench_cmd, opts.bench_timeout, os.path.join(opts.out, "bench.log"))
    print(f"[bench] rc {bench_rc} in {bench_s:.0f} s", flush=True)
    gpu = {}
    if os.path.exists(os.path.join(bench_dir, "gpu.json")):
        with open(os.path.join(bench_dir, "gpu.json")) as f:
            gpu = json.load(f)
    decode_json = os.path.join(opts.out, "decode.json")
    decode_timeout = max(5, min(opts.decode_timeout, int(BUDGET_S - (time.perf_counter() - started))))
    decode_rc, decode_text, decode_s = run([sys.executable, "-m", "training.bench.gpu_decode", "--device",
                                            sizes["device"], *sizes["decode"], "--json", decode_json],
                                           decode_timeout, os.path.join(opts.out, "decode.log"))
    print(f"[decode] rc {decode_rc} in {decode_s:.0f} s", flush=True)
    decode = {}
    if decode_rc == 0 and os.path.exists(decode_json):
        with open(decode_json) as f:
            decode = json.load(f)

    lines = ["# GPU check", ""]
    if opts.dry_run:
        lines += ["> **--dry-run: CPU, tiny sizes. This checks the script's plumbing; the numbers are not GPU "
                  "results.**", ""]
    lines += ["## Machine", "", f"- Command: `scripts/gpu_check.sh {' '.join(sys.argv[1:] if argv is None else argv)}`",
              f"- Git commit: `{git['commit']}`" + (" (working tree differs)" if git["dirty"] else ""),
              f"- torch {info['torch']} (CUDA {info['cuda']}); GPU: {', '.join(info['gpus']) or 'none'}; "
              f"CPU: {info['cpu']}; load average {info['load_average']}", ""]
    outcomes = test_outcomes(tests_text)
    lines += ["## CUDA tests", "", f"`pytest -m cuda {' '.join(CUDA_TEST_FILES)}`: exit status {tests_rc}, "
              f"{tests_s:.0f} s" + (" (without CUDA they are skipped)" if opts.dry_run else ""), ""]
    lines += [f"- {outcome}: `{name}`" for outcome, name in outcomes] or ["- (no outcomes parsed; see cuda_tests.log)"]
    lines += ["", "## Throughput at the paper's shapes", "",
              f"`python -m training.bench --parts gpu` ({sizes['model']}, bf16 autocast, local batch {sizes['batch']}, "
              f"m = {sizes['protos']}, T_u = 10): exit status {bench_rc}, {bench_s:.0f} s", ""]
    section = gpu_section(bench_dir)
    lines += [section or "(no GPU section: see bench.log)", ""]
    lines += ["## GPU JPEG decoding (`--input-pipeline device`)", "",
              f"`python -m training.bench.gpu_decode`: exit status {decode_rc}, {decode_s:.0f} s", ""]
    lines += (decode_summary_lines(decode) if decode else ["(no numbers: see decode.log)"]) + [""]
    lines += ["## Verdict", ""] + verdict(gpu, tests_rc, outcomes)
    lines += [decode_verdict(decode) if decode else "- Device decoding: no numbers (see decode.log)", ""]
    path = os.path.join(opts.out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(opts.out, "gpu.json"), "w") as f:
        json.dump({"dry_run": opts.dry_run, "sizes": sizes, "tests_rc": tests_rc, "tests": outcomes,
                   "bench_rc": bench_rc, "bench": {k: v for k, v in gpu.items() if k != "raw"},
                   "decode_rc": decode_rc, "decode": decode,
                   "machine": info, "git": git}, f, indent=1, default=str)
    print(f"report: {path}", flush=True)
    return path


def gpu_section(bench_dir: str) -> str:
    path = os.path.join(bench_dir, "report.md")
    if not os.path.exists(path):
        return ""
    text = open(path, encoding="utf-8").read()
    start = text.find("## 4. GPU mode")
    body = text[start + len("## 4. GPU mode"):] if start >= 0 else ""
    return body.replace("](gpu_step_time.png)", "](bench/gpu_step_time.png)").strip()


def verdict(gpu: dict, tests_rc: int, outcomes) -> list[str]:
    failed = [n for o, n in outcomes if o in ("FAILED", "ERROR")]
    if outcomes and all(o == "SKIPPED" for o, _ in outcomes):
        state = "all skipped (no CUDA)"
    elif tests_rc == 0 and outcomes and not failed:
        state = "all passed"
    else:
        state = f"FAILED (exit status {tests_rc}): {', '.join(failed) or 'see cuda_tests.log'}"
    lines = [f"- CUDA tests: {state}"]
    summary = gpu.get("summary") or {}
    neu, ref = summary.get("neuclip"), summary.get("openclip")
    if not neu or not ref or not neu.get("npn_inner"):
        return lines + ["- Benchmark: no numbers (see bench.log)"]
    share = 100 * neu["npn_inner"]["median"] / neu["total"]["median"]
    batch = gpu.get("batch")
    lines += [f"- OpenCLIP {batch / ref['total']['median']:.0f} samples/s, NeuCLIP {batch / neu['total']['median']:.0f} "
              f"samples/s ({neu['ratio']['median']:.3f}× OpenCLIP's step time)",
              f"- NPN share of the NeuCLIP step: {share:.2f}% (paper, Table 5: 6.03%; target ≤ {NPN_SHARE_TARGET:.0f}%: "
              f"{'met' if share <= NPN_SHARE_TARGET else 'NOT met'})"]
    return lines


if __name__ == "__main__":
    main()
