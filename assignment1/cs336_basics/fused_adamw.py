"""One-pass AdamW update of many tensors in one Triton launch (the "multi-tensor apply" pattern).

The multi-tensor ``torch._foreach_*`` form of AdamW (``optimizer.py``) needs about eight passes
over memory per step, and ``_foreach_sqrt`` allocates a full-size temporary. Here each element of
p, g, m, v is read once and p, m, v written once (28 bytes per fp32 parameter), and a whole bucket
of tensors is updated by one kernel launch: a table of the tensors' addresses and sizes is copied
to the device each step (the gradients are new tensors after ``zero_grad(set_to_none=True)``), and
each program looks up which tensor and which block of it to update. Bias corrections are computed
on the host, so one bucket holds tensors at the same step count.

Same math and ε placement as ``torch.optim.AdamW`` (see ``optimizer.AdamW``); fp32 arithmetic
whatever the storage dtype. ``cs336_basics.optimizer.AdamW`` uses this module on CUDA when Triton
imports (it is optional: on CPU/MPS, or without Triton, the foreach path runs). The kernel also runs
on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do that).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 16 KB of fp32 per operand, 4 operands in flight
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _adamw_kernel(
    table_ptr, blocks_ptr, n_tensors, n_blocks,
    decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    # table: int64 rows [p addresses | g addresses | m addresses | v addresses | numels], each n_tensors long
    # blocks: int64 rows [tensor index | first element], each n_blocks long
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + pid)
    start = tl.multiple_of(tl.load(blocks_ptr + n_blocks + pid), BLOCK)
    numel = tl.load(table_ptr + 4 * n_tensors + t)
    # the host sends only 16-byte aligned tensors (see `supports_states`, `supports_grad`): 128-bit loads and stores
    p_ptr = tl.multiple_of(tl.load(table_ptr + t).to(tl.pointer_type(P_DTYPE)), 16)
    g_ptr = tl.multiple_of(tl.load(table_ptr + n_tensors + t).to(tl.pointer_type(G_DTYPE)), 16)
    m_ptr = tl.multiple_of(tl.load(table_ptr + 2 * n_tensors + t).to(tl.pointer_type(S_DTYPE)), 16)
    v_ptr = tl.multiple_of(tl.load(table_ptr + 3 * n_tensors + t).to(tl.pointer_type(S_DTYPE)), 16)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:  # a full block: no mask, so the loads can be vectorized
        _adamw_update(p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, None, None,
                      decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)
    else:
        _adamw_update(p_ptr + offs, g_ptr + offs, m_ptr + offs, v_ptr + offs, offs < numel, 0.0,
                      decay, beta1, beta2, eps, step_size, bias_correction2_sqrt)


@triton.jit
def _adamw_update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, mask, other, decay, beta1, beta2, eps, step_size, bias_correction2_sqrt):
    p = tl.load(p_ptrs, mask=mask, other=other).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=other).to(tl.float32)
    m = tl.load(m_ptrs, mask=mask, other=other).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=other).to(tl.float32)
    p = p * decay  # decoupled weight decay: θ ← θ(1 - αλ)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp for weight < 0.5: β1 m + (1-β1) g
    v = v * beta2 + (1.0 - beta2) * g * g
    # round-to-nearest sqrt and division, as torch computes them (tl.sqrt and / are approximate)
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)
    tl.store(m_ptrs, m.to(m_ptrs.dtype.element_ty), mask=mask)
    tl.store(v_ptrs, v.to(v_ptrs.dtype.element_ty), mask=mask)


def supports_states(p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> bool:
    """Whether this kernel can update ``p`` with these states (on a device where it runs, see
    ``triton_support``): dense contiguous 16-byte aligned tensors of a supported float dtype on one
    device, the states of one dtype. Constant between steps, so the optimizer caches it; the
    gradient is checked by `supports_grad`."""
    return exp_avg.dtype == exp_avg_sq.dtype and all(
        _dense_aligned(t) and t.device == p.device for t in (p, exp_avg, exp_avg_sq))


def supports_grad(grad: torch.Tensor) -> bool:
    """`supports_states` for the gradient (a new tensor every step after ``zero_grad(set_to_none=True)``;
    autograd keeps it on its parameter's device)."""
    return _dense_aligned(grad)


def _dense_aligned(t: torch.Tensor) -> bool:
    return t.dtype in _TL_DTYPES and t.layout == torch.strided and t.is_contiguous() and t.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=32)
def _block_table(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(2, n_blocks) int64 on ``device``: for each program, its tensor index and first element.
    The same every step for the same parameters, so built once."""
    counts = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    start = (torch.arange(len(tensor_index)) - first_block) * BLOCK
    return torch.stack([tensor_index, start]).to(device)


@torch.no_grad()
def adamw_step_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], step: int, *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float,
) -> None:
    """Update ``params``, ``exp_avgs``, ``exp_avg_sqs`` in place (one launch), all at step ``step``.

    Every tensor must pass `supports_states` / `supports_grad`, all on one device with the same
    dtypes per role.
    """
    params_grads = [(p, g, m, v) for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs) if p.numel()]
    if not params_grads:
        return
    p0, g0, m0, _ = params_grads[0]
    device = p0.device
    n = len(params_grads)
    addresses = [t.data_ptr() for role in range(4) for t in (row[role] for row in params_grads)]
    numels = tuple(row[0].numel() for row in params_grads)
    # pinned + non_blocking: the copy is queued on the stream instead of waiting for the backward
    table = torch.tensor(addresses + list(numels), dtype=torch.int64, pin_memory=device.type == "cuda")
    table = table.to(device, non_blocking=True)
    blocks = _block_table(numels, device)
    n_blocks = blocks.shape[1]
    _adamw_kernel[(n_blocks,)](
        table, blocks, n, n_blocks,
        1.0 - lr * weight_decay, beta1, beta2, eps, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5,
        P_DTYPE=_TL_DTYPES[p0.dtype], G_DTYPE=_TL_DTYPES[g0.dtype], S_DTYPE=_TL_DTYPES[m0.dtype],
        BLOCK=BLOCK, num_warps=8,
    )
