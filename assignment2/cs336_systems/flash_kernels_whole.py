"""A FlashAttention forward for short sequences that holds a whole (batch, head)'s K and V in one program.

``_fwd_whole`` loads a head's K and V once (and rotates K by RoPE once), then for each query tile
takes the scores against *all* keys in one dot: an exact softmax in one pass, with no running max to
rescale by. Causal tiles compute their masked keys too; at these lengths the work is a few GFLOP, and
what costs is latency and memory traffic. The tiled forward (``flash_kernels._fwd_kernel``) instead
streams key tiles, and rotates each K tile again for every query tile that reads it.

The price is registers: K and V are ``SEQ x HEAD_DIM`` tiles (SEQ = the sequence length padded to a
power of two) held for the whole program. At T = 256, d = 32 it compiles to ~255 registers per thread,
one program per SM. So ``flash_attention`` takes it only while a resident tile is at most
``WHOLE_SEQ_BYTES``: by default T <= 128 at d = 32 in bf16. There it is 25% faster than the tiled
forward on an H200 (0.072 vs 0.095 ms per layer at T = 128, 256 sequences); at T = 256 it is slower.

A backward built the same way (Q, dO and dQ resident, Delta in registers, key tiles streamed) was
measured and removed: it lost to the one-launch backward (``flash_kernels_short._bwd_short``) at
T = 64..256 (0.19 vs 0.17 ms at T = 128, 0.31 vs 0.23 at T = 256; docs/benchmarks.md, "Short sequences").

RoPE (optional, ``rope=``), as in ``flash_kernels``: q and k are rotated as they are loaded, and
written rotated for the backward.
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
    _rotated_outputs,
    _strides3,
)


@triton.jit
def _fwd_whole(
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
    SEQ: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """O and L of one (batch, head): K, V (SEQ >= N_K rows) resident, query tiles of BLOCK_M rows.
    ROPE: the rotated q and k also written to QR, KR (for the backward)."""
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
    QR += off_z * stride_qrz + off_h * stride_qrh
    KR += off_z * stride_krz + off_h * stride_krh

    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, SEQ)
    in_k = offs_n < N_K
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_k[:, None], other=0.0)  # (SEQ, D)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_k[:, None], other=0.0)
    if ROPE:
        k = _rope_rows(k, offs_n, N_K, Pos, stride_pt, Cos, Sin, 1.0, SEQ, HEAD_DIM).to(k.dtype)
        tl.store(KR + offs_n[:, None] * stride_krn + offs_d[None, :], k, mask=in_k[:, None])
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < N_Q
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_q[:, None], other=0.0)
        if ROPE:
            q = _rope_rows(q, offs_m, N_Q, Pos, stride_pt, Cos, Sin, 1.0, BLOCK_M, HEAD_DIM).to(q.dtype)
            tl.store(QR + offs_m[:, None] * stride_qrm + offs_d[None, :], q, mask=in_q[:, None])
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


def _cfg(name: str, block: int, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    return triton.Config({name: block}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


# fastest first at T = 256, d = 32 on an H200, without / with RoPE inside (docs/benchmarks.md, "Short
# sequences"); the autotuner times them all (under torch.compile inductor drops the register cap)
FWD_WHOLE_CONFIGS = [_cfg("BLOCK_M", bm, w, s, r) for bm, w, s, r in
                     ((64, 4, 3, None), (64, 4, 2, None), (64, 4, 2, 168), (128, 4, 2, None), (128, 8, 2, None),
                      (32, 4, 2, None))]


def _all(configs: list[triton.Config], head_dim: int, dtype: torch.dtype) -> list[triton.Config]:
    return configs  # (what fits is decided per call by `flash_attention.whole_sequences`)


def seq_pad(n_q: int, n_k: int) -> int:
    """The resident tiles' row count: the longer sequence padded to a power of two (>= 16, tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max(n_q, n_k)))


_launch_fwd = _launcher("fwd_whole", _fwd_whole, FWD_WHOLE_CONFIGS, {"BLOCK_M": 16}, _all)


def flash_fwd_whole(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                    rope: Rope | None = None) -> tuple[torch.Tensor, ...]:
    """`flash_kernels.flash_fwd` (same arguments and results) with one program per (batch, head)."""
    Z, H, N_Q, D = q.shape
    N_K = k.shape[2]
    o = _empty_like(q)
    L = _empty((Z * H, N_Q), q, torch.float32)
    pos, cos, sin, *pos_strides = _rope_args(rope, q)
    rotated, rot_strides = _rotated_outputs(rope, q, k)
    _launch_fwd(
        lambda meta: (Z * H,),
        q, k, v, o, L, pos, cos, sin, *rotated,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *pos_strides, *rot_strides,
        H, N_Q, N_K, LOG2E / math.sqrt(D),
        HEAD_DIM=D, IS_CAUSAL=bool(is_causal), dtype=q.dtype, ROPE=rope is not None, SEQ=seq_pad(N_Q, N_K),
    )
    return (o, L) if rope is None else (o, L, *rotated)
