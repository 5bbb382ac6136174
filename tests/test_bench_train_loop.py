"""scripts/bench_train_loop.py (the training program's own throughput): a CPU run of the real CLI
for two variants against a baseline tree, and its table, ratios and JSON."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train_loop.py"


def test_runs_the_cli_for_each_variant_and_tree(tmp_path):
    out = tmp_path / "loop.json"
    # the baseline tree is this one: both rows run the same loop, so their ratio is ~1
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--no-compile", "--steps", "14", "--skip", "8",
           "--profile-steps", "2",
           "--variants", "ours", "hf", "--baseline-tree", str(REPO / "assignment1"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["variant"], r["tree"]) for r in result["rows"]] == [
        ("ours", "this"), ("ours", "baseline"), ("hf", "this"), ("hf", "baseline")]
    assert all(r["logged_steps"] == 6 and r["tok_s_median"] > 0 for r in result["rows"])
    assert all(r["device_busy_ms"] is None for r in result["rows"])  # CPU: profiled, but no device kernels
    assert result["rows"][0]["attention"] == "math"  # the tiny preset's backend, from the run's header
    assert set(result["ratios"]) == {"ours/hf (this)", "ours/hf (baseline)", "ours: this/baseline", "hf: this/baseline"}
    assert "ours/hf (this)" in proc.stdout


def test_rejects_a_tree_without_the_package(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--baseline-tree", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "holds no cs336_basics/train.py" in proc.stderr
