"""The benchmark harnesses run end to end on CPU (gloo, 2 processes) at tiny sizes: all-reduce
bandwidth, ddp-bench, and the issue-7 multi-GPU script's code path (scripts/multigpu_bench.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from cs336_systems import collectives, parallel_bench
from cs336_systems.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]


def test_allreduce_bench_rows():
    rows = run_distributed(collectives._job, 2, [0.01, 0.25], 2, 1)[0]
    assert [r["size_mb"] for r in rows] == [0.01, 0.25]
    for r in rows:
        assert r["time_ms"] > 0 and r["bytes"] == int(r["size_mb"] * 2**20) // 4 * 4
        assert abs(r["busbw_gbs"] - r["algbw_gbs"]) < 1e-9  # 2(N-1)/N = 1 for N = 2
    assert "| gloo | 2 |" in collectives.format_table(rows)


def test_ddp_bench_cli(tmp_path):
    modes = ["ddp-flat", "ddp-bucketed", "torch-ddp", "zero1", "fsdp"]
    assert parallel_bench.cli_main(["--size", "tiny", "--vocab-size", "256", "--context", "16", "--batch", "2", "--steps", "1",
                                    "--warmup", "1", "--modes", *modes, "--bucket-sizes", "0.01", "1", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "ddp_bench.json").read_text())
    assert [r["mode"] for r in data["rows"]] == ["ddp-flat", "ddp-bucketed", "ddp-bucketed", "torch-ddp", "zero1", "fsdp"]
    for r in data["rows"]:
        assert r["step_s"] > 0 and r["predicted_bytes"] > 0 and len(r["peak_mem_bytes_per_rank"]) == 2
    assert "| zero1 |" in (tmp_path / "ddp_bench.md").read_text()


def _multigpu_smoke(rank, world_size, out_dir):
    spec = importlib.util.spec_from_file_location("multigpu_bench", REPO / "scripts" / "multigpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--smoke", "--parts", "allreduce", "ddp", "memory", "--bucket-sizes", "1", "--out-dir", out_dir])


def test_multigpu_script_smoke(tmp_path):
    assert run_distributed(_multigpu_smoke, 2, str(tmp_path), timeout_s=300) == [0, 0]
    data = json.loads((tmp_path / "multigpu.json").read_text())
    assert data["world_size"] == 2 and data["allreduce"]
    assert {r["mode"] for r in data["ddp"]["rows"]} == {"ddp-naive", "ddp-flat", "ddp-overlap", "ddp-bucketed", "torch-ddp"}
    assert data["ddp"]["best_vs_torch_ddp"] > 0
    assert [r["mode"] for r in data["memory"]["rows"]] == ["ddp-bucketed", "zero1", "fsdp", "torch-fsdp2"]


def _fallbacks(rank, world_size):
    import torch
    import torch.distributed as dist
    from cs336_systems import dist_utils

    x = torch.arange(8, dtype=torch.float32) * (rank + 1)
    fused_rs, fused_ag = torch.empty(4), torch.empty(16)
    dist_utils.reduce_scatter_tensor(fused_rs, x)
    dist_utils.all_gather_into_tensor(fused_ag, x)
    # Pretend the backend lacks the fused ops (older gloo): all_reduce + slice / list all_gather.
    key = dist.get_backend()
    dist_utils._FUSED_SUPPORTED[("reduce_scatter", key)] = False
    dist_utils._FUSED_SUPPORTED[("all_gather", key)] = False
    rs, ag = torch.empty(4), torch.empty(16)
    dist_utils.reduce_scatter_tensor(rs, x, async_op=True).wait()
    dist_utils.all_gather_into_tensor(ag, x, async_op=True).wait()
    expected_rs = (torch.arange(8, dtype=torch.float32) * 3)[rank * 4 : (rank + 1) * 4]
    return torch.equal(rs, fused_rs) and torch.equal(rs, expected_rs) and torch.equal(ag, fused_ag)


def test_collective_fallbacks_match_fused_ops():
    assert run_distributed(_fallbacks, 2) == [True, True]
