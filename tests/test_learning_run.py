"""scripts/learning_run.py run: both sides of the learning benchmark through the real CLI on CPU.

Same initial weights, same batches, the same loop: our TransformerLM + our AdamW and transformers'
Llama + torch.optim.AdamW must trace the same validation curve (the comparison against wall time
then measures speed alone)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "learning_run.py"


def _tokens(path: Path, n: int, seed: int) -> None:
    # a learnable stream: one random phrase repeated, with 10% noise, so the loss falls within a few steps
    phrase = np.random.default_rng(0).integers(0, 512, 37)
    rng = np.random.default_rng(seed)
    ids = np.where(rng.random(n) < 0.1, rng.integers(0, 512, n), np.resize(phrase, n)).astype(np.uint16)
    ids.tofile(path)
    Path(f"{path}.json").write_text(json.dumps({"dtype": "uint16", "num_tokens": n}))


def test_run_trains_both_sides_plots_and_summarizes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _tokens(data / "train.bin", 20_000, 0)
    _tokens(data / "val.bin", 4_000, 1)
    out = tmp_path / "runs"
    cmd = [sys.executable, str(SCRIPT), "run", "--data", str(data), "--out", str(out), "--preset", "tiny",
           "--no-compile", "--max-steps", "30", "--eval-interval", "10", "--skip", "5", "--minutes", "5",
           "--", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "learning_run.json").read_text())
    for side in ("ours", "hf"):
        s = summary["runs"][side]
        assert s["final_step"] == 30 and s["median_tok_s"] > 0
        assert list(s["val_loss_by_step"]) == ["0", "10", "20", "30"]
        assert s["best_val_loss"] < s["val_loss_by_step"]["0"] - 1.0  # it learned
    assert summary["max_val_loss_gap_same_step"] < 1e-3  # the two models trace one curve
    assert (out / "learning_run.png").stat().st_size > 10_000
    assert "| best validation loss |" in proc.stdout
    # runs made apart (one device call per side) are summed up by `plot` alone, the same way
    replot = [sys.executable, str(SCRIPT), "plot", "--runs", str(out / "ours"), str(out / "hf"), "--labels", "ours",
              "hf", "--skip", "5", "--out", str(tmp_path / "again")]
    subprocess.run(replot, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads((tmp_path / "again.json").read_text()) == summary
    assert (out / "ours.log").read_text().count("| val_loss ") == 4  # the evaluations' log lines


def test_run_without_prepared_data_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "run", "--data", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "run `learning_run.py prepare" in proc.stderr
