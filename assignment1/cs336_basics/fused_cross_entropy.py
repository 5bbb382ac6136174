"""Cross-entropy over a large vocabulary as two Triton kernels (an operator under torch.compile, an
autograd Function in eager mode).

For the LM loss the (N, V) logits (N = batch × context, V = vocab; 32,768 × 10,000 for the
``tinystories-17m`` preset) dominate memory traffic. In plain PyTorch ops the fp32 loss reads and
writes them about ten times (upcast, max, shift, exp, sum, gather, and as many again backward).
Here the forward reads each row once, in its storage dtype, with an online softmax (running max and
sum per lane) and keeps only the row's log-sum-exp; the backward reads the row once more and writes
``(softmax - onehot) · dL/dloss / N`` straight into the gradient, in the logits' dtype. All
arithmetic is fp32, as in ``nn_utils.cross_entropy_torch``.

``cs336_basics.nn_utils.cross_entropy`` calls this on CUDA when Triton imports (CPU tensors too
under ``TRITON_INTERPRET=1``, as in the tests). Targets must lie in ``[0, V)``: they are not
checked on the device (the training loop checks its data's token ids once).

``linear_cross_entropy(h, weight, targets)`` also takes in the LM head (``logits = h Wᵀ``). Its
forward computes each row's loss and ``G = softmax - onehot`` (unscaled) in one kernel; the
backward folds ``dL/dloss / N`` into the two head GEMMs' outputs (``dh = s·G W``, ``dW = s·Gᵀ h``,
small tensors) instead of a pass over the (N, V) gradient, and the logits are freed at once. It is
an operator (``triton_support.kernel_op``), so ``torch.compile`` keeps it whole and launches the
kernel from its own code (``model.FUSED_LM_HEAD`` says when the model uses it). A one-read variant
that held whole rows in registers, 16 warps per row, measured 1.01 ms on the H200 at 32,768 × 10,000
against 0.61 ms for the two kernels above, and was dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cs336_basics.triton_support import kernel_op, launch

BLOCK_V = 2048  # vocab entries per loop iteration of one row's program
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _row_lse(base, V, BLOCK_V: tl.constexpr):
    """log-sum-exp of one row of V logits at ``base``, read once in blocks (fp32 math).

    One running max for the row (each block's max taken first) and per-lane sums of exp(x - max):
    one exponential per logit. A per-lane running max needs two (the lane's rescale and its term),
    and the exponentials, not the bytes, bound this loop (~1e9 per tinystories-17m step)."""
    m = tl.full([], -3.0e38, tl.float32)  # finite start: masked lanes (-inf) give exp(-inf) = 0, not nan
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    return m + tl.log(tl.sum(s, axis=0))


@triton.jit
def _store_row_grad(base, gbase, lse, target, scale, V, BLOCK_V: tl.constexpr):
    """``(softmax - onehot(target)) · scale`` of the row at ``base`` into ``gbase`` (may be ``base``:
    each block is read before it is written), in the gradient's dtype."""
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)  # softmax
        d = tl.where(cols == target, p - 1.0, p) * scale
        tl.store(gbase + cols, d.to(gbase.dtype.element_ty), mask=mask)


@triton.jit
def _ce_fwd_kernel(logits_ptr, stride, targets_ptr, loss_ptr, lse_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    lse = _row_lse(base, V, BLOCK_V)
    target_logit = tl.load(base + tl.load(targets_ptr + row)).to(tl.float32)
    tl.store(loss_ptr + row, lse - target_logit)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_bwd_kernel(logits_ptr, stride, targets_ptr, lse_ptr, grad_loss_ptr, grad_ptr, grad_stride, V, inv_n,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_n = tl.cast(inv_n, tl.float32)  # inductor (torch 2.11) passes Python floats as fp64
    scale = tl.load(grad_loss_ptr).to(tl.float32) * inv_n  # d(mean)/d(row loss) · upstream gradient
    _store_row_grad(logits_ptr + row * stride, grad_ptr + row * grad_stride, tl.load(lse_ptr + row),
                    tl.load(targets_ptr + row), scale, V, BLOCK_V)


# The two kernels as operators (`kernel_op`) under torch.compile, so the loss can sit inside a graph
# (the model's ``forward(ids, targets=y)``); eager mode calls them through `_CrossEntropy` instead.


def _ce_fake(logits, targets):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.float32)


def _ce_forward(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(mean loss, per-row log-sum-exp) of ``logits`` ``(N, V)`` (last dim contiguous), fp32."""
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    launch(_ce_fwd_kernel)[(n,)](logits, logits.stride(0), targets, loss, lse, vocab, BLOCK_V=BLOCK_V, num_warps=8)
    return loss.mean(), lse


def _ce_backward_fake(logits, targets, lse, grad_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_grad(logits: Tensor, targets: Tensor, lse: Tensor, grad_loss: Tensor) -> Tensor:
    """d(mean loss)/d(logits) · ``grad_loss`` (a 0-dim tensor, read on the device), in the logits' dtype."""
    n, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    launch(_ce_bwd_kernel)[(n,)](logits, logits.stride(0), targets, lse, grad_loss.contiguous(), grad, grad.stride(0),
                                 vocab, 1.0 / n, BLOCK_V=BLOCK_V, num_warps=8)
    return grad


_ce_op = kernel_op("cs336_basics::cross_entropy", _ce_fake)(_ce_forward)
_ce_backward_op = kernel_op("cs336_basics::cross_entropy_backward", _ce_backward_fake)(_ce_grad)


def _ce_setup(ctx, inputs, output):
    logits, targets = inputs
    ctx.save_for_backward(logits, targets, output[1])


def _ce_backward(ctx, grad_loss, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return _ce_backward_op(logits, targets, lse, grad_loss), None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


class _CrossEntropy(torch.autograd.Function):
    """Eager mode: the same kernels without the operator dispatch (~25 us of host time per call)."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        loss, lse = _ce_forward(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, targets, lse = ctx.saved_tensors
        return _ce_grad(logits, targets, lse, grad_loss), None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over all leading dims of ``-log softmax(logits)[target]``; ``logits`` ``(..., V)`` of a
    dtype in `SUPPORTED_DTYPES`, ``targets`` ``(...)`` int. Returns an fp32 scalar."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    targets = targets.reshape(-1).long().contiguous()
    return _ce_op(flat, targets)[0] if torch.compiler.is_compiling() else _CrossEntropy.apply(flat, targets)


@triton.jit
def _ce_loss_grad_kernel(logits_ptr, stride, grad_ptr, grad_stride, targets_ptr, loss_ptr, V, BLOCK_V: tl.constexpr):
    """Row loss, and ``softmax - onehot`` (unscaled) of the row into ``grad``: the two loops of the
    kernels above in one program, so the second read of the row comes mostly from L2 (the rows in
    flight are a few MB)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    lse = _row_lse(base, V, BLOCK_V)
    tl.store(loss_ptr + row, lse - tl.load(base + target).to(tl.float32))
    _store_row_grad(base, grad_ptr + row * grad_stride, lse, target, 1.0, V, BLOCK_V)


def _linear_ce_fake(h, weight, targets):
    return h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0], weight.shape[0]))


@kernel_op("cs336_basics::linear_cross_entropy", _linear_ce_fake)
def _linear_ce(h: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(mean loss (fp32 scalar), G = softmax - onehot (N, V) in h's dtype) for ``logits = h Wᵀ``."""
    logits = h @ weight.T  # (N, V), freed when this returns
    n, vocab = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    # G in its own buffer, not over the logits: inductor would copy a mutated intermediate first
    # (measured: a 0.31 ms copy kernel per step at 32,768 x 10,000 on the H200)
    g = torch.empty_like(logits)
    launch(_ce_loss_grad_kernel)[(n,)](logits, logits.stride(0), g, g.stride(0), targets, loss, vocab,
                                       BLOCK_V=BLOCK_V, num_warps=8)
    return loss.mean(), g


def _linear_ce_setup(ctx, inputs, output):
    h, weight, _ = inputs
    ctx.save_for_backward(h, weight, output[1])


def _linear_ce_backward(ctx, grad_loss, _grad_g):
    h, weight, g = ctx.saved_tensors
    scale = grad_loss / g.shape[0]  # 0-dim, on the device: no sync
    return (g @ weight) * scale, (g.T @ h) * scale, None


_linear_ce.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """``cross_entropy(h @ weight.T, targets)`` without keeping the logits: ``h`` ``(..., C)``,
    ``weight`` ``(V, C)``, ``targets`` ``(...)`` int. Under autocast the matmul runs in the
    autocast dtype (the casts are ordinary ops, so their gradients flow back to fp32 weights)."""
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    flat = h.reshape(-1, h.shape[-1])
    if weight.dtype not in SUPPORTED_DTYPES or flat.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h {flat.dtype} and weight {weight.dtype} must be one of "
                         f"{SUPPORTED_DTYPES}")
    return _linear_ce(flat.contiguous(), weight.contiguous(), targets.reshape(-1).long().contiguous())[0]
