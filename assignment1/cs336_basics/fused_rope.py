"""Rotary position embeddings (RoPE, Su et al. 2021) as one Triton kernel behind a differentiable operator.

The model's convention rotates *adjacent* pairs: ``(x[2i], x[2i+1])`` of each head vector by the
angle ``pos · theta^(-2i/D)``, i.e. ``(x₁ cos - x₂ sin, x₁ sin + x₂ cos)``. In PyTorch ops
(``model.RotaryPositionalEmbedding``) that is two gathers of the cos/sin tables, four fp32 products,
a sum, a difference, a stack and a cast, each a full pass over q or k. Here one pass reads ``x``
and the table rows its positions pick and writes the rotated ``x`` in ``x``'s dtype, fp32
arithmetic. The backward is the same kernel with the inverse rotation (``sin → -sin``) and needs
nothing saved but the positions. Outputs and gradients keep their input's layout, so for q/k made
as a transposed view of a projection's output nothing is copied on the way to attention or back.

``cs336_basics.model.RotaryPositionalEmbedding`` calls this on CUDA (CPU tensors too under
``TRITON_INTERPRET=1``, as in the tests), and under ``torch.compile`` when ``"fused_rope"`` is in
``model.COMPILED_KERNELS`` (it is an operator, so the graph stays whole). Positions must lie in
``[0, max_seq_len)`` of the tables: they are not checked on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cs336_basics.triton_support import kernel_op, launch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_PAIRS = 2048  # (position, pair) entries per program: BLOCK_T positions × the padded D/2


@triton.jit
def _rope_kernel(x_ptr, sx_b, sx_h, sx_t, out_ptr, so_b, so_h, so_t, pos_ptr, sp_b, sp_h, sp_t,
                 cos_ptr, sin_ptr, H, T, sign, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One (batch, head) and BLOCK_T positions of a ``(B, H, T, D)`` tensor, last dim contiguous
    (in and out); ``sign`` -1 rotates backwards. cos/sin: ``(max_seq_len, HALF)`` contiguous.

    Each row of ``x`` is read and written whole (contiguous, vectorized accesses) and split into
    its even/odd lanes in registers: loading ``x[2i]`` and ``x[2i+1]`` as two stride-2 gathers
    instead ran at ~0.3 TB/s on an H200 (3.75 ms of a 21 ms training step)."""
    sign = tl.cast(sign, tl.float32)  # inductor (torch 2.11) passes Python floats as fp64
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    d = tl.arange(0, 2 * BLOCK_HALF)
    row_ok = ts[:, None] < T
    pair_mask = row_ok & (i[None, :] < HALF)
    lane_mask = row_ok & (d[None, :] < 2 * HALF)
    pos = tl.load(pos_ptr + b * sp_b + h * sp_h + ts * sp_t, mask=ts < T, other=0)
    angle_offs = pos[:, None] * HALF + i[None, :]
    cos = tl.load(cos_ptr + angle_offs, mask=pair_mask, other=0.0)
    sin = tl.load(sin_ptr + angle_offs, mask=pair_mask, other=0.0) * sign
    x = tl.load(x_ptr + b * sx_b + h * sx_h + ts[:, None] * sx_t + d[None, :], mask=lane_mask, other=0.0)
    x1, x2 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_T, BLOCK_HALF, 2)))  # even, odd lanes
    rotated = tl.reshape(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), (BLOCK_T, 2 * BLOCK_HALF))
    out = out_ptr + b * so_b + h * so_h + ts[:, None] * so_t + d[None, :]
    tl.store(out, rotated.to(out_ptr.dtype.element_ty), mask=lane_mask)


def _as_4d(t: Tensor) -> Tensor:
    """``(..., T, D)`` as ``(B, H, T, D)``: views for up to 4 dims, a reshape beyond."""
    return t[(None,) * (4 - t.dim())] if t.dim() <= 4 else t.reshape(-1, *t.shape[-3:])


def _rotate(x: Tensor, out: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, sign: float) -> None:
    """``out = rotate(x)`` over 4-d tensors of one shape with unit last-dim strides; ``pos`` ``(B, H, T)``."""
    b, h, t, d = x.shape
    half = d // 2
    block_half = triton.next_power_of_2(half)
    block_t = min(max(1, BLOCK_PAIRS // block_half), triton.next_power_of_2(t))
    launch(_rope_kernel)[(b * h, triton.cdiv(t, block_t))](
        x, x.stride(0), x.stride(1), x.stride(2), out, out.stride(0), out.stride(1), out.stride(2),
        pos, pos.stride(0), pos.stride(1), pos.stride(2), cos, sin, h, t, sign, HALF=half,
        BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=4)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotated_like(x: Tensor) -> Tensor:
    """The output buffer for ``x``: ``empty_like`` of its 4-d view (``x``'s layout when dense)."""
    return torch.empty_like(_unit_last_stride(_as_4d(x))).view(x.shape)


def _rotated(x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """``x`` rotated (``sign`` 1) or rotated back (-1), in a new tensor with ``x``'s layout."""
    x4 = _unit_last_stride(_as_4d(x))
    out = torch.empty_like(x4)
    _rotate(x4, out, pos, cos, sin, sign)
    return out.view(x.shape)


# Under torch.compile: the operator (inductor launches the kernel itself). In eager mode: a plain
# autograd Function around the same code, because an operator call costs ~25 us of host time against
# ~3 us for the Function (measured on CPU), and the eager training step is host-bound.
_rope_op = kernel_op("cs336_basics::rope", lambda x, pos, cos, sin, sign: _rotated_like(x))(_rotated)


def _rope_setup(ctx, inputs, output):
    _, pos, cos, sin, sign = inputs
    ctx.save_for_backward(pos, cos, sin)
    ctx.sign = sign


def _rope_backward(ctx, grad_out):
    pos, cos, sin = ctx.saved_tensors
    # the inverse rotation is the transpose; under torch.compile inductor chooses the layouts
    return _rope_op(grad_out, pos, cos, sin, -ctx.sign), None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, pos: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(pos, cos, sin)
        # the gradient's layout: x's own (dense) strides, whatever layout grad_out arrives in (SDPA's
        # backward returns its own), so it reaches the projection without a copy; "meta": no memory
        ctx.grad_strides = torch.empty_like(_unit_last_stride(_as_4d(x)), device="meta").stride()
        return _rotated(x, pos, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pos, cos, sin = ctx.saved_tensors
        g4 = _unit_last_stride(_as_4d(grad_out))
        grad_x = torch.empty_strided(g4.shape, ctx.grad_strides, dtype=g4.dtype, device=g4.device)
        _rotate(g4, grad_x, pos, cos, sin, -1.0)  # the inverse rotation is the transpose
        return grad_x.reshape(grad_out.shape), None, None, None


def rope(x: Tensor, token_positions: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of ``x`` ``(..., T, D)`` (a dtype in `SUPPORTED_DTYPES`) by the angles
    of ``token_positions`` (int, broadcastable to ``x.shape[:-1]``) in the fp32 tables ``cos``/``sin``
    ``(max_seq_len, D/2)``. Returns a tensor of ``x``'s shape, dtype and (when dense) layout: for q/k
    seen as ``(B, H, T, D)`` views of a ``(B, T, H, D)`` projection output, another such view.
    An operator (`kernel_op`), so ``torch.compile`` runs this kernel too instead of its own fusion."""
    pos = _as_4d(torch.broadcast_to(token_positions, x.shape[:-1]).unsqueeze(-1))[..., 0]  # (B, H, T)
    if torch.compiler.is_compiling():
        return _rope_op(x, pos, cos.contiguous(), sin.contiguous(), 1.0)
    return _RoPE.apply(x, pos, cos.contiguous(), sin.contiguous())
