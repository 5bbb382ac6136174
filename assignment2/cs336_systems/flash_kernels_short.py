"""The FlashAttention backward for short sequences with many heads: one launch, one program per
(batch, head), P computed once per tile pair (the two-pass backward of ``flash_kernels`` computes it
again in its dQ pass).

A program walks the key tiles in order, each against the query tiles that see it (as
``flash_kernels._bwd_dkdv``), and adds each query tile's dS K into an fp32 scratch row block that
only it touches (``DQacc``; no atomics). A query tile's dQ is complete at the last key tile it sees,
which writes it out instead.

At these lengths (T = 256, d = 32: ten 64 x 64 tile pairs per program) the work per tile is small and
the program mostly waits on memory, so the code is arranged around latency (H200 profile in
``docs/benchmarks.md``, "Short sequences"):
* no prologue: the first key tile, which every query tile sees, computes Delta = rowsum(dO * O)
  from the O rows it loads and stores it for the later key tiles; lse2 = L * log2(e) is taken
  where it is used;
* tiles are fetched one iteration ahead into registers (the next query tile's Q, dO, L and Delta or
  O during the current one), because the loops are too short for Triton's own pipelining to hide the
  loads. What is used last in an iteration (the dQ partial sum, the query rows' RoPE tables) is
  loaded at its start. The next key tile and the key rows' RoPE tables are fetched only after the
  query loop, during the key tile's epilogue: held through the loop, their 64 registers made the
  kernel spill (288 bytes of stack at 32x128/w4 with RoPE, 72 without, in an sm_90 compile;
  none now: ``scripts/kernel_sass.py short --head-dim 32 --packed --rope``).

RoPE (optional, ``rope=``): q and k are the *rotated* ones, as the forward wrote them
(``flash_kernels.flash_fwd`` with ``rope``), so nothing is rotated per tile pair; dK and the finished
dQ are rotated back before they are stored, so the gradients are those of the unrotated inputs.
(Rotating q and k here as they were loaded cost 1.5x the backward's time at T = 256: the RoPE tables
of the current and next tiles took the registers, and the kernel spilled.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cs336_systems.flash_kernels import (
    LOG2E,
    Rope,
    _cfg,
    _empty,
    _empty_like,
    _launcher,
    _rope_args,
    _rope_tables,
    _rotate,
    _strides3,
)

LOG2E_K: tl.constexpr = tl.constexpr(LOG2E)


@triton.jit
def _load_key_tile(K, V, stride_kn, stride_vn, start_n, N_K, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V rows [start_n, start_n + BLOCK_N) (rows >= N_K: zeros)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n[:, None] < N_K
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k, other=0.0)
    return k, v


@triton.jit
def _load_query_tile(Q, DO, O, L, Delta, stride_qm, stride_dom, stride_om, start_m, N_Q,
                     BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, FIRST: tl.constexpr):
    """What one query tile's step needs, rows [start_m, start_m + BLOCK_M) (rows >= N_Q: zeros, and
    lse = +inf so that P = 0): q, dO, L, then O (FIRST: Delta is still to be computed) or Delta."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < N_Q
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_q[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_q[:, None], other=0.0)
    lse = tl.load(L + offs_m, mask=in_q, other=float("inf"))
    if FIRST:
        o_or_delta = tl.load(O + offs_m[:, None] * stride_om + offs_d[None, :], mask=in_q[:, None], other=0.0)
    else:
        o_or_delta = tl.load(Delta + offs_m, mask=in_q, other=0.0)
    return q, do, lse, o_or_delta


@triton.jit
def _key_tile(
    k, v, start_n, Q, K, V, DO, O, L, Delta, DQacc, DQ, DK, DV, Pos, Cos, Sin,
    stride_qm, stride_kn, stride_vn, stride_dom, stride_om, stride_dqm, stride_dkn, stride_dvn, stride_pt,
    N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr, FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile (k, v already loaded) against the query tiles that see it: dK and dV stored; dQ
    of finished query rows stored, the others' partial sums kept in DQacc (with ROPE, in the rotated
    frame: only the finished dQ is rotated back). Returns the next key tile, fetched once the query
    loop is done (during this tile's epilogue), so that it holds no registers inside the loop."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = start_n if IS_CAUSAL else 0  # causal: queries < start_n see none of these keys
    q_n, do_n, lse_n, od_n = _load_query_tile(Q, DO, O, L, Delta, stride_qm, stride_dom, stride_om, lo, N_Q,
                                              BLOCK_M, HEAD_DIM, FIRST)
    for start_m in range(lo, N_Q, BLOCK_M):
        q, do, lse, o_or_delta = q_n, do_n, lse_n, od_n
        q_n, do_n, lse_n, od_n = _load_query_tile(  # the next query tile, while this one runs
            Q, DO, O, L, Delta, stride_qm, stride_dom, stride_om, start_m + BLOCK_M, N_Q, BLOCK_M, HEAD_DIM, FIRST)
        offs_m = start_m + offs_mb
        in_q = offs_m < N_Q
        keys_seen = tl.minimum(offs_m + 1, N_K) if IS_CAUSAL else tl.zeros_like(offs_m) + N_K
        last = (keys_seen <= start_n + BLOCK_N) & in_q  # rows whose last visible key tile this is
        acc_ptrs = DQacc + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        if not FIRST:  # (the partial sum and the tables are used last: issued first, they arrive during the dots)
            dq_partial = tl.load(acc_ptrs, mask=in_q[:, None], other=0.0)
        if ROPE:
            cos_q, sin_q = _rope_tables(offs_m, N_Q, Pos, stride_pt, Cos, Sin, HEAD_DIM)
        if FIRST:  # Delta of these rows, for this and the later key tiles
            delta = tl.sum(o_or_delta.to(tl.float32) * do.to(tl.float32), axis=1)
            tl.store(Delta + offs_m, delta, mask=in_q)
        else:
            delta = o_or_delta
        qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M); padded key rows are 0, so they add 0 to dQ
        dpT = tl.dot(v, tl.trans(do))
        pT = tl.math.exp2(qkT * qk_scale - (lse * LOG2E_K)[None, :])
        if IS_CAUSAL:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k)  # (BLOCK_M, HEAD_DIM)
        if not FIRST:
            dq += dq_partial
        if ROPE:
            dq_out = _rotate(dq, cos_q, -sin_q, BLOCK_M, HEAD_DIM)
        else:
            dq_out = dq
        tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], (dq_out * sm_scale).to(DQ.dtype.element_ty),
                 mask=last[:, None])
        tl.store(acc_ptrs, dq, mask=(in_q & (last == 0))[:, None])
    k_next, v_next = _load_key_tile(K, V, stride_kn, stride_vn, start_n + BLOCK_N, N_K, BLOCK_N, HEAD_DIM)
    if ROPE:  # (the tables only now: held through the loop they took 32 registers, and the kernel spilled)
        cos_k, sin_k = _rope_tables(offs_n, N_K, Pos, stride_pt, Cos, Sin, HEAD_DIM)
        dk = _rotate(dk, cos_k, -sin_k, BLOCK_N, HEAD_DIM)
    in_k = offs_n[:, None] < N_K
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=in_k)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=in_k)
    tl.debug_barrier()  # the DQacc rows and Delta stored here are read by the next key tile's threads
    return k_next, v_next


@triton.jit
def _bwd_short(
    Q, K, V, O, DO, DQ, DK, DV, L, Delta, DQacc, Pos, Cos, Sin,
    stride_qz, stride_qh, stride_qm,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_om,
    stride_doz, stride_doh, stride_dom,
    stride_dqz, stride_dqh, stride_dqm,
    stride_dkz, stride_dkh, stride_dkn,
    stride_dvz, stride_dvh, stride_dvn,
    stride_pz, stride_ph, stride_pt,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr, PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ, dK, dV of one (batch, head). BLOCK_N must be a multiple of BLOCK_M. PACKED: DQ is one
    (Z, N, 3, H, HEAD_DIM) tensor that takes all three (the dq strides hold for each; DK, DV unused)."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from inductor (torch 2.11)
    if PACKED:
        DK = DQ + H * HEAD_DIM
        DV = DQ + 2 * H * HEAD_DIM
    off_zh = tl.program_id(0)
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    O += off_z * stride_oz + off_h * stride_oh
    DO += off_z * stride_doz + off_h * stride_doh
    DQ += off_z * stride_dqz + off_h * stride_dqh
    DK += off_z * stride_dkz + off_h * stride_dkh
    DV += off_z * stride_dvz + off_h * stride_dvh
    Pos += off_z * stride_pz + off_h * stride_ph
    rows = off_zh.to(tl.int64) * N_Q
    L += rows
    Delta += rows
    DQacc += rows * HEAD_DIM

    k, v = _load_key_tile(K, V, stride_kn, stride_vn, 0, N_K, BLOCK_N, HEAD_DIM)
    k, v = _key_tile(k, v, 0, Q, K, V, DO, O, L, Delta, DQacc, DQ, DK, DV, Pos, Cos, Sin,
                     stride_qm, stride_kn, stride_vn, stride_dom, stride_om, stride_dqm, stride_dkn, stride_dvn,
                     stride_pt, N_Q, N_K, qk_scale, sm_scale, HEAD_DIM, IS_CAUSAL, ROPE, True, BLOCK_M, BLOCK_N)
    for start_n in range(BLOCK_N, N_K, BLOCK_N):
        k, v = _key_tile(k, v, start_n, Q, K, V, DO, O, L, Delta, DQacc, DQ, DK, DV, Pos, Cos, Sin,
                         stride_qm, stride_kn, stride_vn, stride_dom, stride_om, stride_dqm, stride_dkn, stride_dvn,
                         stride_pt, N_Q, N_K, qk_scale, sm_scale, HEAD_DIM, IS_CAUSAL, ROPE, False, BLOCK_M, BLOCK_N)


# Tile configs, BLOCK_N a multiple of BLOCK_M, fastest first at T = 256, d = 32 (H200, docs/benchmarks.md):
# without RoPE 32x128 0.208 ms, 64x64 0.215, 32x64 0.235; RoPE inside (rotated q, k from the forward)
# 0.256 / 0.296 / 0.298 (timed before the key tile's fetch moved to its epilogue). No register caps:
# these configs need ~250 registers, and capped (168) they spilled enough to run 1.8-2.4x slower (and
# inductor drops caps anyway, see ``flash_kernels._cfg``). 16x64/w4 is the occupancy candidate, not yet
# timed: 140 registers with RoPE (128 without) in an sm_90 compile, so three or four programs per SM
# instead of two, for ~1.75x the instructions per score of 32x128 (scripts/kernel_sass.py).
SHORT_CONFIGS = [
    _cfg(32, 128, 4, 2), _cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 128, 8, 2), _cfg(64, 64, 8, 2),
    _cfg(16, 64, 4, 2), _cfg(64, 64, 4, 3), _cfg(32, 64, 8, 2), _cfg(32, 32, 4, 2), _cfg(16, 16, 4, 2),
]
_launch_short = _launcher("short", _bwd_short, SHORT_CONFIGS)


def flash_bwd_short(q, k, v, o, L, do, is_causal: bool, rope: Rope | None = None,
                    packed: torch.Tensor | None = None):
    """(dQ, dK, dV), each in the layout of its input, as ``flash_kernels.flash_bwd`` gives them, in one
    launch of one program per (batch, head). ``rope``: q and k are the rotated ones the forward
    returned; the gradients are those of the unrotated q and k. ``packed`` (Z, N, 3·H·D) contiguous,
    with N_Q == N_K: the three are written side by side into it instead, and it is returned in their
    three places; one tensor for the kernel, as inductor copies views of a tensor that a kernel writes."""
    Z, H, N_Q, D = q.shape
    N_K = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D)
    delta = _empty((Z * H, N_Q), q, torch.float32)
    dq_acc = torch.empty((Z * H, N_Q, D), device=q.device, dtype=torch.float32)  # written before it is read
    if packed is None:
        dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
        outs, out_strides = (dq, dk, dv), (*_strides3(dq), *_strides3(dk), *_strides3(dv))
    else:  # the kernel stores all three through DQ; q stands in for the unused DK, DV
        dq = dk = dv = packed
        outs, out_strides = (packed, q, q), (N_Q * 3 * H * D, D, 3 * H * D) * 3
    pos, cos, sin, *pos_strides = _rope_args(rope, q)
    _launch_short(
        lambda meta: (Z * H,),
        q, k, v, o, do, *outs, L, delta, dq_acc, pos, cos, sin,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *_strides3(do),
        *out_strides, *pos_strides,
        H, N_Q, N_K, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), dtype=q.dtype, ROPE=rope is not None, PACKED=packed is not None,
    )
    return dq, dk, dv
