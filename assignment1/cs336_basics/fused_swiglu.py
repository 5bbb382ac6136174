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
tensors too under ``TRITON_INTERPRET=1``, as in the tests), and under ``torch.compile`` where
``"fused_swiglu"`` is in ``model.COMPILED_KERNELS`` (the packed gate, an operator).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cs336_basics.triton_support import kernel_op, launch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _tiles(f: int) -> tuple[int, int]:
    """(ROWS, COLS) of a program's 2048-element tile over ``(N, F)``: COLS = 64 for F >= 64
    (1344 = 21 x 64: no ragged column tile at the course's d_ff; rows stay 128-byte runs)."""
    cols = 64 if f >= 64 else triton.next_power_of_2(f)
    return 2048 // cols, cols


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, out_ptr, n_rows, F, stride_in, stride_out,
                       PACKED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``out = silu(a) · b`` over (N, F): a, b rows ``stride_in`` apart, out rows ``stride_out``.
    PACKED: a and b are the two halves of one ``(N, 2F)`` tensor at ``a_ptr`` (``b_ptr`` unused)."""
    if PACKED:
        b_ptr = a_ptr + F
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]
    mask = (rows < n_rows) & (cols < F)
    a = tl.load(a_ptr + rows * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(a_ptr, b_ptr, grad_ptr, grad_a_ptr, grad_b_ptr, n_rows, F, stride_in, stride_grad,
                       PACKED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``grad_a, grad_b`` (rows ``stride_in`` apart, like a and b) from the upstream gradient.
    PACKED: also the gradients are the two halves of one tensor, at ``grad_a_ptr``."""
    if PACKED:
        b_ptr = a_ptr + F
        grad_b_ptr = grad_a_ptr + F
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


# The launches take whole tensors, never slices or reshapes of them: inside an operator body
# (`kernel_op`) inductor copied each such view before the kernel (or, for one it writes, after),
# three copies, 0.25 ms per layer for the packed gate (H200).


def _grid(n: int, f: int) -> tuple[tuple[int, int], dict]:
    rows, cols = _tiles(f)
    return (triton.cdiv(n, rows), triton.cdiv(f, cols)), {"ROWS": rows, "COLS": cols, "num_warps": 8}


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        a, b = a.contiguous(), b.contiguous()  # matmul outputs already are: no copy
        out = torch.empty_like(a)
        f = a.shape[-1]
        n = a.numel() // f
        grid, meta = _grid(n, f)
        _swiglu_fwd_kernel[grid](a, b, out, n, f, f, f, PACKED=False, **meta)
        ctx.save_for_backward(a, b)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        a, b = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        f = a.shape[-1]
        n = a.numel() // f
        grid, meta = _grid(n, f)
        _swiglu_bwd_kernel[grid](a, b, grad_out, grad_a, grad_b, n, f, f, f, PACKED=False, **meta)
        return grad_a, grad_b


def _packed_gate(ab: Tensor) -> Tensor:
    """``silu(a) · b`` (..., F) for ``ab`` (..., 2F) contiguous."""
    f = ab.shape[-1] // 2
    n = ab.numel() // (2 * f)
    out = ab.new_empty((*ab.shape[:-1], f))
    grid, meta = _grid(n, f)
    launch(_swiglu_fwd_kernel)[grid](ab, ab, out, n, f, 2 * f, f, PACKED=True, **meta)
    return out


def _packed_gate_grad(ab: Tensor, grad_out: Tensor) -> Tensor:
    """The gradient of `_packed_gate` wrt ``ab``, one ``(..., 2F)`` tensor (no ``cat`` of two halves,
    which inductor lowered to a pointwise kernel 0.03 ms per layer slower than this one, H200)."""
    f = ab.shape[-1] // 2
    n = ab.numel() // (2 * f)
    grad_out = grad_out.contiguous()
    grad = torch.empty_like(ab)
    grid, meta = _grid(n, f)
    launch(_swiglu_bwd_kernel)[grid](ab, ab, grad_out, grad, ab, n, f, 2 * f, f, PACKED=True, **meta)
    return grad


# Under torch.compile: operators (inductor launches the kernels itself). In eager mode: an autograd
# Function around the same code (an operator call costs host time; see fused_rope).
def _gate_fake(ab: Tensor) -> Tensor:
    return ab.new_empty((*ab.shape[:-1], ab.shape[-1] // 2))


_packed_gate_op = kernel_op("cs336_basics::silu_mul_packed", _gate_fake)(_packed_gate)
_packed_gate_grad_op = kernel_op("cs336_basics::silu_mul_packed_grad", lambda ab, g: torch.empty_like(ab))(
    _packed_gate_grad)


def _gate_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gate_backward(ctx, grad_out):
    return _packed_gate_grad_op(ctx.saved_tensors[0], grad_out)


_packed_gate_op.register_autograd(_gate_backward, setup_context=_gate_setup)


class _SiLUMulPacked(torch.autograd.Function):
    """The gate on the halves of one ``(..., 2F)`` tensor; its gradient comes back as one tensor."""

    @staticmethod
    def forward(ctx, ab: Tensor) -> Tensor:
        ctx.save_for_backward(ab)
        return _packed_gate(ab)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ab,) = ctx.saved_tensors
        return _packed_gate_grad(ab, grad_out)


def silu_mul(a: Tensor, b: Tensor) -> Tensor:
    """``silu(a) · b`` for ``a``, ``b`` of one shape and one dtype in `SUPPORTED_DTYPES`."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"silu_mul needs one shape and dtype, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    if torch.compiler.is_compiling():  # the operator takes the two halves of one tensor
        return _packed_gate_op(torch.cat([a, b], dim=-1))
    return _SiLUMul.apply(a, b)


def silu_mul_packed(ab: Tensor) -> Tensor:
    """``silu(a) · b`` where ``a, b = ab.chunk(2, dim=-1)`` (``ab`` of a dtype in `SUPPORTED_DTYPES`):
    what `cs336_basics.model.SwiGLU` computes from its one ``[W1; W3]`` matmul. Under ``torch.compile``
    an operator (`kernel_op`), so inductor launches these kernels instead of its own fusion."""
    if ab.shape[-1] % 2:
        raise ValueError(f"silu_mul_packed needs an even last dimension (a, then b), got {tuple(ab.shape)}")
    ab = ab.contiguous()  # a matmul output already is: no copy
    return _packed_gate_op(ab) if torch.compiler.is_compiling() else _SiLUMulPacked.apply(ab)
