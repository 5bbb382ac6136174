"""Attention benchmark: naive vs ``torch.compile``d vs PyTorch SDPA vs our FlashAttention-2.

The course's setting: batch 8, one head (inputs ``(B, T, D)``), causal, over sequence lengths
256…16384 and head dims 16…128. For each implementation and shape: forward time, backward time
(the forward of each backward iteration is not timed), peak memory during the forward, and the
memory held right before the backward (what the forward saved for it). An OOM is recorded in
the row and the sweep goes on.

- ``naive``: ``cs336_basics.model.scaled_dot_product_attention`` with a causal mask (the
  assignment-1 implementation, materializing the T x T scores);
- ``compiled``: the same function through ``torch.compile``;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on
  ``(B, 1, T, D)`` (4-D, so that its fused kernels can run);
- ``flash``: ``cs336_systems.flash_attention.flash_attn_mha``, when that module exists.

    cs336-systems attention-bench                                  # the full sweep, CUDA
    cs336-systems attention-bench --seq-lens 64 128 --head-dims 16 --device cpu --impl naive sdpa
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cs336_systems.benchmark import (
    Clock,
    free_device_memory,
    is_oom,
    markdown_table,
    mean_std,
    mib,
    run_meta,
)

AttnImpl = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]  # (B, T, D) x3 -> (B, T, D)
IMPLS = ("naive", "compiled", "sdpa", "flash")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The assignment-1 attention with a causal mask, ``(B, T, D)``."""
    from cs336_basics.model import causal_mask, scaled_dot_product_attention

    return scaled_dot_product_attention(q, k, v, causal_mask(q.shape[-2], k.shape[-2], q.device))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention. Its fused kernels take only 4-D ``(B, H, T, D)`` inputs (3-D ones
    silently fall back to the math kernel, which materializes the T x T matrix), so add H = 1."""
    return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]


def flash_available() -> bool:
    try:
        return hasattr(importlib.import_module("cs336_systems.flash_attention"), "flash_attn_mha")
    except Exception:  # noqa: BLE001 - optional: missing, or its imports (Triton) fail here
        return False


def make_impl(name: str, compile_backend: str = "inductor") -> AttnImpl:
    """The attention function called ``name`` (``(B, T, D)`` in and out)."""
    if name == "naive":
        return naive_attention
    if name == "compiled":
        return torch.compile(naive_attention, backend=compile_backend)
    if name == "sdpa":
        return sdpa_attention
    if name == "flash":
        if not flash_available():
            raise ValueError(
                "impl 'flash' needs cs336_systems.flash_attention.flash_attn_mha, not found"
            )
        flash_attn_mha = importlib.import_module("cs336_systems.flash_attention").flash_attn_mha
        return lambda q, k, v: flash_attn_mha(q[:, None], k[:, None], v[:, None], is_causal=True)[
            :, 0
        ]
    raise ValueError(f"unknown attention impl {name!r}; choose from {', '.join(IMPLS)}")


@dataclass(frozen=True)
class AttnShape:
    batch_size: int
    seq_len: int
    head_dim: int
    dtype: str = "fp32"


def bench_attention(
    fn: AttnImpl, shape: AttnShape, device: torch.device, warmup: int, steps: int
) -> dict[str, Any]:
    """Time ``steps`` forwards and ``steps`` backwards after ``warmup`` of each; OOM -> status."""
    row: dict[str, Any] = {"status": "ok"}
    clock, cuda = Clock(device), device.type == "cuda"
    dtype = DTYPES[shape.dtype]
    try:
        q, k, v = (
            torch.randn(
                shape.batch_size,
                shape.seq_len,
                shape.head_dim,
                device=device,
                dtype=dtype,
                requires_grad=True,
            )
            for _ in range(3)
        )
        grad_out = torch.randn_like(q)

        times = []
        for i in range(warmup + steps):
            clock.sync()
            start = clock.mark()
            fn(q, k, v)  # the output (and the graph it holds) is freed right away
            end = clock.mark()
            clock.sync()
            if i >= warmup:
                times.append(clock.ms(start, end))
        row["forward_ms"], row["forward_std_ms"] = mean_std(times)

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        out = fn(q, k, v)
        if cuda:
            clock.sync()
            row["forward_peak_mib"] = mib(torch.cuda.max_memory_allocated(device) - before)
            row["saved_for_backward_mib"] = mib(torch.cuda.memory_allocated(device) - before)
        row["status"] = "backward"  # what an OOM from here on is charged to
        times = []
        for i in range(warmup + steps):
            if i:  # the first iteration reuses the forward measured above
                out = fn(q, k, v)
            clock.sync()
            start = clock.mark()
            out.backward(grad_out)
            end = clock.mark()
            clock.sync()
            q.grad = k.grad = v.grad = None
            if i >= warmup:
                times.append(clock.ms(start, end))
        row["backward_ms"], row["backward_std_ms"] = mean_std(times)
        row["status"] = "ok"
    except Exception as exc:
        if not is_oom(exc):
            raise
        row["status"] = "OOM (backward)" if row["status"] == "backward" else "OOM"
    finally:
        free_device_memory()
    return row


def run_sweep(
    impls: Sequence[str],
    seq_lens: Sequence[int],
    head_dims: Sequence[int],
    *,
    batch_size: int = 8,
    dtype: str = "fp32",
    device: str = "cuda",
    warmup: int = 5,
    steps: int = 20,
    compile_backend: str = "inductor",
    log: Callable[[str], None] = lambda s: None,
    on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict[str, Any]]:
    """Every impl x seq_len x head_dim; validation of every name happens before anything runs.

    ``log`` gets one line per row, ``on_row`` the rows so far after each one (the CLI saves them,
    so a sweep cut short keeps what it measured).
    """
    for name in impls:
        if name not in IMPLS:
            raise ValueError(f"unknown attention impl {name!r}; choose from {', '.join(IMPLS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    fns = {name: make_impl(name, compile_backend) for name in impls}
    dev = torch.device(device)
    rows = []
    for name in impls:
        for t in seq_lens:
            for d in head_dims:
                start = time.perf_counter()
                row = {"impl": name, "seq_len": t, "head_dim": d, "batch_size": batch_size}
                try:
                    shape = AttnShape(batch_size, t, d, dtype)
                    row.update(dtype=dtype, **bench_attention(fns[name], shape, dev, warmup, steps))
                except Exception as exc:  # noqa: BLE001 - a broken impl must not end the sweep
                    row["status"] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
                    traceback.print_exc(file=sys.stderr)
                rows.append(row)
                on_row(rows)
                seconds = time.perf_counter() - start
                times = f"fwd {_cell(row, 'forward')} bwd {_cell(row, 'backward')} ms"
                log(f"{name:>8} T={t:<6} d={d:<4} {row['status']}: {times} ({seconds:.1f} s)")
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    if f"{key}_ms" in row:
        return f"{row[f'{key}_ms']:.3f} ± {row[f'{key}_std_ms']:.3f}"
    return row["status"].split(":")[0]


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ["impl", "seq", "d", "fwd ms", "bwd ms", "fwd peak MiB", "saved for bwd MiB"]
    lines = [
        [
            r["impl"],
            str(r["seq_len"]),
            str(r["head_dim"]),
            _cell(r, "forward"),
            _cell(r, "backward"),
            f"{r['forward_peak_mib']:.0f}" if "forward_peak_mib" in r else "-",
            f"{r['saved_for_backward_mib']:.0f}" if "saved_for_backward_mib" in r else "-",
        ]
        for r in rows
    ]
    return markdown_table(header, lines)


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Forward+backward time vs sequence length, one panel per head dim, one line per impl."""
    from matplotlib.figure import Figure

    head_dims = sorted({r["head_dim"] for r in rows})
    fig = Figure(figsize=(3.2 * len(head_dims), 3.4), layout="constrained")
    axes = fig.subplots(1, len(head_dims), squeeze=False)[0]
    for ax, d in zip(axes, head_dims):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [
                (r["seq_len"], r["forward_ms"] + r["backward_ms"])
                for r in rows
                if r["impl"] == impl and r["head_dim"] == d and r["status"] == "ok"
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", title=f"d = {d}", xlabel="sequence length")
        ax.set_ylabel("fwd + bwd ms")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="cs336-systems attention-bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--impl",
        nargs="+",
        default=None,
        choices=IMPLS,
        help="default: naive compiled sdpa (+ flash when cs336_systems.flash_attention exists)",
    )
    p.add_argument("--seq-lens", nargs="+", type=int, default=[256, 1024, 4096, 8192, 16384])
    p.add_argument("--head-dims", nargs="+", type=int, default=[16, 32, 64, 128])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, default=Path("runs/attention_bench"))
    args = p.parse_args(argv)
    impls = args.impl or ["naive", "compiled", "sdpa"] + (["flash"] if flash_available() else [])
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(args.device)

    def save(rows: list[dict[str, Any]]) -> None:
        payload = {"meta": meta, "rows": rows}
        (args.out / "attention_bench.json").write_text(json.dumps(payload, indent=1) + "\n")

    try:
        rows = run_sweep(
            impls,
            args.seq_lens,
            args.head_dims,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device,
            warmup=args.warmup,
            steps=args.steps,
            compile_backend=args.compile_backend,
            log=lambda s: print(s, file=sys.stderr, flush=True),
            on_row=save,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plot_results(rows, args.out / "attention_bench.png")
    print(results_table(rows))
    print(f"\nwrote {args.out / 'attention_bench.json'} and {args.out / 'attention_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
