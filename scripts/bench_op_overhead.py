"""Host time of one call through each way of wrapping a kernel: ``torch.library.triton_op``,
``torch.library.custom_op``, a ``torch.autograd.Function``, and a bare ``torch.empty_like`` (what the
bodies do). The bodies allocate the output only, so the numbers are dispatch overhead: in a
host-bound eager training step it is paid once per call, forward and backward.

    python scripts/bench_op_overhead.py --out op_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


@torch.library.triton_op("bench_overhead::tri", mutates_args=())
def _tri(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("bench_overhead::cus", mutates_args=())
def _cus(x: torch.Tensor, s: float) -> torch.Tensor:
    return torch.empty_like(x)


_cus.register_fake(lambda x, s: torch.empty_like(x))


def _setup(ctx, inputs, output):
    ctx.s = inputs[1]


for _op in (_tri, _cus):
    _op.register_autograd(lambda ctx, g, op=_op: (op(g, -ctx.s), None), setup_context=_setup)


class _Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        return torch.empty_like(g), None


def time_us(fn, iters: int) -> float:
    for _ in range(iters // 10):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=5000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    x = torch.randn(8, device=args.device, requires_grad=True)
    rows = [{"wrapper": name, "us_per_call": round(time_us(fn, args.iters), 2)} for name, fn in (
        ("triton_op", lambda: _tri(x, 1.0)), ("custom_op", lambda: _cus(x, 1.0)),
        ("autograd.Function", lambda: _Fn.apply(x, 1.0)), ("empty_like (the body)", lambda: torch.empty_like(x)))]
    print(f"{'wrapper':<24}{'us per call':>12}")
    for r in rows:
        print(f"{r['wrapper']:<24}{r['us_per_call']:>12.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
