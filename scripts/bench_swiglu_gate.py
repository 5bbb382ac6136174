"""SwiGLU's packed gate ``silu(a) · b`` on ``ab`` (N, 2F): our two Triton kernels at several tile
shapes against inductor's fusion of the PyTorch ops (``chunk`` + ``F.silu(a) * b``, whose backward
assembles the (N, 2F) gradient with a ``cat``), forward and backward, at the tinystories-17m shape
(N = 128 x 256, F = 1344, bf16). Prints one row per implementation and writes JSON.

    PYTHONPATH=assignment1 python3 scripts/bench_swiglu_gate.py --out swiglu_tiles.json   # GPU
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
from cs336_basics import fused_swiglu

TILES = [(32, 64, 8), (16, 64, 4), (32, 64, 4), (64, 64, 8), (64, 64, 4), (16, 64, 8), (8, 64, 4), (128, 64, 8),
         (16, 128, 4), (32, 128, 8), (64, 128, 8), (8, 256, 4), (16, 256, 8)]  # (ROWS, COLS, num_warps)


def gate_reference(ab: torch.Tensor) -> torch.Tensor:
    a, b = ab.chunk(2, dim=-1)
    return F.silu(a) * b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128 * 256)
    ap.add_argument("--f", type=int, default=1344)
    ap.add_argument("--out")
    args = ap.parse_args()
    ab = torch.randn(args.n, 2 * args.f, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(args.n, args.f, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(gate_reference)
    leaf = ab.clone().requires_grad_()
    y = compiled(leaf)
    rows = [{"impl": "inductor", "fwd_ms": triton.testing.do_bench(lambda: compiled(ab)),
             "bwd_ms": triton.testing.do_bench(lambda: torch.autograd.grad(y, leaf, g, retain_graph=True))}]
    ref = gate_reference(ab.float()).to(torch.bfloat16)
    default_grid = fused_swiglu._grid
    try:
        for r, c, w in TILES:
            fused_swiglu._grid = lambda n, f, r=r, c=c, w=w: (
                (triton.cdiv(n, r), triton.cdiv(f, c)), {"ROWS": r, "COLS": c, "num_warps": w})
            err = (fused_swiglu._packed_gate(ab).float() - ref.float()).abs().max().item()
            rows.append({"impl": f"ours {r}x{c} w{w}", "fwd_ms": triton.testing.do_bench(lambda: fused_swiglu._packed_gate(ab)),
                         "bwd_ms": triton.testing.do_bench(lambda: fused_swiglu._packed_gate_grad(ab, g)),
                         "max_abs_err": err})
    finally:
        fused_swiglu._grid = default_grid
    print(f"{'impl':<20} {'fwd ms':>8} {'bwd ms':>8}")
    for row in rows:
        print(f"{row['impl']:<20} {row['fwd_ms']:8.4f} {row['bwd_ms']:8.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
