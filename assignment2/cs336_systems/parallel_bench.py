"""Step time, time waiting on communication and peak memory per rank for every data-parallel mode
of `cs336_systems.parallel` on the cs336_basics TransformerLM (CS336 assignment 2, §2.2-2.3).

    cs336-systems ddp-bench                       # CPU: gloo, 2 forked processes, a small model
    torchrun --nproc_per_node 2 -m cs336_systems.parallel_bench --size xl --context 512 --batch 2 \\
        --modes ddp-naive ddp-flat ddp-overlap ddp-bucketed torch-ddp --bucket-sizes 1 10 100 1000

Per mode (and bucket size): median step time over ``--steps`` after ``--warmup`` steps, the median
time ``finish_gradient_synchronization()`` blocked on communication (our wrappers; on GPUs the CUDA-event
time from the end of backward's kernels to synced gradients; for the naive and flat variants that is
all communication, for overlapped ones only what backward did not hide;
``torch-ddp`` and ``torch-fsdp2`` synchronize inside backward, so n/a), and the peak memory of a
rank: CUDA ``max_memory_allocated``; on CPU the peak resident set (VmHWM) minus the resident set
before the model was built, each (mode, bucket) in a fresh process so freed memory is not reused.

Predicted memory (the course's accounting, fp32 AdamW, P parameters, N ranks, bytes):
params 4P + grads 4P + AdamW state 8P, plus activations A (measured: single process, same local
batch, model and AdamW excluded) and communication buffers; per mode:
  DDP (ours):   16P + 4P (flat bucket copies of the gradients) + A
  torch-ddp:    16P + 4P (bucket views) + A
  ZeRO-1:        8P + 8P/N + 4P (buckets) + A
  FSDP:         16P_s/N + 16P_r + 3 x 4 x (largest unit) + A  (P_s sharded, P_r replicated; in flight:
                the unit being used, the prefetched one and one full gradient before its reduce-scatter)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cs336_systems.dist_utils import init_distributed, run_distributed

# The course's model sizes (§1.1.2) plus a CPU-sized one.
SIZES = {
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, d_ff=192),
    "cpu-small": dict(d_model=256, num_layers=4, num_heads=4, d_ff=1024),
    "small": dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "medium": dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    "large": dict(d_model=1280, num_layers=36, num_heads=20, d_ff=5120),
    "xl": dict(d_model=1600, num_layers=48, num_heads=25, d_ff=6400),
    "2.7B": dict(d_model=2560, num_layers=32, num_heads=32, d_ff=10240),
}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _fixed_mmap_threshold() -> None:
    """Make glibc serve every allocation >= 64 KiB by mmap and return it on free (no dynamic
    threshold), so the resident set tracks live tensors and VmHWM is a fair peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def bench_mode(rank: int, world_size: int, mode: str, args: dict) -> dict:
    """One mode on an initialized process group; returns this rank's measurements."""
    from cs336_basics.model import TransformerLM
    from cs336_basics.nn_utils import cross_entropy

    from cs336_systems.parallel import DTYPES, ParallelStrategy

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    cuda = device.type == "cuda"
    compute_dtype = DTYPES[args["compute_dtype"]]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _fixed_mmap_threshold()
        _reset_peak_rss()
        base = _rss_bytes("VmRSS")
    torch.manual_seed(0)
    model = TransformerLM(args["vocab_size"], args["context"], **SIZES[args["size"]], attn_backend=args["attn_backend"], device=device)
    n_params = sum(p.numel() for p in model.parameters())
    strategy = None
    if mode != "none":
        strategy = ParallelStrategy(mode, rank, world_size, device, bucket_size_mb=args["bucket_size_mb"], compute_dtype=compute_dtype)
        model = strategy.wrap_model(model)
        optimizer = strategy.make_optimizer(model, lr=1e-4)
    elif args.get("no_optimizer"):
        optimizer = None
    else:
        from cs336_basics.optimizer import AdamW

        optimizer = AdamW(model.parameters(), lr=1e-4)
    # Peak over training only: construction may briefly hold the full model (fsdp shards it after).
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    g = torch.Generator().manual_seed(1234)
    b = args["batch"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and args["autocast_bf16"] else torch.autocast("cpu", enabled=False)
    times, waits = [], []
    for step in range(args["warmup"] + args["steps"]):
        x = torch.randint(0, args["vocab_size"], (b * world_size, args["context"] + 1), generator=g)
        x = x[rank * b : (rank + 1) * b].to(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast:
            loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        if cuda:  # NCCL's wait() is a stream dependency: time it on the GPU, not the host
            ev_backward = torch.cuda.Event(enable_timing=True)
            ev_synced = torch.cuda.Event(enable_timing=True)
            ev_backward.record()
        if strategy is not None:
            strategy.after_backward(model, optimizer)
        if cuda:
            ev_synced.record()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step >= args["warmup"]:
            times.append(time.perf_counter() - t0)
            wait = getattr(model, "comm_wait_s", float("nan"))
            if cuda and not math.isnan(wait):
                wait = ev_backward.elapsed_time(ev_synced) / 1e3  # backward compute done -> gradients synced
            waits.append(wait)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _rss_bytes("VmHWM") - base
    return {"mode": mode, "bucket_size_mb": args["bucket_size_mb"], "rank": rank, "world_size": world_size,
            "params": n_params, "step_s": statistics.median(times), "comm_wait_s": statistics.median(waits),
            "peak_mem_bytes": peak, "loss": float(loss.detach())}


def _bench_job(rank, world_size, mode, args):
    return bench_mode(rank, world_size, mode, args)


def predicted_bytes(mode: str, n_params: int, n_sharded: int, world_size: int, activations: int, layer_params: int) -> int:
    """The accounting in the module docstring (fp32 AdamW)."""
    p, n = n_params, world_size
    if mode in ("none",):
        return 16 * p + activations
    if mode.startswith("ddp") or mode == "torch-ddp":
        return 20 * p + activations
    if mode == "zero1":
        return 8 * p + 8 * p // n + 4 * p + activations
    if mode in ("fsdp", "torch-fsdp2"):
        replicated = p - n_sharded
        return 16 * n_sharded // n + 16 * replicated + 3 * 4 * layer_params + activations
    raise ValueError(mode)


def run_plan(plan: list[tuple[str, float]], args: dict, world_size: int, backend: str) -> list[dict]:
    """Each (mode, bucket) in a fresh process group: forked processes on CPU, or in-process under torchrun."""
    rows = []
    for mode, bucket in plan:
        job_args = dict(args, bucket_size_mb=bucket)
        if "RANK" in os.environ:  # under torchrun: one process per rank already
            rank, ws, _ = init_distributed(backend)
            res = [bench_mode(rank, ws, mode, job_args)]
            gathered = [None] * ws
            dist.all_gather_object(gathered, res[0])
            res = gathered
        else:
            res = run_distributed(_bench_job, world_size, mode, job_args, backend=backend, timeout_s=1800,
                                  collective_timeout_s=600, start_method="fork" if backend == "gloo" else "spawn",
                                  num_threads=args["threads"])
        rows.append({**res[0], "step_s": max(r["step_s"] for r in res), "comm_wait_s": max(r["comm_wait_s"] for r in res),
                     "peak_mem_bytes_per_rank": [r["peak_mem_bytes"] for r in res]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| mode | bucket MB | step (ms) | comm wait (ms) | comm wait share | peak mem/rank (MB) | predicted (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wait = r["comm_wait_s"]
        wait_s = "n/a" if math.isnan(wait) else f"{1e3 * wait:.1f}"
        share = "n/a" if math.isnan(wait) else f"{100 * wait / r['step_s']:.0f}%"
        bucket = f"{r['bucket_size_mb']:g}" if r["mode"] in ("ddp-bucketed", "zero1", "torch-ddp") else "-"
        mem = max(r["peak_mem_bytes_per_rank"]) / 2**20
        pred = f"{r['predicted_bytes'] / 2**20:.0f}" if r.get("predicted_bytes") else "-"
        lines.append(f"| {r['mode']} | {bucket} | {1e3 * r['step_s']:.1f} | {wait_s} | {share} | {mem:.0f} | {pred} |")
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cs336-systems ddp-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu-small")
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--world-size", type=int, default=2, help="processes to fork (ignored under torchrun)")
    parser.add_argument("--backend", default=None, help="gloo (default on CPU) or nccl")
    parser.add_argument("--modes", nargs="+", default=["ddp-naive", "ddp-flat", "ddp-overlap", "ddp-bucketed", "torch-ddp", "zero1", "fsdp", "torch-fsdp2"])
    parser.add_argument("--bucket-sizes", type=float, nargs="+", default=[1.0, 10.0, 100.0], help="MB, for ddp-bucketed")
    parser.add_argument("--default-bucket-mb", type=float, default=25.0, help="bucket of zero1 / torch-ddp")
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="fsdp / torch-fsdp2")
    parser.add_argument("--autocast-bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--attn-backend", default="math")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per forked rank (CPU)")
    parser.add_argument("--out-dir", default="runs/ddp_bench")
    args = parser.parse_args(argv)
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    job = dict(size=args.size, vocab_size=args.vocab_size, context=args.context, batch=args.batch, compute_dtype=args.compute_dtype,
               autocast_bf16=args.autocast_bf16, attn_backend=args.attn_backend, steps=args.steps, warmup=args.warmup, threads=args.threads)
    plan = []
    for mode in args.modes:
        for bucket in (args.bucket_sizes if mode == "ddp-bucketed" else [args.default_bucket_mb]):
            plan.append((mode, bucket))
    # Activation memory for the prediction: single process, same local batch, no optimizer state.
    act = run_plan([("none", 0.0)], {**job, "no_optimizer": True}, 1, backend)[0]
    rows = run_plan(plan, job, args.world_size, backend)
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return 0
    from cs336_basics.model import TransformerLM

    shape = TransformerLM(args.vocab_size, args.context, **SIZES[args.size], device="meta")
    n_params = sum(p.numel() for p in shape.parameters())
    n_sharded = sum(p.numel() for m in shape.modules() if type(m).__name__ in ("Linear", "Embedding") for p in m.parameters(recurse=False))
    layer_params = max(p.numel() for p in shape.parameters())  # the largest gathered unit (embedding / head)
    grads_and_params = 8 * n_params  # act run: params + grads were part of its peak
    activations = max(0, max(act["peak_mem_bytes_per_rank"]) - grads_and_params)
    ws = rows[0]["world_size"] if rows else args.world_size
    for r in rows:
        r["predicted_bytes"] = predicted_bytes(r["mode"], n_params, n_sharded, ws, activations, layer_params)
    table = format_table(rows)
    print(f"model {args.size}: {n_params / 1e6:.1f}M params, context {args.context}, batch {args.batch}/rank, "
          f"world {ws}, backend {backend}; activations (measured, 1 process) {activations / 2**20:.0f} MB")
    print(table)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_bench.json").write_text(json.dumps({"config": vars(args), "backend": backend, "params": n_params,
                                                    "activations_bytes": activations, "rows": rows}, indent=2))
    (out / "ddp_bench.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(cli_main())
