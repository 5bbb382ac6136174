"""scripts/bench_generate.py on CPU at the tiny preset: every variant timed, its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_times_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "gen.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_generate.py"), "--preset", "tiny", "--tokens",
                           "12", "--samples", "1", "3", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["samples"]) for r in rows] == [
        (v, n) for n in (1, 3) for v in ("cache, projections apart", "cache, projections fused", "no cache")]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in rows)
    assert "| cache, projections fused | 3 |" in proc.stdout
