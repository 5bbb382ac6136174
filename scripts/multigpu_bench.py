"""Issue 7: the multi-GPU measurements on one host, in one torchrun job (table + JSON).

    # 2 GPUs (nvidia-h200-x2); the device machine has no cs336 install, hence PYTHONPATH:
    PYTHONPATH=assignment1:assignment2 torchrun --standalone --nproc_per_node 2 scripts/multigpu_bench.py \\
        --out-dir $OUT/multigpu [--train-data ts_train.bin --val-data ts_valid.bin]
    # CPU smoke test of the same code path (gloo, tiny sizes; what CI runs):
    PYTHONPATH=assignment1:assignment2 torchrun --standalone --nproc_per_node 2 scripts/multigpu_bench.py --smoke

Parts (``--parts``, default all):
  allreduce  NCCL all-reduce time and bus bandwidth, 1 MB ... 1 GB.
  ddp        the course's xl model (d_model 1600, 48 layers, 25 heads, d_ff 6400), context 512,
             batch 2 per GPU, bf16 autocast: step time and time waiting on communication for
             ddp-naive, ddp-flat, ddp-overlap, ddp-bucketed (1, 10, 100, 1000 MB) and torch-ddp, all in
             this job; the best of ours is compared with torch-ddp (target: within 5%).
  memory     peak memory per GPU and step time for ddp-bucketed (plain DDP), zero1, fsdp (bf16 compute)
             and torch-fsdp2 on the same model, next to the course's accounting (parallel_bench.py).
  train      with --train-data/--val-data: the tinystories-17m run for --train-steps steps on 1 GPU
             (rank 0 alone) and on all GPUs (ddp-bucketed), tokens/s and the scaling ratio.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are forced before NCCL starts): on the shared hosts it can take the GPUs out
of service.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

# Before torch / NCCL initialize: never use NVLink multicast on the shared machines.
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import torch
import torch.distributed as dist
from cs336_systems import collectives, parallel_bench
from cs336_systems.dist_utils import init_distributed


def _gather_rows(row: dict) -> list[dict]:
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def _run_mode(mode: str, job: dict) -> dict:
    rank, ws = dist.get_rank(), dist.get_world_size()
    res = parallel_bench.bench_mode(rank, ws, mode, job)
    gc.collect()  # hooks and wrappers form reference cycles; free the model before the next mode
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows = _gather_rows(res)
    return {**rows[0], "step_s": max(r["step_s"] for r in rows), "comm_wait_s": max(r["comm_wait_s"] for r in rows),
            "peak_mem_bytes_per_rank": [r["peak_mem_bytes"] for r in rows]}


def part_train(args, out: Path, log) -> dict:
    """tinystories-17m: tokens/s on 1 GPU (rank 0 alone) vs all GPUs (ddp-bucketed)."""
    from cs336_basics.config import PRESETS
    from cs336_basics.train import train
    from cs336_systems.parallel import ParallelStrategy

    rank, ws, device = dist.get_rank(), dist.get_world_size(), torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    cfg = PRESETS["tiny" if args.smoke else "tinystories-17m"].replace(
        train_data=args.train_data, val_data=args.val_data, max_steps=args.train_steps, eval_interval=10**9,
        eval_batches=2, checkpoint_interval=0, warmup_steps=min(10, args.train_steps), overwrite=True)
    result = {}
    if rank == 0:
        single = train(cfg.replace(out_dir=str(out / "train_1gpu"), device=str(device)))
        result["1"] = single
    dist.barrier()
    strategy = ParallelStrategy("ddp-bucketed", rank, ws, device)
    multi = train(cfg.replace(out_dir=str(out / f"train_{ws}gpu")), strategy)
    result[str(ws)] = multi
    if rank == 0:
        # train.py's wall time includes evaluation and start-up; tokens/s from its metrics.jsonl steps
        def tok_s(d):
            rows = [json.loads(line) for line in (out / d / "metrics.jsonl").read_text().splitlines()]
            rates = [r["tok_s"] for r in rows if "tok_s" in r][len(rows) // 4 :]  # skip warm-up steps
            return sorted(rates)[len(rates) // 2] if rates else float("nan")

        result["tok_s_1"], result[f"tok_s_{ws}"] = tok_s("train_1gpu"), tok_s(f"train_{ws}gpu")
        result["scaling"] = result[f"tok_s_{ws}"] / result["tok_s_1"]
        log(f"tinystories-17m tokens/s: 1 GPU {result['tok_s_1']:,.0f}, {ws} GPUs {result[f'tok_s_{ws}']:,.0f} "
            f"(x{result['scaling']:.2f}, ideal x{ws})")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["allreduce", "ddp", "memory", "train"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, gloo allowed: a CPU check of the script")
    parser.add_argument("--size", default=None, help="model size of parallel_bench.SIZES (default xl; smoke: tiny)")
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    parser.add_argument("--bucket-sizes", type=float, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--train-data", default="")
    parser.add_argument("--val-data", default="")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--out-dir", default="runs/multigpu")
    args = parser.parse_args(argv)
    smoke = args.smoke
    rank, ws, device = init_distributed(timeout_s=900)
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    results: dict = {"world_size": ws, "backend": dist.get_backend(), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "args": vars(args)}
    log(f"world {ws} | backend {results['backend']} | {results['device']}")

    if "allreduce" in args.parts:
        sizes = [0.25, 1] if smoke else [1, 10, 100, 1000]
        rows = collectives.bench_all_reduce(rank, ws, sizes, 3 if smoke else 20, 1 if smoke else 5)
        results["allreduce"] = rows
        log(collectives.format_table(rows))

    job = dict(size=args.size or ("tiny" if smoke else "xl"), vocab_size=512 if smoke else 10_000, context=args.context or (32 if smoke else 512),
               batch=args.batch, compute_dtype="fp32", autocast_bf16=device.type == "cuda", attn_backend="sdpa",
               steps=args.steps or (2 if smoke else 10), warmup=args.warmup or (1 if smoke else 3))
    if "ddp" in args.parts:
        plan = [("ddp-naive", 25.0), ("ddp-flat", 25.0), ("ddp-overlap", 25.0)]
        plan += [("ddp-bucketed", b) for b in args.bucket_sizes] + [("torch-ddp", 25.0)]
        rows = []
        for mode, bucket in plan:
            rows.append(_run_mode(mode, dict(job, bucket_size_mb=bucket)))
            log(f"  {mode} {bucket:g} MB: {1e3 * rows[-1]['step_s']:.1f} ms/step, comm wait {1e3 * rows[-1]['comm_wait_s']:.1f} ms")
        ours = min((r for r in rows if r["mode"] != "torch-ddp"), key=lambda r: r["step_s"])
        ref = next(r for r in rows if r["mode"] == "torch-ddp")
        results["ddp"] = {"rows": rows, "best_ours": ours["mode"], "best_ours_bucket_mb": ours["bucket_size_mb"],
                          "best_vs_torch_ddp": ours["step_s"] / ref["step_s"]}
        log(parallel_bench.format_table(rows))
        log(f"best of ours: {ours['mode']} ({ours['bucket_size_mb']:g} MB) = {ours['step_s'] / ref['step_s']:.3f} x torch-ddp's step time (target <= 1.05)")

    if "memory" in args.parts:
        from cs336_basics.model import TransformerLM

        rows = []
        for mode, dtype in (("ddp-bucketed", "fp32"), ("zero1", "fp32"), ("fsdp", "bf16"), ("torch-fsdp2", "bf16")):
            rows.append(_run_mode(mode, dict(job, bucket_size_mb=25.0, compute_dtype=dtype)))
            log(f"  {mode}: peak {max(rows[-1]['peak_mem_bytes_per_rank']) / 2**30:.2f} GiB/rank, {1e3 * rows[-1]['step_s']:.1f} ms/step")
        act = _run_mode("none", dict(job, bucket_size_mb=0.0, no_optimizer=True))
        shape = TransformerLM(job["vocab_size"], job["context"], **parallel_bench.SIZES[job["size"]], device="meta")
        n = sum(p.numel() for p in shape.parameters())
        n_sharded = sum(p.numel() for m in shape.modules() if type(m).__name__ in ("Linear", "Embedding") for p in m.parameters(recurse=False))
        activations = max(0, max(act["peak_mem_bytes_per_rank"]) - 8 * n)
        for r in rows:
            r["predicted_bytes"] = parallel_bench.predicted_bytes(r["mode"], n, n_sharded, ws, activations, max(p.numel() for p in shape.parameters()))
        results["memory"] = {"rows": rows, "params": n, "activations_bytes": activations}
        log(parallel_bench.format_table(rows))

    if "train" in args.parts and args.train_data and args.val_data:
        results["train"] = part_train(args, out, log)

    if rank == 0:
        (out / "multigpu.json").write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {out / 'multigpu.json'}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"done in {time.time() - t0:.0f}s", file=sys.stderr)
    sys.exit(code)
