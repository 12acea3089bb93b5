"""`python -m training.bench --parts peer --quick`: open_clip_train and this trainer on the same tiny work."""
import json
import os
import subprocess
import sys

from training.bench.common import REPO_ROOT, SRC_DIR


def test_quick_peer_table_has_both_trainers(tmp_path):
    """Catches a peer comparison that cannot run: open_clip_train not importable (pandas, the model config not
    registered for it, its webdataset 1.0 end-of-shard crash), a per-step log line no longer stamped (no step
    times), or a table without the peer's row or ours."""
    out = tmp_path / "peer"
    proc = subprocess.run([sys.executable, "-m", "training.bench", "--out", str(out), "--parts", "peer", "--quick",
                           "--no-estimate", "--peer-methods", "openclip"],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": SRC_DIR, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| open_clip_train (open_clip 3.3.0's trainer) |" in report
    assert "| this trainer: OpenCLIP |" in report
    data = json.loads((out / "peer.json").read_text())
    for key in ("peer", "openclip"):
        run = data["runs"][key][0]
        assert run["steps"] >= 2 and all(t > 0 for t in run["step_s"]) and run["cpu_s"] > 0
    assert data["summary"]["peer"]["step_ratio"]["median"] == 1.0
