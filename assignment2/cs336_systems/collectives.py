"""All-reduce benchmark: time and bandwidth over tensor sizes and world sizes (CS336 assignment 2, §2.1).

    cs336-systems allreduce-bench                                  # CPU: gloo, 2/4/6 forked processes
    cs336-systems allreduce-bench --backend nccl --world-sizes 2   # GPUs (one process per GPU, spawned)
    torchrun --nproc_per_node 2 -m cs336_systems.collectives --backend nccl   # or under torchrun

For each size: ``--warmup`` untimed all-reduces, then ``--iters`` timed ones (each followed by
``torch.cuda.synchronize()`` on GPUs); the time of an iteration is the slowest rank's, and the
table reports the median. Bandwidths (the NCCL-tests convention, fp32 data of S bytes, N ranks):
algorithm bandwidth = S / t; bus bandwidth = S / t · 2(N-1)/N, the per-link traffic of a ring
all-reduce, comparable across world sizes and to the hardware's link speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cs336_systems.dist_utils import init_distributed, run_distributed


def bench_all_reduce(rank: int, world_size: int, sizes_mb: list[float], iters: int, warmup: int) -> list[dict]:
    """Time all-reduce of fp32 tensors on an initialized process group (every rank returns the rows)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    rows = []
    for size_mb in sizes_mb:
        numel = int(size_mb * 2**20) // 4
        x = torch.ones(numel, dtype=torch.float32, device=device)
        times = []
        for i in range(warmup + iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # an all-reduce is as slow as its slowest rank
            if i >= warmup:
                times.append(float(dt.item()))
        t = statistics.median(times)
        nbytes = numel * 4
        rows.append({"backend": dist.get_backend(), "world_size": world_size, "size_mb": size_mb, "bytes": nbytes,
                     "time_ms": 1e3 * t, "time_ms_min": 1e3 * min(times), "algbw_gbs": nbytes / t / 1e9,
                     "busbw_gbs": nbytes / t / 1e9 * 2 * (world_size - 1) / world_size})
        del x
    return rows


def _job(rank, world_size, sizes_mb, iters, warmup):
    return bench_all_reduce(rank, world_size, sizes_mb, iters, warmup)


def format_table(rows: list[dict]) -> str:
    lines = ["| backend | ranks | size (MB) | time (ms, median) | algbw (GB/s) | busbw (GB/s) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['world_size']} | {r['size_mb']:g} | {r['time_ms']:.3f} | {r['algbw_gbs']:.2f} | {r['busbw_gbs']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless; set here, not at import time
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (backend, ws) in sorted({(r["backend"], r["world_size"]) for r in rows}):
        pts = [(r["size_mb"], r["busbw_gbs"]) for r in rows if r["backend"] == backend and r["world_size"] == ws]
        ax.plot(*zip(*pts), "o-", label=f"{backend}, {ws} ranks")
    ax.set(xscale="log", xlabel="tensor size (MB, fp32)", ylabel="bus bandwidth (GB/s)", title="all-reduce")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cs336-systems allreduce-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl with GPUs, else gloo")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None, help="default: 2 4 6 (gloo), 2 (nccl); max = GPUs")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", default="runs/allreduce_bench")
    args = parser.parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" in os.environ:  # under torchrun: this process group only
        rank, ws, _ = init_distributed(backend)
        rows = bench_all_reduce(rank, ws, args.sizes_mb, args.iters, args.warmup)
        dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        world_sizes = args.world_sizes or ([2] if backend == "nccl" else [2, 4, 6])
        if backend == "nccl":
            world_sizes = [w for w in world_sizes if w <= torch.cuda.device_count()]
        rows = []
        for ws in world_sizes:
            rows += run_distributed(_job, ws, args.sizes_mb, args.iters, args.warmup, backend=backend, timeout_s=3600,
                                    collective_timeout_s=600, start_method="spawn" if backend == "nccl" else "fork")[0]
    table = format_table(rows)
    print(table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allreduce.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    (out / "allreduce.md").write_text(table + "\n")
    plot(rows, out / "allreduce.png")
    print(f"wrote {out}/allreduce.json, allreduce.md, allreduce.png")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(cli_main())
