"""Softmax, cross-entropy and global-norm gradient clipping, as pure functions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from cs336_basics.model import softmax
from cs336_basics.triton_support import kernels_for, runs_on, traceable_kernels

__all__ = ["clip_grad_norm", "cross_entropy", "cross_entropy_torch", "softmax"]


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over all leading dims of ``-log softmax(logits)[target]``; ``logits`` ``(..., V)``,
    ``targets`` ``(...)`` int; fp32 math even under bf16 autocast.

    On CUDA (when Triton imports) this runs the two Triton kernels of ``fused_cross_entropy.py``,
    which read the logits once per pass instead of ~10 times, also under ``torch.compile`` (they are
    an operator); elsewhere `cross_entropy_torch`.
    """
    if not runs_on(logits.device):
        kernels = None
    elif torch.compiler.is_compiling():
        kernels = traceable_kernels("fused_cross_entropy")
    else:
        kernels = kernels_for(logits.device, "fused_cross_entropy")
    if kernels is not None and logits.dtype in kernels.SUPPORTED_DTYPES:
        return kernels.cross_entropy(logits, targets)
    return cross_entropy_torch(logits, targets)


def cross_entropy_torch(logits: Tensor, targets: Tensor) -> Tensor:
    """`cross_entropy` in PyTorch ops: ``logsumexp(x) = m + log Σ exp(x - m)`` with ``m = max x``,
    so large logits never overflow; computed in fp32 even under bf16 autocast."""
    logits = logits.float()
    # m cancels out of the value and the gradient, so it needs no backward pass of its own
    m = logits.amax(dim=-1, keepdim=True).detach()  # (..., 1)
    lse = m.squeeze(-1) + torch.log(torch.exp(logits - m).sum(dim=-1))  # (...)
    target_logit = logits.gather(-1, targets.unsqueeze(-1).long()).squeeze(-1)  # (...)
    return (lse - target_logit).mean()


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients in place so that their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping as a 0-dim fp32 tensor (as ``torch.nn.utils.clip_grad_norm_``
    does). The scale ``min(1, max_norm / (norm + eps))`` is applied as a tensor too, so nothing here
    waits for the GPU: the optimizer step can be queued right behind the backward. Call
    ``float(norm)`` where the number is needed (that syncs).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.stack(torch._foreach_norm(grads)).float().norm(2)  # sqrt(Σ ||g_i||²), one kernel per list
    scale = (max_norm / (total + eps)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)
    return total
