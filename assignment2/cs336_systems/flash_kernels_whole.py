"""FlashAttention kernels for short sequences that hold a whole (batch, head) in one program.

For the tinystories-17m shape (T = 256, d = 32, 16 heads, 128 sequences) a head's K and V, or its
Q and dO, are 16 KB each in bf16: small enough to keep in registers for the whole program. Then
* the forward (``_fwd_whole``) loads K and V once per head (and rotates K by RoPE once), and for each
  query tile takes the scores against *all* keys in one dot: an exact softmax in one pass, no running
  max to rescale by. Causal tiles compute their masked keys too (the work is a few GFLOP; what costs
  here is latency and memory);
* the backward (``_bwd_whole``) loads Q, dO and O once, computes Delta = rowsum(dO * O) in
  registers (no preprocess launch, no Delta/lse2 buffers), and walks the key tiles: per tile, P and dS
  for all queries at once, dK and dV of the tile, and dQ += dS K accumulated in registers across the
  tiles (no fp32 scratch in memory, unlike ``flash_kernels._bwd_short``, and no atomics). Each input
  is read once and each gradient written once.

The price is registers: ``SEQ x HEAD_DIM`` (SEQ = the sequence length padded to a power of two)
elements of each resident tile per program (~250 registers per thread at T = 256, d = 32: one
program per SM), so ``flash_attention`` takes these kernels only while that is at most
``WHOLE_SEQ_BYTES``: by default up to T = 128 at d = 32 in bf16, where they beat the tiled kernels on an
H200; at T = 256 the tiled forward and the one-launch backward are faster (docs/benchmarks.md).

RoPE (optional, ``rope=``), as in ``flash_kernels``: q and k are rotated as they are loaded, dQ and dK
rotated back before they are stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cs336_systems.flash_kernels import (
    LN2,
    LOG2E,
    Rope,
    _empty,
    _empty_like,
    _launcher,
    _rope_args,
    _rope_rows,
    _strides3,
)

LOG2E_: tl.constexpr = tl.constexpr(LOG2E)  # (a jit function reads only constexpr globals)


@triton.jit
def _fwd_whole(
    Q, K, V, O, L, Pos, Cos, Sin,
    stride_qz, stride_qh, stride_qm,
    stride_kz, stride_kh, stride_kn,
    stride_vz, stride_vh, stride_vn,
    stride_oz, stride_oh, stride_om,
    stride_pz, stride_ph, stride_pt,
    H, N_Q, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    SEQ: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """O and L of one (batch, head): K, V (SEQ >= N_K rows) resident, query tiles of BLOCK_M rows."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # inductor (torch 2.11) passes Python floats as fp64
    off_zh = tl.program_id(0)
    off_z = (off_zh // H).to(tl.int64)
    off_h = (off_zh % H).to(tl.int64)
    Q += off_z * stride_qz + off_h * stride_qh
    K += off_z * stride_kz + off_h * stride_kh
    V += off_z * stride_vz + off_h * stride_vh
    O += off_z * stride_oz + off_h * stride_oh
    L += off_zh.to(tl.int64) * N_Q
    Pos += off_z * stride_pz + off_h * stride_ph

    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, SEQ)
    in_k = offs_n < N_K
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)  # (SEQ, D)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
    if ROPE:
        k = _rope_rows(k, offs_n, N_K, Pos, stride_pt, Cos, Sin, 1.0, SEQ, HEAD_DIM).to(k.dtype)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < N_Q
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_q[:, None], other=0.0)
        if ROPE:
            q = _rope_rows(q, offs_m, N_Q, Pos, stride_pt, Cos, Sin, 1.0, BLOCK_M, HEAD_DIM).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, SEQ), base-2 units
        valid = in_k[None, :]
        if IS_CAUSAL:  # (every row sees key 0, so no row is all -inf)
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(valid, s, float("-inf"))
        m = tl.max(s, 1)
        p = tl.math.exp2(s - m[:, None])
        denom = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v) / denom[:, None]
        tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :], o.to(O.dtype.element_ty), mask=in_q[:, None])
        tl.store(L + offs_m, (m + tl.math.log2(denom)) * LN2, mask=in_q)


@triton.jit
def _bwd_whole(
    Q, K, V, O, DO, DQ, DK, DV, L, Pos, Cos, Sin,
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
    HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, ROPE: tl.constexpr,
    SEQ: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ, dK, dV of one (batch, head): Q, dO (SEQ >= N_Q rows) and dQ resident, key tiles of BLOCK_N rows."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)  # fp64 from inductor (torch 2.11)
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
    L += off_zh.to(tl.int64) * N_Q
    Pos += off_z * stride_pz + off_h * stride_ph

    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, SEQ)
    in_q = offs_m < N_Q
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_q[:, None], other=0.0)  # (SEQ, D)
    do = tl.load(DO + offs_m[:, None] * stride_dom + offs_d[None, :], mask=in_q[:, None], other=0.0)
    o = tl.load(O + offs_m[:, None] * stride_om + offs_d[None, :], mask=in_q[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # D_i = rowsum(dO_i * O_i)
    lse2 = tl.load(L + offs_m, mask=in_q, other=float("inf")) * LOG2E_  # padded rows: P = 0
    if ROPE:
        q = _rope_rows(q, offs_m, N_Q, Pos, stride_pt, Cos, Sin, 1.0, SEQ, HEAD_DIM).to(q.dtype)
    dq = tl.zeros([SEQ, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_k = offs_n < N_K
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
        if ROPE:
            k = _rope_rows(k, offs_n, N_K, Pos, stride_pt, Cos, Sin, 1.0, BLOCK_N, HEAD_DIM).to(k.dtype)
        s = tl.dot(q, tl.trans(k))  # (SEQ, BLOCK_N)
        dp = tl.dot(do, tl.trans(v))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        valid = in_k[None, :]  # padded keys load as 0, whose score is not -inf: mask them
        if IS_CAUSAL:
            valid = valid & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(valid, p, 0.0)
        ds = p * (dp - delta[:, None])
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)  # (BLOCK_N, D)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k, dq)
        if ROPE:
            dk = _rope_rows(dk, offs_n, N_K, Pos, stride_pt, Cos, Sin, -1.0, BLOCK_N, HEAD_DIM)
        tl.store(DK + offs_n[:, None] * stride_dkn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=in_k[:, None])
        tl.store(DV + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=in_k[:, None])
    if ROPE:
        dq = _rope_rows(dq, offs_m, N_Q, Pos, stride_pt, Cos, Sin, -1.0, SEQ, HEAD_DIM)
    tl.store(DQ + offs_m[:, None] * stride_dqm + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=in_q[:, None])


def _cfg(name: str, block: int, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    return triton.Config({name: block}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


# fastest first at T = 256, d = 32 on an H200, without / with RoPE inside (docs/benchmarks.md, "Short
# sequences"); the autotuner times them all
FWD_WHOLE_CONFIGS = [_cfg("BLOCK_M", bm, w, s, r) for bm, w, s, r in
                     ((64, 4, 3, None), (64, 4, 2, None), (64, 4, 2, 168), (128, 4, 2, None), (128, 8, 2, None),
                      (32, 4, 2, None))]
BWD_WHOLE_CONFIGS = [_cfg("BLOCK_N", bn, w, s, r) for bn, w, s, r in
                     ((64, 8, 3, None), (64, 8, 2, None), (32, 4, 2, None), (16, 4, 2, None), (32, 8, 2, None),
                      (16, 8, 2, None))]


def _all(configs: list[triton.Config], head_dim: int, dtype: torch.dtype) -> list[triton.Config]:
    return configs  # (what fits is decided per call by `flash_attention.whole_sequences`)


def seq_pad(n_q: int, n_k: int) -> int:
    """The resident tiles' row count: the longer sequence padded to a power of two (>= 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max(n_q, n_k)))


_launch_fwd = _launcher("fwd_whole", _fwd_whole, FWD_WHOLE_CONFIGS, {"BLOCK_M": 16}, _all)
_launch_bwd = _launcher("bwd_whole", _bwd_whole, BWD_WHOLE_CONFIGS, {"BLOCK_N": 16}, _all)


def flash_fwd_whole(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                    rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`flash_kernels.flash_fwd` (same arguments and results) with one program per (batch, head)."""
    Z, H, N_Q, D = q.shape
    N_K = k.shape[2]
    o = _empty_like(q)
    L = _empty((Z * H, N_Q), q, torch.float32)
    pos, cos, sin, *pos_strides = _rope_args(rope, q)
    _launch_fwd(
        lambda meta: (Z * H,),
        q, k, v, o, L, pos, cos, sin, *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *pos_strides,
        H, N_Q, N_K, LOG2E / math.sqrt(D),
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), dtype=q.dtype, ROPE=rope is not None, SEQ=seq_pad(N_Q, N_K),
    )
    return o, L


def flash_bwd_whole(q, k, v, o, L, do, is_causal: bool, rope: Rope | None = None):
    """`flash_kernels.flash_bwd_short` (same arguments and results) with Q, dO and dQ resident."""
    Z, H, N_Q, D = q.shape
    N_K = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D)
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    pos, cos, sin, *pos_strides = _rope_args(rope, q)
    _launch_bwd(
        lambda meta: (Z * H,),
        q, k, v, o, do, dq, dk, dv, L, pos, cos, sin,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *_strides3(do),
        *_strides3(dq), *_strides3(dk), *_strides3(dv), *pos_strides,
        H, N_Q, N_K, sm_scale * LOG2E, sm_scale,
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), dtype=q.dtype, ROPE=rope is not None, SEQ=seq_pad(N_Q, N_K),
    )
    return dq, dk, dv
