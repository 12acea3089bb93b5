"""scripts/gpu_check.sh --dry-run: the one-call GPU check's plumbing, on the CPU at tiny sizes (CI has no GPU)."""
import json
import os
import subprocess
import sys

import torch

from training.bench.common import REPO_ROOT
from training.bench.gpu_check import SECTIONS


def test_dry_run_writes_a_report_with_every_section(tmp_path):
    """Catches a GPU check that breaks before anyone holds a GPU: a bad path to the tests, a benchmark flag
    the CLI no longer takes, a report missing its tests, throughput table (samples/s, NPN share next to the
    paper's 6.03%, FLOP share, peak memory), device-decoding table (images/s, main-process CPU per image, the
    3000 images/s target) or verdict."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=170, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for column in ("samples/s", "NPN share", "6.03%", "NPN FLOP share", "step peak memory", "images/s",
                   "main-process CPU s/image", ">= 3000 images/s", "EncodedCropTransform"):
        assert column in report, column
    data = json.loads((out / "gpu.json").read_text())
    assert data["dry_run"] and data["tests_rc"] == 0 and data["bench_rc"] == 0
    assert len(data["tests"]) >= 5  # the cuda-marked tests were collected
    if not torch.cuda.is_available():
        assert {o for o, _ in data["tests"]} == {"SKIPPED"}
    assert set(data["bench"]["summary"]) == {"openclip", "neuclip"}
    assert data["decode_rc"] == 0 and [s["batch"] for s in data["decode"]["stages"]] == [4]
    assert all(s["images_per_s"] > 0 and s["cpu_s_per_image"] > 0 for s in data["decode"]["stages"])
