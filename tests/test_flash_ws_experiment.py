"""scripts/bench_flash_ws.py (the TMA / warp-specialization experiment for the FlashAttention
backward): its kernels against float64 in the Triton interpreter, through the same compile-child
path the GPU run takes, and its input checks."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_flash_ws.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_flash_ws", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_experiment_kernels_match_float64_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all variants match the float64 reference" in proc.stdout
    assert proc.stdout.count('"rel_err"') == 8  # every interpreter variant ran (both passes, with and without WS)


def test_experiment_rejects_what_it_does_not_handle():
    pytest.importorskip("triton")
    mod = _module()
    q = torch.zeros(2, 128, 32)
    with pytest.raises(ValueError, match="multiple of the largest tile"):
        r = torch.zeros(2, 100, 32)
        mod.check_shapes(r, r, r, r, 64)
    with pytest.raises(ValueError, match="contiguous"):
        t = q.transpose(0, 1)
        mod.check_shapes(t, t, t, t, 64)
    with pytest.raises(ValueError, match="must match"):
        mod.check_shapes(q, q.double(), q, q, 64)
