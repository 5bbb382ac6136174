"""SwiGLU's elementwise gate ``silu(a) · b`` (Shazeer 2020) as two Triton kernels behind an
autograd Function; the matmuls around it (``[a, b] = [W1; W3] x``, ``W2 (.)``) stay cuBLAS.

In PyTorch ops (``model.silu(a) * b``) the forward is three passes over the ``(N, d_ff)``
activations (sigmoid, product, product) and autograd's backward about five more. Here the forward
reads ``a`` and ``b`` once and writes the product (``a`` and ``b`` may be the two halves of one
``(..., 2F)`` matmul output, `silu_mul_packed`); the backward reads ``a``, ``b`` and the upstream
gradient once and writes both gradients, recomputing ``sigmoid(a)`` instead of saving it:

    d/da [a σ(a) b] = b · σ(a) · (1 + a (1 - σ(a))),     d/db = a σ(a).

Arithmetic is fp32, results in the inputs' dtype (PyTorch ops under bf16 autocast round each
intermediate to bf16; these round once). ``cs336_basics.model.SwiGLU`` calls this on CUDA (CPU
tensors too under ``TRITON_INTERPRET=1``, as in the tests) outside ``torch.compile``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tiles(f: int) -> tuple[int, int]:
    """(ROWS, COLS) of a program's 2048-element tile over ``(N, F)``: COLS = 64 for F >= 64
    (1344 = 21 x 64: no ragged column tile at the course's d_ff; rows stay 128-byte runs)."""
    cols = 64 if f >= 64 else triton.next_power_of_2(f)
    return 2048 // cols, cols


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, out_ptr, n_rows, F, stride_in, stride_out,
                       ROWS: tl.constexpr, COLS: tl.constexpr):
    """``out = silu(a) · b`` over (N, F): a, b rows ``stride_in`` apart (``2F`` when they are the two
    halves of one ``(N, 2F)`` buffer), out rows ``stride_out``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]
    mask = (rows < n_rows) & (cols < F)
    a = tl.load(a_ptr + rows * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(a_ptr, b_ptr, grad_ptr, grad_a_ptr, grad_b_ptr, n_rows, F, stride_in, stride_grad,
                       ROWS: tl.constexpr, COLS: tl.constexpr):
    """``grad_a, grad_b`` (rows ``stride_in`` apart, like a and b) from the upstream gradient."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]
    mask = (rows < n_rows) & (cols < F)
    at = rows * stride_in + cols
    a = tl.load(a_ptr + at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + at, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + rows * stride_grad + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    tl.store(grad_a_ptr + at, (g * b * sig * (1.0 + a * (1.0 - sig))).to(grad_a_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_b_ptr + at, (g * a * sig).to(grad_b_ptr.dtype.element_ty), mask=mask)


def _gate(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = silu(a) · b``; a, b (N, F) with one row stride, out (N, F) contiguous."""
    (n, f), (rows, cols) = a.shape, _tiles(a.shape[1])
    _swiglu_fwd_kernel[(triton.cdiv(n, rows), triton.cdiv(f, cols))](
        a, b, out, n, f, a.stride(0), out.stride(0), ROWS=rows, COLS=cols, num_warps=8)


def _gate_grads(a: Tensor, b: Tensor, grad_out: Tensor, grad_a: Tensor, grad_b: Tensor) -> None:
    """grad_a, grad_b (layout of a, b) from grad_out (N, F) contiguous."""
    (n, f), (rows, cols) = a.shape, _tiles(a.shape[1])
    _swiglu_bwd_kernel[(triton.cdiv(n, rows), triton.cdiv(f, cols))](
        a, b, grad_out, grad_a, grad_b, n, f, a.stride(0), grad_out.stride(0), ROWS=rows, COLS=cols, num_warps=8)


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        a, b = a.contiguous(), b.contiguous()  # matmul outputs already are: no copy
        out = torch.empty_like(a)
        _gate(a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1]), out.view(-1, a.shape[-1]))
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        a, b = ctx.saved_tensors
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        f = a.shape[-1]
        _gate_grads(a.view(-1, f), b.view(-1, f), grad_out.contiguous().view(-1, f), grad_a.view(-1, f),
                    grad_b.view(-1, f))
        return grad_a, grad_b


class _SiLUMulPacked(torch.autograd.Function):
    """The gate on the halves of one ``(..., 2F)`` tensor; its gradient comes back as one tensor
    (no ``cat`` of two halves, as ``chunk`` + `_SiLUMul` would need)."""

    @staticmethod
    def forward(ctx, ab: Tensor) -> Tensor:
        ab = ab.contiguous()
        f = ab.shape[-1] // 2
        rows = ab.view(-1, 2 * f)
        out = ab.new_empty((*ab.shape[:-1], f))
        _gate(rows[:, :f], rows[:, f:], out.view(-1, f))
        ctx.save_for_backward(ab)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ab,) = ctx.saved_tensors
        f = ab.shape[-1] // 2
        rows, grad = ab.view(-1, 2 * f), torch.empty_like(ab)
        grad_rows = grad.view(-1, 2 * f)
        _gate_grads(rows[:, :f], rows[:, f:], grad_out.contiguous().view(-1, f), grad_rows[:, :f], grad_rows[:, f:])
        return grad


def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """``silu(a) · b`` for ``a``, ``b`` of one shape and one dtype in `SUPPORTED_DTYPES`."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"silu_mul needs one shape and dtype, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    return _SiLUMul.apply(a, b)


def silu_mul_packed(ab: Tensor) -> Tensor:
    """``silu(a) · b`` where ``a, b = ab.chunk(2, dim=-1)`` (``ab`` of a dtype in `SUPPORTED_DTYPES`):
    what `cs336_basics.model.SwiGLU` computes from its one ``[W1; W3]`` matmul."""
    if ab.shape[-1] % 2:
        raise ValueError(f"silu_mul_packed needs an even last dimension (a, then b), got {tuple(ab.shape)}")
    return _SiLUMulPacked.apply(ab)
