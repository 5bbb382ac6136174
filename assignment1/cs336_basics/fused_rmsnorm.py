"""RMSNorm as two Triton kernels behind one autograd Function.

``y = x · rstd · w`` with ``rstd = 1 / sqrt(mean(x²) + eps)`` over the last dim (Zhang & Sennrich
2019). In PyTorch ops (``model.RMSNorm``) the forward is ~4 full passes over the fp32 activations
(square, mean, scale, gain) and autograd's backward about twice as many. Here the forward reads
each row once and writes ``y`` and the row's ``rstd`` (fp32, saved for backward); the backward reads
``x`` and ``dy`` once and writes ``dx``, while each program sums its rows' share of
``dw = Σ_rows dy · x · rstd`` into one row of a small fp32 buffer, reduced afterwards by ``sum(0)``
(no atomics, so the result does not depend on scheduling). All arithmetic is fp32.

``autocast_output=True`` writes ``y`` in the autocast dtype when autocast is on: for a norm whose
output goes only into Linears, these are exactly the values the Linears' own autocast casts would
make, minus one full-size cast kernel per consuming Linear (forward) and per gradient (backward).
One difference remains: autograd then sums the consuming Linears' gradients in that dtype, not in fp32.

``cs336_basics.model.RMSNorm`` calls this on CUDA (CPU tensors too under ``TRITON_INTERPRET=1``,
as in the tests) outside ``torch.compile``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_ELEMENTS = 4096  # elements per forward/backward tile: BLOCK_M rows of the padded width
BWD_PROGRAMS = 1024  # backward programs at most, i.e. rows of the partial-dw buffer (2 MB at C = 512)


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, x_stride, w_ptr, y_ptr, rstd_ptr, M, C, eps,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < M) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / C + eps)  # fp32 mean of squares; padding adds 0
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, dy_stride, x_ptr, x_stride, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, M, C,
                        rows_per_program, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # rows_per_program is a multiple of BLOCK_M: no overlap
    for r0 in range(0, rows_per_program, BLOCK_M):
        rows = start + r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < C)
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        x_hat = x * rstd[:, None]
        wdy = dy * w[None, :]
        # dx = rstd · (w·dy - x̂ · mean(w·dy · x̂)): the second term is rstd's own dependence on x
        c = tl.sum(wdy * x_hat, axis=1) / C
        dx = (wdy - x_hat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x_hat, axis=0)  # masked rows and columns load 0 and add nothing
    tl.store(dw_partial_ptr + pid * C + cols, dw, mask=cols < C)


def _tile(c: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): whole rows, padded to a power of two, about BLOCK_ELEMENTS per tile."""
    block_c = triton.next_power_of_2(c)
    return max(1, BLOCK_ELEMENTS // block_c), block_c


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``(M, C)`` rows with a unit column stride (a copy only where it has to be)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
        x2 = _rows(x)  # (M, C)
        m, c = x2.shape
        y = torch.empty((m, c), dtype=out_dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block_m, block_c = _tile(c)
        _rmsnorm_fwd_kernel[(triton.cdiv(m, block_m),)](x2, x2.stride(0), weight, y, rstd, m, c, eps,
                                                        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = _rows(dy)
        m, c = x2.shape
        block_m, block_c = _tile(c)
        rows_per_program = triton.cdiv(triton.cdiv(m, BWD_PROGRAMS), block_m) * block_m
        programs = triton.cdiv(m, rows_per_program)
        dx = torch.empty((m, c), dtype=ctx.x_dtype, device=x2.device)
        dw_partial = torch.empty((programs, c), dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd_kernel[(programs,)](dy2, dy2.stride(0), x2, x2.stride(0), weight, rstd, dx, dw_partial, m, c,
                                         rows_per_program, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4)
        return dx.view(ctx.x_shape), dw_partial.sum(0).to(weight.dtype), None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, autocast_output: bool = False) -> Tensor:
    """RMSNorm of ``x`` ``(..., C)`` (a dtype in `SUPPORTED_DTYPES`) with gain ``weight`` ``(C,)``;
    returned in ``x``'s dtype, or in the autocast dtype where ``autocast_output`` and autocast is on."""
    out_dtype = x.dtype
    if autocast_output and torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    return _RMSNorm.apply(x, weight, eps, out_dtype)
