"""GPU correctness of the Triton FlashAttention-2 kernels at real sizes (the CPU tests' twin).

Every case draws fresh inputs, fills the kernels' outputs with NaN first (so an unwritten element
shows), runs forward + backward, and reports ||out - ref|| / ||ref|| of O, L, dQ, dK, dV against
float64 attention on the same (rounded) inputs. fp32 runs the dots in tf32 (Triton's default).

    PYTHONPATH=assignment1:assignment2 python scripts/gpu_flash_check.py --out check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

TOL = {"fp32": 5e-3, "bf16": 2e-2}


def reference(q, k, v, do, is_causal):
    """float64 O, L, dQ, dK, dV, one (batch*head) slice at a time."""
    shape = q.shape
    q, k, v, do = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v, do))
    outs = [[] for _ in range(5)]
    for i in range(q.shape[0]):
        q64, k64, v64 = (t[i].detach().double().requires_grad_() for t in (q, k, v))
        s = q64 @ k64.T / math.sqrt(q64.shape[-1])
        if is_causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu_(1), -math.inf)
        o = torch.softmax(s, -1) @ v64
        o.backward(do[i].double())
        for lst, t in zip(outs, (o.detach(), torch.logsumexp(s.detach(), -1), q64.grad, k64.grad, v64.grad)):
            lst.append(t)
    o, L, dq, dk, dv = (torch.stack(t) for t in outs)
    return o.view(shape), L.view(shape[:-1]), dq.view(shape), dk.view(shape), dv.view(shape)


def make(layout, b, t, d, dtype):
    if layout == "4d":  # the model's (B, H, T, D) view of a (B, T, H, D) buffer
        return [torch.randn(b, t, 16, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(3)]
    return [torch.randn(b, t, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]


def run_case(layout, b, t, d, dtype_name, is_causal, grad="randn", config_idx=None):
    from cs336_systems import flash_kernels as fk
    from cs336_systems.flash_attention import FlashAttentionTriton

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    fk.force_candidate(config_idx, d, dtype)
    q, k, v = make(layout, b, t, d, dtype)
    o = FlashAttentionTriton.apply(q, k, v, is_causal)
    L = next(x for x in o.grad_fn.saved_tensors if x.shape == q.shape[:-1])
    if grad == "sum":  # stride-0 dO, as the leaderboard
        o.sum().backward()
        do = torch.ones_like(o)
    else:
        do = torch.randn_like(o)
        o.backward(do)
    refs = reference(q, k, v, do, is_causal)
    names = ("O", "L", "dQ", "dK", "dV")
    errs = {n: float((x.double() - r).norm() / r.norm()) for n, x, r in zip(names, (o, L, q.grad, k.grad, v.grad), refs)}
    nan = any(torch.isnan(x).any().item() for x in (o, L, q.grad, k.grad, v.grad))
    case = {"layout": layout, "shape": list(q.shape), "dtype": dtype_name, "causal": is_causal, "grad": grad,
            "config": None if config_idx is None else {n: fk.config_name(c) for n, c in fk.FORCE_CONFIG.items()}}
    ok = not nan and max(errs.values()) < TOL[dtype_name]
    fk.force_candidate(None)
    return {**case, "rel_err": errs, "nan": nan, "ok": ok}


def cases():
    from cs336_systems.flash_kernels import MAX_TUNED_CONFIGS

    out = []
    for dt in ("fp32", "bf16"):
        for d in (16, 32, 64, 128):
            out.append(("3d", 4, 1040, d, dt, True))  # 1040: not a multiple of any tile >= 32
    out += [("3d", 4, 1040, 64, "bf16", False), ("3d", 4, 1040, 64, "fp32", False),
            ("3d_odd", 4, 1000, 64, "bf16", True), ("4d", 2, 1040, 32, "bf16", True)]
    return out, [("3d", 4, 1040, 64, "bf16", True, "randn", i) for i in range(MAX_TUNED_CONFIGS)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="gpu_flash_check.json")
    p.add_argument("--prewarm", type=int, default=12, help="processes compiling kernels ahead (0 = off)")
    args = p.parse_args(argv)
    os.environ["CS336_FLASH_AUTOTUNE"] = "0"
    from cs336_systems import flash_kernels as fk
    from cs336_systems.flash_bench import prewarm

    fk.POISON_OUTPUTS = True
    plain, per_config = cases()
    if args.prewarm:
        tasks = {("3d" if c[0] == "3d" else c[0], c[4], c[3], c[5], 0) for c in plain}
        tasks |= {("3d", "bf16", 64, True, c[-1]) for c in per_config}
        prewarm(sorted(tasks, key=str), args.prewarm)
    results = []
    t0 = time.time()
    for c in [*plain, ("3d", 4, 1040, 64, "bf16", True, "sum"), *per_config]:
        try:
            results.append(run_case(*c))
        except Exception as e:  # noqa: BLE001  (a compile or launch failure is a failed case, not the end of the run)
            results.append({"case": str(c), "error": f"{type(e).__name__}: {e}"[:500], "ok": False})
            print("FAILED", c, results[-1]["error"], flush=True)
    for r in (r for r in results if "rel_err" in r):
        e = " ".join(f"{n} {x:.1e}" for n, x in r["rel_err"].items())
        cfg = "" if r["config"] is None else " cfg " + " ".join(f"{n}={c}" for n, c in r["config"].items())
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['layout']:6s} {r['shape']!s:20s} {r['dtype']} "
              f"causal={r['causal']!s:5s} grad={r['grad']:5s} | {e}{cfg}")
    print(f"{sum(r['ok'] for r in results)}/{len(results)} cases ok in {time.time() - t0:.1f}s")
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "tolerance": TOL, "cases": results}, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
