"""FlashAttention benchmarks on one GPU: the course leaderboard harness, the course's sweep, and the
tinystories-17m training step with flash vs SDPA attention. Results go to stdout and a JSON file.

    uv run cs336-systems flash-bench leaderboard sweep model --out flash.json

* tiles: every fitting candidate tile config of each kernel timed alone at the leaderboard shape.
* leaderboard: causal, bf16, q, k, v of shape (16, 16384, 64) as views of one
  ``randn(3, 16, 16384, 64, requires_grad=True)`` leaf, ``o.sum().backward()``, grads never zeroed,
  ``triton.testing.do_bench`` median; ours against SDPA's flash and cuDNN backends and naive
  PyTorch, all in this process. Also ours' error against float64 on two heads.
* sweep: batch 1, causal, seq 128..65536 x d 16..128 x {bf16, fp32}: forward, backward and
  forward+backward, ours against naive PyTorch (out-of-memory is recorded as "OOM").
* model: tinystories-17m at context 4096: one training step (fwd + bwd + AdamW) per backend.

FLOPs: causal forward 4*B*H*T^2*D / 2 (two matmuls, half the tiles); backward counted as 2.5x
the forward (FA2's convention: five matmuls; our kernels really do seven, P being recomputed twice).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ------------------------------------------------------------------------------------- impls


def naive_attention(q, k, v, is_causal=True):
    """softmax(QK^T/sqrt(d) + mask) V, materializing the (T, T) scores."""
    s = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        n_q, n_k = s.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu_(1)
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def fn(q, k, v, is_causal=True):
        with sdpa_kernel(backend):  # (16, T, D) -> (1, 16, T, D): the fused backends want 4-D
            return torch.nn.functional.scaled_dot_product_attention(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=is_causal
            ).squeeze(0)

    return fn


def ours(q, k, v, is_causal=True):
    from cs336_systems.flash_attention import FlashAttentionTriton

    return FlashAttentionTriton.apply(q, k, v, is_causal)


def attention_flops(b_h: int, t: int, d: int, is_causal: bool = True) -> tuple[float, float]:
    """(forward, backward) FLOPs of attention over b_h heads (backward = 2.5x forward)."""
    fwd = 4.0 * b_h * t * t * d / (2 if is_causal else 1)
    return fwd, 2.5 * fwd


# ------------------------------------------------------------------------------------ timing


def _bench(fn, warmup_ms: float, rep_ms: float) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def time_fwd_bwd(fn, q, k, v, warmup_ms, rep_ms, grad: str = "sum") -> dict:
    """Median ms of forward (graph built), backward alone, and forward+backward. OOM -> "OOM"."""
    out = {}
    try:
        if grad == "sum":
            step = lambda: fn(q, k, v).sum().backward()
        else:
            do = torch.randn_like(q)
            step = lambda: fn(q, k, v).backward(do)
        out["fwd_bwd"] = _bench(step, warmup_ms, rep_ms)
        out["fwd"] = _bench(lambda: fn(q, k, v), warmup_ms, rep_ms)
        out["bwd"] = _bench_backward(fn, q, k, v, grad, warmup_ms, rep_ms)
    except torch.OutOfMemoryError:
        out = {"fwd_bwd": "OOM", "fwd": "OOM", "bwd": "OOM"} | {k: v for k, v in out.items()}
    torch.cuda.empty_cache()
    return out


def _bench_backward(fn, q, k, v, grad, warmup_ms, rep_ms) -> float:
    o = fn(q, k, v)
    loss = o.sum() if grad == "sum" else (o * torch.randn_like(o)).sum()
    return _bench(lambda: loss.backward(retain_graph=True), warmup_ms, rep_ms)


def fp64_reference_grads(q, k, v, do, is_causal=True):
    """O, dQ, dK, dV in float64, one head at a time (the leading dim)."""
    outs = [[], [], [], []]
    for i in range(q.shape[0]):
        q64, k64, v64 = (t[i].detach().double().requires_grad_() for t in (q, k, v))
        o = naive_attention(q64, k64, v64, is_causal)
        o.backward(do[i].double())
        for lst, t in zip(outs, (o.detach(), q64.grad, k64.grad, v64.grad)):
            lst.append(t)
        del o, q64, k64, v64
    return [torch.stack(t) for t in outs]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------- experiments


def leaderboard(heads=16, seq=16384, d=64, warmup_ms=200, rep_ms=1000, naive=True) -> dict:
    from cs336_systems import flash_kernels

    torch.manual_seed(0)
    x = torch.randn(3, heads, seq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = x  # views of one leaf, as the course harness makes them
    res = {"shape": [heads, seq, d], "dtype": "bf16", "is_causal": True, "device": torch.cuda.get_device_name()}
    impls = {"ours": ours, "sdpa_flash": sdpa("flash"), "sdpa_cudnn": sdpa("cudnn")}
    if naive:
        impls["naive"] = naive_attention
    for name, fn in impls.items():
        t = time.time()
        w, r = (warmup_ms, rep_ms) if name != "naive" else (50, 200)
        res[name] = time_fwd_bwd(fn, q, k, v, w, r)
        print(f"leaderboard {name:11s} {res[name]}  ({time.time() - t:.1f}s)", flush=True)
    fwd_flops, bwd_flops = attention_flops(heads, seq, d)
    for name in impls:
        r = res[name]
        if isinstance(r.get("fwd_bwd"), float):
            r["tflops_fwd_bwd"] = (fwd_flops + bwd_flops) / r["fwd_bwd"] / 1e9
            r["tflops_fwd"] = fwd_flops / r["fwd"] / 1e9
            r["tflops_bwd"] = bwd_flops / r["bwd"] / 1e9
    res["configs"] = flash_kernels.best_configs()
    # accuracy of ours on this call's inputs (stride-0 dO from o.sum()), float64 on two heads
    x.grad = None
    o = ours(q, k, v)
    o.sum().backward()
    n = 2
    o_ref, dq_ref, dk_ref, dv_ref = fp64_reference_grads(q[:n], k[:n], v[:n], torch.ones_like(q[:n]))
    res["rel_err_vs_fp64_2heads"] = {
        "O": rel_err(o[:n], o_ref), "dQ": rel_err(x.grad[0, :n], dq_ref),
        "dK": rel_err(x.grad[1, :n], dk_ref), "dV": rel_err(x.grad[2, :n], dv_ref),
    }
    with torch.no_grad():
        res["rel_err_vs_cudnn_O"] = rel_err(o, sdpa("cudnn")(q, k, v).double())
    print("leaderboard errors", res["rel_err_vs_fp64_2heads"], "vs cudnn O", res["rel_err_vs_cudnn_O"], flush=True)
    return res


def tiles(candidates: dict[str, list[tuple]], fixed: dict[str, tuple], kernels=None, heads=16, seq=16384, d=64,
          warmup_ms=25, rep_ms=100, log=True) -> list[dict]:
    """Each kernel's tile configs timed at the leaderboard shape (bf16, causal, dO = ones).

    `candidates` and `fixed` map "fwd" / "dkdv" / "dq" to ``(BLOCK_M, BLOCK_N, warps, stages)``.
    "fwd" rows time ``flash_fwd``; "dkdv" and "dq" rows time the whole ``flash_bwd`` (preprocess,
    dK/dV, dQ) with that kernel's config varied and the other's fixed, so differences between rows
    are the kernel's. Each row also has the error of its outputs against the `fixed` configs' outputs
    (a kernel bug shows as an error far above bf16 rounding, ~1e-3). `kernels`: the module (default
    ``cs336_systems.flash_kernels``; another copy of it can be timed against it in the same process).
    """
    from cs336_systems import flash_kernels

    fk = kernels or flash_kernels
    cfg = lambda t: fk.triton.Config({"BLOCK_M": t[0], "BLOCK_N": t[1]}, num_warps=t[2], num_stages=t[3])
    torch.manual_seed(0)
    x = torch.randn(3, heads, seq, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.unsqueeze(1) for t in x)  # (heads, 1, T, D): the leaderboard's views, as the Function passes them
    do = torch.ones_like(q)
    fk.FORCE_CONFIG.clear()
    fk.FORCE_CONFIG.update({n: cfg(t) for n, t in fixed.items()})
    o_ref, L = fk.flash_fwd(q, k, v, True)
    grads_ref = fk.flash_bwd(q, k, v, o_ref, L, do, True)
    rows = []
    for name, cands in candidates.items():
        for t in cands:
            fk.FORCE_CONFIG.update({n: cfg(c) for n, c in fixed.items()} | {name: cfg(t)})
            row = {"kernel": name, "config": fk.config_name(fk.FORCE_CONFIG[name])}
            try:
                if name == "fwd":
                    fn = lambda: fk.flash_fwd(q, k, v, True)
                    outs, refs = fn()[:1], (o_ref,)
                else:
                    fn = lambda: fk.flash_bwd(q, k, v, o_ref, L, do, True)
                    outs, refs = fn(), grads_ref
                row["max_rel_err_vs_fixed"] = max(rel_err(a, b.double()) for a, b in zip(outs, refs))
                row["nan"] = any(bool(a.isnan().any()) for a in outs)
                row["ms"] = _bench(fn, warmup_ms, rep_ms)
            except Exception as e:  # noqa: BLE001  (a config that does not compile or launch is a row, not the end)
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            if log:
                print("tiles", json.dumps(row), flush=True)
    fk.FORCE_CONFIG.clear()
    return rows


def tile_candidates(d=64, dtype=torch.bfloat16) -> tuple[dict, dict]:
    """The kernels' fitting candidate configs for (d, dtype) as `tiles` tuples, and the first of each."""
    from cs336_systems import flash_kernels as fk

    lists = {"fwd": fk.FWD_CONFIGS, "dkdv": fk.DKDV_CONFIGS, "dq": fk.DQ_CONFIGS}
    cands = {n: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                 for c in fk._candidates(cl, d, dtype)] for n, cl in lists.items()}
    return cands, {n: c[0] for n, c in cands.items()}


def sweep(seqs, dims, dtypes, warmup_ms=5, rep_ms=25) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        for d in dims:
            for seq in seqs:
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, seq, d, device="cuda", dtype=DTYPES[dtype_name], requires_grad=True)
                           for _ in range(3))
                row = {"dtype": dtype_name, "d": d, "seq": seq}
                for name, fn in (("ours", ours), ("pytorch", naive_attention)):
                    row[name] = time_fwd_bwd(fn, q, k, v, warmup_ms, rep_ms, grad="randn")
                rows.append(row)
                print("sweep", json.dumps(row), flush=True)
                del q, k, v
    return rows


def _train_step_ms(cfg, batch: int, steps: int) -> dict:
    from cs336_basics.nn_utils import cross_entropy
    from cs336_basics.optimizer import AdamW
    from cs336_basics.train import build_model

    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cuda"))
    opt = AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    return {"ms_per_step": (time.perf_counter() - t) / steps * 1e3, "loss": loss.item(),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


def model_step(context=4096, batch=8, backends=("sdpa", "flash"), steps=10) -> dict:
    """ms per training step (fwd + bwd + AdamW, bf16 autocast) of tinystories-17m at `context`."""
    from cs336_basics.config import PRESETS

    res = {"context": context, "batch": batch}
    for backend in backends:
        cfg = PRESETS["tinystories-17m"].replace(context_length=context, attn_backend=backend)
        res[backend] = _train_step_ms(cfg, batch, steps)
        print("model", backend, res[backend], flush=True)
        torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------ parallel precompile


def _warm(task) -> str:
    """Compile (and run once) the kernels for one (layout, dtype, d, causal, config index)."""
    layout, dtype_name, d, causal, cfg_idx = task
    from cs336_systems import flash_kernels as fk
    from cs336_systems.flash_attention import FlashAttentionTriton

    dtype = DTYPES[dtype_name]
    fk.force_candidate(cfg_idx, d, dtype)
    t = time.time()
    if layout == "3d":  # (batch, T, D) with T a multiple of 16: the leaderboard's and sweep's specialization
        q, k, v = (torch.randn(2, 256, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    elif layout == "3d_odd":  # T not a multiple of 16
        q, k, v = (torch.randn(2, 200, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    else:  # the model's (B, H, T, D) view of a (B, T, H, D) buffer
        q, k, v = (torch.randn(2, 256, 16, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
                   for _ in range(3))
    o = FlashAttentionTriton.apply(q, k, v, causal)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    return f"{task} {time.time() - t:.1f}s"


def _warm_tile(task) -> str:
    """Compile one `tiles` row's kernels (module name, kernel name, config, fixed configs) at a small shape."""
    import importlib

    module, name, config, fixed = task
    t = time.time()
    row = tiles({name: [config]}, fixed, importlib.import_module(module), heads=2, seq=256, warmup_ms=1, rep_ms=1,
                log=False)[0]
    return f"{module} {name} {config} {time.time() - t:.1f}s {row.get('error', '')}"


def prewarm(tasks, workers: int = 12, warm=_warm) -> None:
    """Compile the kernels of `tasks` in parallel processes (``warm(task)`` in each); they land in
    Triton's disk cache."""
    t = time.time()
    env_autotune = os.environ.get("CS336_FLASH_AUTOTUNE")
    os.environ["CS336_FLASH_AUTOTUNE"] = "0"  # children: no tuning, just the forced/first config
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=get_context("spawn")) as ex:
            for line in ex.map(warm, tasks):
                print("prewarm", line, flush=True)
    finally:
        if env_autotune is None:
            os.environ.pop("CS336_FLASH_AUTOTUNE")
        else:
            os.environ["CS336_FLASH_AUTOTUNE"] = env_autotune
    print(f"prewarm: {len(tasks)} tasks in {time.time() - t:.1f}s", flush=True)


def prewarm_tasks(what: list[str], dims, dtypes, lb_d: int = 64) -> list[tuple]:
    from cs336_systems.flash_kernels import MAX_TUNED_CONFIGS

    tasks = []
    if "leaderboard" in what:
        tasks += [("3d", "bf16", lb_d, True, i) for i in range(MAX_TUNED_CONFIGS)]
    if "sweep" in what:
        tasks += [("3d", dt, d, True, 0) for dt in dtypes for d in dims if not (dt == "bf16" and d == 64)]
    if "model" in what:
        tasks += [("4d", "bf16", 32, True, i) for i in range(MAX_TUNED_CONFIGS)]
    return tasks


# ---------------------------------------------------------------------------------------- CLI


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cs336-systems flash-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=("leaderboard", "tiles", "sweep", "model"))
    p.add_argument("--out", default="flash_bench.json", help="JSON results file")
    p.add_argument("--seqs", default=",".join(str(2**i) for i in range(7, 17)), help="sweep sequence lengths")
    p.add_argument("--dims", default="16,32,64,128", help="sweep head dims")
    p.add_argument("--dtypes", default="bf16,fp32", help="sweep dtypes")
    p.add_argument("--no-naive", action="store_true", help="leaderboard: skip naive PyTorch")
    p.add_argument("--lb-shape", default="16,16384,64",
                   help="leaderboard HEADS,SEQ,D (heads = batch x heads; 2048,256,32 is the tinystories-17m "
                        "training step's attention: batch 128 x 16 heads, context 256, head dim 32)")
    p.add_argument("--prewarm", type=int, default=12, help="processes compiling kernels ahead (0 = off)")
    p.add_argument("--sweep-autotune", action="store_true", help="tune tiles for every sweep shape (slow)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("flash-bench needs a CUDA GPU")
    seqs = [int(s) for s in args.seqs.split(",")]
    dims = [int(s) for s in args.dims.split(",")]
    dtypes = args.dtypes.split(",")
    if args.prewarm:
        prewarm(prewarm_tasks(args.what, dims, dtypes, int(args.lb_shape.split(",")[2])), args.prewarm)
    cands, fixed = tile_candidates()
    if args.prewarm and "tiles" in args.what:
        tasks = [("cs336_systems.flash_kernels", n, t, fixed) for n, ts in cands.items() for t in ts]
        prewarm(tasks, args.prewarm, warm=_warm_tile)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    results["triton"] = triton.__version__

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if "leaderboard" in args.what:
        heads, seq, d = (int(s) for s in args.lb_shape.split(","))
        results["leaderboard"] = leaderboard(heads, seq, d, naive=not args.no_naive)
        save()
    if "tiles" in args.what:
        results["tiles"] = tiles(cands, fixed)
        save()
    if "model" in args.what:
        results["model"] = model_step()
        save()
    if "sweep" in args.what:
        if not args.sweep_autotune:
            os.environ["CS336_FLASH_AUTOTUNE"] = "0"
        results["sweep"] = sweep(seqs, dims, dtypes)
        save()
    save()
    print(summary(results))
    return 0


def _fmt(x) -> str:
    return f"{x:8.3f}" if isinstance(x, float) else f"{x!s:>8}"


def summary(results: dict) -> str:
    lines = []
    lb = results.get("leaderboard")
    if lb:
        lines.append(f"leaderboard {lb['shape']} bf16 causal on {lb['device']}: median ms (TFLOP/s fwd+bwd)")
        for name in ("ours", "sdpa_flash", "sdpa_cudnn", "naive"):
            if name in lb:
                r = lb[name]
                lines.append(f"  {name:11s} fwd+bwd {_fmt(r.get('fwd_bwd'))} fwd {_fmt(r.get('fwd'))} "
                             f"bwd {_fmt(r.get('bwd'))}  ({r.get('tflops_fwd_bwd', 0):.0f})")
    if "model" in results:
        lines.append(f"model: {results['model']}")
    if "sweep" in results:
        lines.append("sweep (ms): dtype d seq | ours fwd bwd fwd+bwd | pytorch fwd bwd fwd+bwd")
        for r in results["sweep"]:
            o, t = r["ours"], r["pytorch"]
            lines.append(f"  {r['dtype']} {r['d']:4d} {r['seq']:6d} | {_fmt(o.get('fwd'))}{_fmt(o.get('bwd'))}"
                         f"{_fmt(o.get('fwd_bwd'))} | {_fmt(t.get('fwd'))}{_fmt(t.get('bwd'))}{_fmt(t.get('fwd_bwd'))}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.exit(cli_main())
