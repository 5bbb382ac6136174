"""SwiGLU's elementwise gate ``silu(a) · b`` (Shazeer 2020) as two Triton kernels behind one
autograd Function; the three matmuls around it (``a = W1 x``, ``b = W3 x``, ``W2 (.)``) stay cuBLAS.

In PyTorch ops (``model.silu(a) * b``) the forward is three passes over the ``(N, d_ff)``
activations (sigmoid, product, product) and autograd's backward about five more. Here the forward
reads ``a`` and ``b`` once and writes the product; the backward reads ``a``, ``b`` and the upstream
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
BLOCK = 2048  # elements per program


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(a_ptr, b_ptr, grad_ptr, grad_a_ptr, grad_b_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    tl.store(grad_a_ptr + offs, (g * b * sig * (1.0 + a * (1.0 - sig))).to(grad_a_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_b_ptr + offs, (g * a * sig).to(grad_b_ptr.dtype.element_ty), mask=mask)


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        a, b = a.contiguous(), b.contiguous()  # matmul outputs already are: no copy
        out = torch.empty_like(a)
        n = a.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, out, n, BLOCK=BLOCK, num_warps=8)
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        a, b = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](a, b, grad_out, grad_a, grad_b, n, BLOCK=BLOCK, num_warps=8)
        return grad_a, grad_b


def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """``silu(a) · b`` for ``a``, ``b`` of one shape and one dtype in `SUPPORTED_DTYPES`."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"silu_mul needs one shape and dtype, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    return _SiLUMul.apply(a, b)
