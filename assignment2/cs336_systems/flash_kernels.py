"""Triton kernels of FlashAttention-2 (forward; backward as preprocess + dK/dV pass + dQ pass).

Inputs are ``(Z, H, T, D)`` tensors with any strides except a contiguous last dimension (so
``(B, T, H, D)`` buffers seen through a transpose, or stride-0 broadcasts, need no copy).

Design (H100 notes in ``docs/benchmarks.md``):
* scores are kept in base 2: ``qk_scale = log2(e)/sqrt(d)`` is folded into one FMA before ``exp2``;
  the saved L is natural-log (the contract), the backward converts it once (``lse2 = L*log2 e``).
* causal: tiles wholly above the diagonal are never visited; tiles wholly below run an unmasked
  loop; only the diagonal tiles (and the ragged tail of the sequence) run the masked loop.
* programs are ordered heaviest first (grid axis 0 is batch*heads, axis 1 the tile index, so
  every head's longest causal rows launch before any short one).
* backward without atomics: ``_bwd_dkdv`` keeps one K/V tile resident and walks the query tiles
  that see it; ``_bwd_dq`` keeps one Q/dO tile resident and walks the key tiles it sees; both
  recompute P from L. ``_bwd_preprocess`` computes D = rowsum(dO * O) and lse2 first.
* short sequences with many heads: the whole backward of a (batch, head) in one program
  (``flash_kernels_short``).
* RoPE (optional, ``rope=``): the forward rotates q and k as the tiles are loaded and writes them
  rotated; the short backward reads those and rotates dQ, dK back before it stores them.
* tile sizes are autotuned per (seq lens, d, causal, dtype) from short lists; set
  ``CS336_FLASH_AUTOTUNE=0`` to take the first fitting config instead (no tuning runs), and the
  interpreter (``TRITON_INTERPRET=1``) always uses small fixed tiles.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from cs336_basics.triton_support import launch

LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------------------------
# RoPE applied to tiles as they are loaded (the model's convention: adjacent pairs (x[2i], x[2i+1])
# rotated by pos * theta^(-2i/D); the tables cos/sin are (max_seq_len, D/2) fp32, contiguous)


@triton.jit
def _rope_tables(offs, n, Pos, stride_pt, Cos, Sin, HEAD_DIM: tl.constexpr):
    """cos and sin, (len(offs), HEAD_DIM/2) fp32, of the angles of positions ``Pos[offs]``; rows >= n
    take position 0. (Loaded apart from the rotation so that a loop can fetch them a tile ahead.)"""
    pos = tl.load(Pos + offs * stride_pt, mask=offs < n, other=0)
    angle = pos[:, None] * (HEAD_DIM // 2) + tl.arange(0, HEAD_DIM // 2)[None, :]
    return tl.load(Cos + angle), tl.load(Sin + angle)


@triton.jit
def _rotate(x, cos, sin, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The (ROWS, HEAD_DIM) tile ``x`` rotated pair by pair (pass ``-sin`` to rotate back), in fp32."""
    x1, x2 = tl.split(tl.reshape(x.to(tl.float32), (ROWS, HEAD_DIM // 2, 2)))  # even, odd lanes
    return tl.reshape(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), (ROWS, HEAD_DIM))


@triton.jit
def _rope_rows(x, offs, n, Pos, stride_pt, Cos, Sin, sign, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The (ROWS, HEAD_DIM) tile ``x`` of rows ``offs`` rotated by the angles of positions
    ``Pos[offs]`` (``sign`` -1.0 rotates back, the transpose), in fp32. Rows >= n take position 0."""
    cos, sin = _rope_tables(offs, n, Pos, stride_pt, Cos, Sin, HEAD_DIM)
    return _rotate(x, cos, sin * sign, ROWS, HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _load_k_rope(K, stride_kn, offs_d, offs_n, hi, Pos, stride_pt, Cos, Sin, HEAD_DIM: tl.constexpr):
    """Key rows ``offs_n`` (rows >= hi: zeros) and their cos/sin tables, not yet rotated."""
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=offs_n[:, None] < hi, other=0.0)
    cos, sin = _rope_tables(offs_n, hi, Pos, stride_pt, Cos, Sin, HEAD_DIM)
    return k, cos, sin


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, N_K, qk_scale,
    Pos, stride_pt, Cos, Sin, KR, stride_krn, write_hi,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key tiles [lo, hi); m_i is in base-2 units.

    ROPE: the key tiles are rotated as they are loaded, and their rows < ``write_hi`` stored rotated into KR
    (causal: in the masked loop only; the unmasked tiles are other programs' diagonals).
    They go through registers, so Triton's pipeline (asynchronous copies into shared memory) cannot
    fetch them ahead; this loop loads each raw tile and its cos/sin one iteration early instead (at
    T = 256 the wait on those loads was the kernel's largest stall, H200 profile in docs/benchmarks.md).
    """
    offs_nb = tl.arange(0, BLOCK_N)
    if ROPE:
        k_next, cos_next, sin_next = _load_k_rope(K, stride_kn, offs_d, lo + offs_nb, hi, Pos, stride_pt, Cos, Sin,
                                                  HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_nb
        if MASKED:
            in_k = offs_n[:, None] < N_K
        if ROPE:
            k = _rotate(k_next, cos_next, sin_next, BLOCK_N, HEAD_DIM).to(k_next.dtype)
            if MASKED or not IS_CAUSAL:
                tl.store(KR + offs_n[:, None] * stride_krn + offs_d[None, :], k, mask=offs_n[:, None] < write_hi)
            k_next, cos_next, sin_next = _load_k_rope(K, stride_kn, offs_d, offs_n + BLOCK_N, hi, Pos, stride_pt,
                                                      Cos, Sin, HEAD_DIM)
        elif MASKED:
            k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k, other=0.0)
        else:
            k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N), fp32 accumulation
        if MASKED:
            valid = offs_n[None, :] < N_K
            if IS_CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(valid, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: scale after the max
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k, other=0.0)
        else:
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, L, Pos, Cos, Sin, QR, KR,
    stride_qz, stride_qh, stride_qm,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_om,
    stride_pz, stride_ph, stride_pt,
    stride_qrz, stride_qrh, stride_qrm,
    stride_krz, stride_krh, stride_krn,
    H, N_Q, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """O and L of one query tile. ROPE: q and k are rotated as they are loaded (positions
    ``Pos[z, h, t]``, one table for queries and keys, so N_Q == N_K) and written rotated to QR, KR
    for the backward: each program its q tile; each key tile by one program (causal: the one whose
    diagonal holds it, in its masked loop; else the first query tile)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor (torch 2.11) passes Python floats as fp64
    off_zh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:  # the last query tiles see the most keys: launch them first
        pid_m = tl.num_programs(1) - 1 - pid_m
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    O += off_z * stride_oz + off_h * stride_oh
    L += off_zh.to(tl.int64) * N_Q
    Pos += off_z * stride_pz + off_h * stride_ph
    QR += off_z * stride_qrz + off_h * stride_qrh
    KR += off_z * stride_krz + off_h * stride_krh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m[:, None] < N_Q
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_q, other=0.0)
    if ROPE:
        q = _rope_rows(q, offs_m, N_Q, Pos, stride_pt, Cos, Sin, 1.0, BLOCK_M, HEAD_DIM).to(q.dtype)
        tl.store(QR + offs_m[:, None] * stride_qrm + offs_d[None, :], q, mask=in_q)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_k = (N_K // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # keys < start_m are visible to every row of the tile; keys >= start_m + BLOCK_M to none
        lo_masked = tl.minimum(start_m, full_k)
        hi = tl.minimum(start_m + BLOCK_M, N_K)
        write_unmasked, write_masked = 0, hi  # (RoPE: which rotated K rows this program writes; 0 unused)
    else:
        lo_masked = full_k
        hi = N_K
        write_unmasked, write_masked = tl.where(pid_m == 0, lo_masked, 0), tl.where(pid_m == 0, hi, 0)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d,
                               0, lo_masked, N_K, qk_scale, Pos, stride_pt, Cos, Sin, KR, stride_krn,
                               write_unmasked, BLOCK_N, False, IS_CAUSAL, ROPE, HEAD_DIM)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, offs_m, offs_d,
                               lo_masked, hi, N_K, qk_scale, Pos, stride_pt, Cos, Sin, KR, stride_krn,
                               write_masked, BLOCK_N, True, IS_CAUSAL, ROPE, HEAD_DIM)
    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :], o.to(O.dtype.element_ty), mask=in_q)
    tl.store(L + offs_m, (m_i + tl.math.log2(l_i)) * LN2, mask=offs_m < N_Q)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _store_delta_lse2(O, DO, stride_om, stride_dom, L, Delta, LSE2, offs_m, offs_d, N_Q):
    """For rows ``offs_m`` of one (batch, head) (pointers already at its first row): Delta = rowsum(dO * O)
    in fp32 and lse2 = L * log2(e), what both backwards read instead of O and L."""
    in_q = offs_m < N_Q
    o = tl.load(O + offs_m[:, None] * stride_om + offs_d[None, :], mask=in_q[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_q[:, None], other=0.0)
    tl.store(Delta + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=in_q)
    tl.store(LSE2 + offs_m, tl.load(L + offs_m, mask=in_q, other=0.0) * 1.4426950408889634, mask=in_q)


@triton.jit
def _bwd_preprocess(
    O, DO, L, Delta, LSE2,
    stride_oz, stride_oh, stride_om,
    stride_doz, stride_doh, stride_dom,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Delta = rowsum(dO * O) (fp32) and lse2 = L * log2(e), both (Z*H, N_Q)."""
    off_zh = tl.program_id(0)
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    rows = off_zh.to(tl.int64) * N_Q
    _store_delta_lse2(O + off_z * stride_oz + off_h * stride_oh, DO + off_z * stride_doz + off_h * stride_doh,
                      stride_om, stride_dom, L + rows, Delta + rows, LSE2 + rows,
                      tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), N_Q)


@triton.jit
def _load_q_rows(Q, DO, stride_qm, stride_dom, LSE2, Delta, offs_m, offs_d, N_Q, MASKED: tl.constexpr):
    """Rows offs_m of Q, dO, lse2 and Delta (rows past N_Q: zeros, and lse2 = +inf so P = 0)."""
    if MASKED:
        in_q = offs_m < N_Q
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_q[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_q[:, None], other=0.0)
        lse2 = tl.load(LSE2 + offs_m, mask=in_q, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=in_q, other=0.0)
    else:
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :])
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :])
        lse2 = tl.load(LSE2 + offs_m)
        delta = tl.load(Delta + offs_m)
    return q, do, lse2, delta


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, Q, DO, stride_qm, stride_dom, LSE2, Delta, offs_n, offs_d, lo, hi, N_Q, qk_scale,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) (P^T computed transposed).

    Both score dots come first: the dV dot then runs on the tensor cores while dS is computed
    (Triton waits at once on a dot whose result the same iteration uses, so only the two
    accumulating dots overlap other work).
    """
    offs_mb = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_mb
        q, do, lse2, delta = _load_q_rows(Q, DO, stride_qm, stride_dom, LSE2, Delta, offs_m, offs_d, N_Q, MASKED)
        dk, dv = _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, offs_m, offs_n, qk_scale, MASKED and IS_CAUSAL)
    return dk, dv


@triton.jit
def _dkdv_tile(dk, dv, k, v, q, do, lse2, delta, offs_m, offs_n, qk_scale, CAUSAL_MASK: tl.constexpr):
    """dK, dV of one key tile updated with one query tile (P^T computed transposed). Query rows past
    the end come with lse2 = +inf (P = 0) and key rows past it with k = v = 0."""
    qkT = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
    dpT = tl.dot(v, tl.trans(do))
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    if CAUSAL_MASK:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE2, Delta,
    stride_qz, stride_qh, stride_qm,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_doz, stride_doh, stride_dom,
    stride_dkz, stride_dkh, stride_dkn,
    stride_dvz, stride_dvh, stride_dvn,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from inductor (torch 2.11)
    off_zh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N  # causal: the first key tiles are seen by the most queries
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    DO += off_z * stride_doz + off_h * stride_doh
    DK += off_z * stride_dkz + off_h * stride_dkh
    DV += off_z * stride_dvz + off_h * stride_dvh
    LSE2 += off_zh.to(tl.int64) * N_Q
    Delta += off_zh.to(tl.int64) * N_Q

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n[:, None] < N_K
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    full_q = (N_Q // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # queries < start_n see none of these keys; [start_n, start_n + BLOCK_N) is the diagonal
        diag_hi = tl.minimum(start_n + BLOCK_N, N_Q)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qm, stride_dom, LSE2, Delta, offs_n, offs_d,
                                 start_n, diag_hi, N_Q, qk_scale, BLOCK_M, True, True)
        lo = tl.maximum(start_n + BLOCK_N, full_q)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qm, stride_dom, LSE2, Delta, offs_n, offs_d,
                                 start_n + BLOCK_N, lo, N_Q, qk_scale, BLOCK_M, False, False)
    else:
        lo = full_q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qm, stride_dom, LSE2, Delta, offs_n, offs_d,
                                 0, lo, N_Q, qk_scale, BLOCK_M, False, False)
    # ragged tail of the queries (rows >= N_Q masked out)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q, DO, stride_qm, stride_dom, LSE2, Delta, offs_n, offs_d,
                             lo, N_Q, N_Q, qk_scale, BLOCK_M, True, False)
    tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=in_k)
    tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=in_k)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, offs_d, lo, hi, N_K, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_nb
        if MASKED:
            in_k = offs_n[:, None] < N_K
            k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k, other=0.0)
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k, other=0.0)
        else:
            k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :])
        dq = _dq_tile(dq, q, do, lse2, delta, k, v, offs_m, offs_n, N_K, qk_scale, MASKED, IS_CAUSAL)
    return dq


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k, v, offs_m, offs_n, N_K, qk_scale, MASKED: tl.constexpr,
             IS_CAUSAL: tl.constexpr):
    """dQ of one query tile updated with one key tile (MASKED: key rows past N_K, and causally
    hidden ones, get P = 0)."""
    qk = tl.dot(q, tl.trans(k))
    dp = tl.dot(do, tl.trans(v))
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        valid = offs_n[None, :] < N_K
        if IS_CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(valid, p, 0.0)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def _bwd_dq(
    Q, K, V, DO, DQ, LSE2, Delta,
    stride_qz, stride_qh, stride_qm,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_doz, stride_doh, stride_dom,
    stride_dqz, stride_dqh, stride_dqm,
    H, N_Q, N_K, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from inductor (torch 2.11)
    off_zh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    DO += off_z * stride_doz + off_h * stride_doh
    DQ += off_z * stride_dqz + off_h * stride_dqh
    LSE2 += off_zh.to(tl.int64) * N_Q
    Delta += off_zh.to(tl.int64) * N_Q

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < N_Q
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_q[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_q[:, None], other=0.0)
    lse2 = tl.load(LSE2 + offs_m, mask=in_q, other=0.0)
    delta = tl.load(Delta + offs_m, mask=in_q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_k = (N_K // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        lo_masked = tl.minimum(start_m, full_k)
        hi = tl.minimum(start_m + BLOCK_M, N_K)
    else:
        lo_masked = full_k
        hi = N_K
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, offs_d,
                       0, lo_masked, N_K, qk_scale, BLOCK_N, False, IS_CAUSAL)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K, V, stride_kn, stride_vn, offs_m, offs_d,
                       lo_masked, hi, N_K, qk_scale, BLOCK_N, True, IS_CAUSAL)
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=in_q[:, None])


# ---------------------------------------------------------------------------------------------
# tile configs and autotuning


def _cfg(bm: int, bn: int, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    """``maxnreg``: registers per thread at most (ptxas otherwise takes up to 255, which can leave
    room for only two 4-warp programs per SM). Only our own launches honour it: under torch.compile
    inductor (torch 2.11) rebuilds the configs without it, so there a capped config runs uncapped."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


# Candidates per kernel, best guess first (the first one that fits is used untuned; the autotuner
# times the first MAX_TUNED_CONFIGS that fit). For the causal split, BLOCK_M must be a multiple of
# BLOCK_N in the forward and dQ kernels, and BLOCK_N a multiple of BLOCK_M in the dK/dV kernel.
# Order: the H100 timings of each config at the leaderboard shape (docs/benchmarks.md, run 3) for
# bf16 d <= 64; the first fitting config for fp32 and d = 128 kept as GPU-checked in run 1.
# At the tinystories-17m shape (T = 256, d = 32; H200) 128x32/w4/s3 is the fastest without RoPE (0.089 ms)
# and 64x64/w4/s3 with RoPE inside (0.123 ms), hence both among the tuned six.
FWD_CONFIGS = [
    _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3), _cfg(128, 64, 4, 4),
    _cfg(128, 32, 4, 3), _cfg(128, 128, 8, 3), _cfg(128, 128, 8, 4), _cfg(128, 64, 4, 2),
    _cfg(64, 32, 4, 2), _cfg(32, 32, 4, 2), _cfg(16, 16, 4, 2),
]
DKDV_CONFIGS = [
    _cfg(64, 128, 8, 4), _cfg(64, 128, 8, 3), _cfg(32, 128, 4, 4), _cfg(64, 64, 4, 4), _cfg(128, 128, 8, 2),
    _cfg(32, 128, 8, 4), _cfg(32, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 2), _cfg(32, 32, 4, 2),
    _cfg(16, 16, 4, 2),
]
DQ_CONFIGS = [
    _cfg(128, 64, 4, 3), _cfg(128, 32, 4, 4), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 4), _cfg(128, 32, 8, 3),
    _cfg(64, 64, 4, 3), _cfg(64, 64, 4, 4), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 2), _cfg(64, 32, 4, 2),
    _cfg(32, 32, 4, 2), _cfg(16, 16, 4, 2),
]
# (BLOCK_M, BLOCK_N) in the interpreter: small, so CPU tests cross several tiles at tiny sizes
INTERPRET_TILES = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16), "short": (16, 32)}  # (BLOCK_M, BLOCK_N)
MAX_TUNED_CONFIGS = 6
SMEM_BYTES = 227 * 1024  # H100 per-block limit


def _fits(cfg: triton.Config, head_dim: int, elem: int) -> bool:
    """A rough shared-memory estimate: the resident tile plus num_stages streamed tiles (x2 operands)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    resident, streamed = max(bm, bn), min(bm, bn)
    need = (resident + 2 * streamed * cfg.num_stages) * head_dim * elem + bm * bn * elem
    return need <= SMEM_BYTES


def _candidates(configs: list[triton.Config], head_dim: int, dtype: torch.dtype) -> list[triton.Config]:
    """The configs that fit, in preference order: smaller tiles for fp32 and d=128 (register
    pressure: the fp32 accumulators grow with d and the score tile with BLOCK_M*BLOCK_N)."""
    elem = torch.empty((), dtype=dtype).element_size()
    fitting = [c for c in configs if _fits(c, head_dim, elem)]
    limit = 128 * 128 if (elem == 2 and head_dim <= 64) else 128 * 64 if elem == 2 else 64 * 64
    fitting = [c for c in fitting if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit] or fitting
    if head_dim == 128:
        fitting.sort(key=lambda c: -c.num_warps)  # stable: 8-warp configs first
    return fitting


def _autotune_enabled() -> bool:
    return os.environ.get("CS336_FLASH_AUTOTUNE", "1") != "0"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_KEY = ["N_Q", "N_K", "HEAD_DIM", "IS_CAUSAL"]
_tuned: dict[str, object] = {}
_CONFIG_LISTS: dict[str, tuple] = {}  # kernel name -> (configs, candidates function), filled by `_launcher`
# Testing hooks (scripts/gpu_flash_check.py, flash_bench): run a given config per kernel name
# ("fwd", "dkdv", "dq") instead of tuning; fill every output with NaN before the kernels write it.
FORCE_CONFIG: dict[str, triton.Config] = {}
POISON_OUTPUTS = False


def _launcher(name: str, kernel, configs: list[triton.Config], interpret_meta: dict | None = None,
              candidates=_candidates):
    """Returns ``run(grid_fn, *args, HEAD_DIM=..., IS_CAUSAL=..., dtype=..., **constexprs)`` for one
    kernel (``constexprs``: its other compile-time flags, e.g. ``ROPE``). ``interpret_meta``: the
    tile constexprs in the interpreter (default ``INTERPRET_TILES[name]``); ``candidates(configs,
    head_dim, dtype)``: the configs that fit, in preference order.

    The autotuned wrapper is built lazily (never in the interpreter, whose launches cannot be timed).
    """
    _CONFIG_LISTS[name] = (configs, candidates)

    def prune(configs, named_args, **kwargs):
        return candidates(configs, kwargs["HEAD_DIM"], named_args["Q"].dtype)[:MAX_TUNED_CONFIGS]

    def run(grid_fn, *args, HEAD_DIM: int, IS_CAUSAL: bool, dtype: torch.dtype, **constexprs):
        consts = {"HEAD_DIM": HEAD_DIM, "IS_CAUSAL": IS_CAUSAL, **constexprs}
        if _interpreting():
            meta = interpret_meta or dict(zip(("BLOCK_M", "BLOCK_N"), INTERPRET_TILES[name], strict=True))
            launch(kernel)[grid_fn(meta)](*args, **consts, **meta)
        elif _autotune_enabled() and name not in FORCE_CONFIG:
            if name not in _tuned:
                key = _KEY + (["ROPE"] if "ROPE" in kernel.arg_names else [])  # RoPE inside changes the best tiles
                _tuned[name] = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(
                    kernel
                )
            launch(_tuned[name])[grid_fn](*args, **consts)
        else:
            cfg = FORCE_CONFIG.get(name) or candidates(configs, HEAD_DIM, dtype)[0]
            options = {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}
            launch(kernel)[grid_fn(cfg.kwargs)](
                *args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **options, **cfg.kwargs
            )

    return run


_launch_fwd = _launcher("fwd", _fwd_kernel, FWD_CONFIGS)
_launch_dkdv = _launcher("dkdv", _bwd_dkdv, DKDV_CONFIGS)
_launch_dq = _launcher("dq", _bwd_dq, DQ_CONFIGS)


def force_candidate(index: int | None, head_dim: int = 0, dtype: torch.dtype | None = None) -> None:
    """Run every kernel with its `index`-th candidate (clamped) for this head dim and dtype; None: stop forcing."""
    FORCE_CONFIG.clear()
    if index is not None:
        for name, (configs, candidates) in _CONFIG_LISTS.items():
            cands = candidates(configs, head_dim, dtype)
            FORCE_CONFIG[name] = cands[min(index, len(cands) - 1)]


def config_name(cfg: triton.Config) -> str:
    regs = f"/r{cfg.maxnreg}" if cfg.maxnreg else ""
    return f"{'x'.join(map(str, cfg.kwargs.values()))}/w{cfg.num_warps}/s{cfg.num_stages}{regs}"


def best_configs() -> dict[str, dict]:
    """The autotuner's choices so far (BLOCK_MxBLOCK_N/warps/stages per key), for the benchmark report."""
    return {name: {str(key): config_name(cfg) for key, cfg in tuner.cache.items()} for name, tuner in _tuned.items()}


# ---------------------------------------------------------------------------------------------
# host wrappers


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """Uninitialized, with ``t``'s layout when that is dense (a ``(B, H, T, D)`` view of a
    ``(B, T, H, D)`` buffer gives another such view, so ``o.transpose(1, 2).flatten(-2)`` and the
    projection gradients need no copy), else contiguous."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # positions (Z, H, T) int (any strides), cos, sin


def _rope_args(rope: Rope | None, like: torch.Tensor) -> tuple:
    """(Pos, Cos, Sin, 3 position strides) for a kernel; unused placeholders when ``rope`` is None."""
    if rope is None:
        return like, like, like, 0, 0, 0
    pos, cos, sin = rope
    return pos, cos, sin, *_strides3(pos)


def _rotated_outputs(rope: Rope | None, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """A forward's buffers for the rotated q and k (layouts of q and k) and their 6 strides, with
    ``rope``; else placeholders the kernel never touches."""
    if rope is None:
        return (q, k), (0,) * 6
    qr, kr = _empty_like(q), _empty_like(k)
    return (qr, kr), (*_strides3(qr), *_strides3(kr))


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
              rope: Rope | None = None) -> tuple[torch.Tensor, ...]:
    """q (Z, H, N_Q, D), k, v (Z, H, N_K, D), last dim contiguous -> O (shape and layout of q),
    L (Z*H, N_Q) fp32. ``rope`` (N_Q == N_K): rotate q and k by RoPE as they are loaded, and also
    return them rotated (layouts of q and k): (O, L, q_rot, k_rot), what the backward takes."""
    Z, H, N_Q, D = q.shape
    N_K = k.shape[2]
    o = _empty_like(q)
    L = _empty((Z * H, N_Q), q, torch.float32)
    sm_scale = 1.0 / math.sqrt(D)
    pos, cos, sin, *pos_strides = _rope_args(rope, q)
    rotated, rot_strides = _rotated_outputs(rope, q, k)
    _launch_fwd(
        lambda meta: (Z * H, triton.cdiv(N_Q, meta["BLOCK_M"])),
        q, k, v, o, L, pos, cos, sin, *rotated,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *pos_strides, *rot_strides,
        H, N_Q, N_K, sm_scale * LOG2E,
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), dtype=q.dtype, ROPE=rope is not None,
    )
    return (o, L) if rope is None else (o, L, *rotated)


def flash_bwd(q, k, v, o, L, do, is_causal: bool):
    """Gradients (dQ, dK, dV), each in the layout of its input, of attention given O, L (Z*H, N_Q) and
    dO (any strides, last dim contiguous)."""
    Z, H, N_Q, D = q.shape
    N_K = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D)
    delta = _empty((Z * H, N_Q), q, torch.float32)
    lse2 = _empty((Z * H, N_Q), q, torch.float32)
    pre_m = 32 if _interpreting() else min(128, 4096 // D)
    launch(_bwd_preprocess)[(Z * H, triton.cdiv(N_Q, pre_m))](
        o, do, L, delta, lse2, *_strides3(o), *_strides3(do), H, N_Q, HEAD_DIM=D, BLOCK_M=pre_m
    )
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    _launch_dkdv(
        lambda meta: (Z * H, triton.cdiv(N_K, meta["BLOCK_N"])),
        q, k, v, do, dk, dv, lse2, delta,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
        H, N_Q, N_K, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), dtype=q.dtype,
    )
    _launch_dq(
        lambda meta: (Z * H, triton.cdiv(N_Q, meta["BLOCK_M"])),
        q, k, v, do, dq, lse2, delta,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
        H, N_Q, N_K, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), dtype=q.dtype,
    )
    return dq, dk, dv
