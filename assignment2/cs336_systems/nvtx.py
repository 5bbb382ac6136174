"""NVTX ranges for readable Nsight Systems timelines, applied from outside the model.

The model never knows it is being profiled: the harness pushes a range around each phase
(``forward``, ``backward``, ``optimizer``), forward pre/post hooks push a range per submodule
(``layers.3.attn``, ``layers.3.attn.q_proj``, ...), and for the attention internals the harness
passes :func:`annotated_attention` as the model's attention backend (the ``attn_fn(q, k, v,
is_causal)`` callable of the model's interface), which splits attention into "attention scores",
"attention softmax" and "attention output" ranges.

Usage under Nsight Systems::

    nsys profile -o lm --trace=cuda,nvtx --pytorch=autograd-nvtx \\
        cs336-systems benchmark --size small --nvtx

Every call is a no-op without CUDA, so the same code runs on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


def _nvtx_on() -> bool:
    return torch.cuda.is_available()


def range_push(name: str) -> None:
    if _nvtx_on():
        torch.cuda.nvtx.range_push(name)


def range_pop() -> None:
    if _nvtx_on():
        torch.cuda.nvtx.range_pop()


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """``with nvtx_range("forward"): ...`` -- a named NVTX range (no-op without CUDA)."""
    range_push(name)
    try:
        yield
    finally:
        range_pop()


def annotate_modules(
    model: nn.Module, max_depth: int = 3
) -> list[torch.utils.hooks.RemovableHandle]:
    """Give every submodule up to ``max_depth`` dots deep an NVTX range named after it.

    Depth 3 reaches ``layers.0.attn.q_proj`` in the ``cs336_basics`` LM. Returns the hook handles
    (``h.remove()`` undoes it). Hooks break ``torch.compile`` graphs, so the harness installs
    them only when asked (``--nvtx``).
    """
    handles = []
    for name, module in model.named_modules():
        if not name or name.count(".") >= max_depth:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, args, n=name: range_push(n)))
        handles.append(module.register_forward_hook(lambda m, args, out: range_pop()))
    return handles


def annotated_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention, ``(B, H, T, D)``, with one NVTX range per step.

    The profiling twin of the model's "math" backend (same three steps: scores, softmax, weighted
    sum), written as an attention-backend callable so the model stays unaware of NVTX.
    """
    from cs336_basics.model import causal_mask, softmax

    with nvtx_range("attention scores"):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
        if is_causal:
            scores = scores.masked_fill(
                ~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf")
            )
    with nvtx_range("attention softmax"):
        probs = softmax(scores, dim=-1)
    with nvtx_range("attention output"):
        return probs @ v  # (B, H, Tq, D)
