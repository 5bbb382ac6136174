"""FlashAttention-2 (Dao, 2023) behind two autograd Functions, and the multi-head entry point.

* ``FlashAttentionPytorch``: the algorithm in plain PyTorch. Tiled forward with the online softmax
  (FA2 Algorithm 1); it saves only O and the logsumexp L; the tiled backward recomputes P from L
  (FA2 Algorithm 2 with D = rowsum(dO * O)). Runs anywhere; it is the reference the Triton kernels
  are tested against and the CPU fallback of ``flash_attn_mha``.
* ``FlashAttentionTriton``: the same contract with the Triton kernels of ``flash_kernels``
  (forward; backward as a preprocess, a dK/dV pass and a dQ pass, no atomics; for short sequences
  one launch of one program per (batch, head), and for the shortest ones a forward that holds a
  (batch, head)'s K and V in registers). Optionally applies RoPE to q and k inside the kernels.
* ``flash_attn_mha(q, k, v, is_causal=True, rope=None, positions=None)``: ``(B, H, T, D)`` inputs,
  the "flash" attention backend of ``cs336_basics.model``; ``flash_attn_qkvpacked(qkv, num_heads,
  ...)`` the same on the model's one ``(B, T, 3C)`` q/k/v projection, its gradient one tensor too.

Both Functions take ``Q (batch, n_q, d)``, ``K, V (batch, n_k, d)`` (or with a head dimension,
``(batch, heads, n, d)``), scale the scores by ``1/sqrt(d)``, and for ``is_causal`` let query i see
keys j <= i (top-left aligned, as ``torch.nn.functional.scaled_dot_product_attention``). L has the
shape of Q without its last dimension, in natural-log units.

    uv run cs336-systems flash-bench --help    # leaderboard harness and the course's sweep (GPU)
"""

from __future__ import annotations

import math

import torch
from cs336_basics.triton_support import kernel_op
from cs336_basics.triton_support import runs_on as triton_runs_on

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a ValueError naming the problem unless q, k, v are a valid attention call."""
    if not (q.dim() == k.dim() == v.dim()) or q.dim() < 3:
        raise ValueError(
            f"q, k, v must have the same number of dimensions (>= 3, (..., seq, d)); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need q (..., n_q, d), k = v (..., n_k, d))"
        )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError("empty sequence")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")


def _causal_mask(q0: int, nq: int, k0: int, nk: int, device: torch.device) -> torch.Tensor:
    """(nq, nk) bool, True where key k0+j is visible to query q0+i (j <= i)."""
    rows = torch.arange(q0, q0 + nq, device=device)[:, None]
    cols = torch.arange(k0, k0 + nk, device=device)[None, :]
    return cols <= rows


class FlashAttentionPytorch(torch.autograd.Function):
    """FlashAttention-2 in plain PyTorch: tiles of ``TILE_Q`` queries x ``TILE_K`` keys.

    The arithmetic runs in float32 whatever the input dtype (bf16 in, bf16 out).
    """

    TILE_Q = 64
    TILE_K = 64

    @staticmethod
    def forward(ctx, Q, K, V, is_causal=False):
        check_attention_inputs(Q, K, V)
        n_q, n_k, d = Q.shape[-2], K.shape[-2], Q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        bq, bk = FlashAttentionPytorch.TILE_Q, FlashAttentionPytorch.TILE_K
        O = torch.empty_like(Q)
        L = torch.empty(Q.shape[:-1], device=Q.device, dtype=torch.float32)
        for q0 in range(0, n_q, bq):
            q = Q[..., q0 : q0 + bq, :].float()  # (..., bq, d)
            nq = q.shape[-2]
            m = torch.full(q.shape[:-1], -math.inf, device=Q.device)  # running row max
            l = torch.zeros(q.shape[:-1], device=Q.device)  # running row sum of exp
            acc = torch.zeros(q.shape, device=Q.device)  # unnormalised output
            k_end = min(n_k, q0 + nq) if is_causal else n_k  # later keys are all masked
            for k0 in range(0, k_end, bk):
                k = K[..., k0 : k0 + bk, :].float()
                v = V[..., k0 : k0 + bk, :].float()
                s = q @ k.transpose(-1, -2) * scale  # (..., bq, bk)
                if is_causal and k0 + k.shape[-2] - 1 > q0:  # tile crosses the diagonal
                    s = s.masked_fill(~_causal_mask(q0, nq, k0, k.shape[-2], Q.device), -math.inf)
                m_new = torch.maximum(m, s.amax(dim=-1))
                p = torch.exp(s - m_new[..., None])
                alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
                l = alpha * l + p.sum(dim=-1)
                acc = alpha[..., None] * acc + p @ v
                m = m_new
            O[..., q0 : q0 + bq, :] = (acc / l[..., None]).to(O.dtype)
            L[..., q0 : q0 + bq] = m + torch.log(l)
        ctx.save_for_backward(Q, K, V, O, L)
        ctx.is_causal = is_causal
        return O

    @staticmethod
    def backward(ctx, dO):
        Q, K, V, O, L = ctx.saved_tensors
        is_causal = ctx.is_causal
        n_q, n_k, d = Q.shape[-2], K.shape[-2], Q.shape[-1]
        scale = 1.0 / math.sqrt(d)
        bq, bk = FlashAttentionPytorch.TILE_Q, FlashAttentionPytorch.TILE_K
        dO = dO.float()
        Dvec = (dO * O.float()).sum(dim=-1)  # D_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i)
        dQ = torch.zeros(Q.shape, device=Q.device)
        dK = torch.zeros(K.shape, device=K.device)
        dV = torch.zeros(V.shape, device=V.device)
        for k0 in range(0, n_k, bk):
            k = K[..., k0 : k0 + bk, :].float()
            v = V[..., k0 : k0 + bk, :].float()
            nk = k.shape[-2]
            dk = torch.zeros_like(k)
            dv = torch.zeros_like(v)
            q_start = (k0 // bq) * bq if is_causal else 0  # earlier query tiles see none of these keys
            for q0 in range(q_start, n_q, bq):
                q = Q[..., q0 : q0 + bq, :].float()
                do = dO[..., q0 : q0 + bq, :]
                nq = q.shape[-2]
                s = q @ k.transpose(-1, -2) * scale
                p = torch.exp(s - L[..., q0 : q0 + bq, None])  # P recomputed from L
                if is_causal and k0 + nk - 1 > q0:
                    p = p * _causal_mask(q0, nq, k0, nk, Q.device)
                dv += p.transpose(-1, -2) @ do
                dp = do @ v.transpose(-1, -2)
                ds = p * (dp - Dvec[..., q0 : q0 + bq, None]) * scale
                dQ[..., q0 : q0 + bq, :] += ds @ k
                dk += ds.transpose(-1, -2) @ q
            dK[..., k0 : k0 + bk, :] = dk
            dV[..., k0 : k0 + bk, :] = dv
        return dQ.to(Q.dtype), dK.to(K.dtype), dV.to(V.dtype), None


def _check_triton_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_attention_inputs(q, k, v)
    if q.dim() not in (3, 4):
        raise ValueError(f"FlashAttentionTriton takes (batch, seq, d) or (batch, heads, seq, d); got {tuple(q.shape)}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} unsupported by the Triton kernels (supported: {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} unsupported by the Triton kernels (supported: {SUPPORTED_DTYPES})")
    if not triton_runs_on(q.device):
        raise ValueError(
            f"the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {q.device}"
        )


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, 1, T, D) view whose last dimension is contiguous (the kernels need that).

    Other strides pass through as they are. A tensor whose last dim is not contiguous is copied
    whole, also the all-stride-0 gradient of ``o.sum()``: keeping its broadcast dims at stride 0
    (one row of D values) made the leaderboard's backward 4.25 -> 4.82 ms on the H100, every
    program reading the same 128 bytes (one L2 slice); the 33 MB copy costs ~20 us.
    """
    t = t.unsqueeze(1) if t.dim() == 3 else t
    return t if t.stride(-1) == 1 else t.contiguous()


# The kernels as operators (`kernel_op`: a ``triton_op`` that inductor traces into and launches from
# its own code; an opaque custom op under the interpreter), so torch.compile keeps the graph whole.
# Outputs and gradients take the layout of their inputs (see ``flash_kernels._empty_like``).
# ``pos, cos, sin`` (optional): RoPE applied inside the kernels (`flash_attn_mha`'s ``rope``).

# Which kernels run, by sequence length (queries and keys):
# * forward: where a (batch, head)'s K (the padded sequence x d, in the input dtype) is at most
#   WHOLE_SEQ_BYTES, the whole-sequence forward (``flash_kernels_whole``: one program per (batch, head),
#   K and V held in registers); else the tiled forward;
# * backward: up to SHORT_SEQ_MAX the one-launch backward (``flash_kernels_short.flash_bwd_short``: one
#   program per (batch, head), P computed once per tile pair); else the two-pass backward.
WHOLE_SEQ_BYTES = 8192  # T <= 128 at d = 32 in bf16: faster there than the tiled forward, slower at T = 256 (H200)
SHORT_SEQ_MAX = 256


def whole_sequences(q: torch.Tensor, k: torch.Tensor) -> bool:
    from cs336_systems.flash_kernels_whole import seq_pad

    return seq_pad(q.shape[-2], k.shape[-2]) * q.shape[-1] * q.element_size() <= WHOLE_SEQ_BYTES


def short_sequences(q: torch.Tensor, k: torch.Tensor) -> bool:
    return max(q.shape[-2], k.shape[-2]) <= SHORT_SEQ_MAX


def rope_fits_kernels(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernels can apply RoPE: one position table for q and k, the one-launch backward."""
    return q.shape == k.shape and short_sequences(q, k)


def _like(t: torch.Tensor) -> torch.Tensor:
    """What the kernels allocate for an input ``t``: ``empty_like`` of the 4-d view they see."""
    return torch.empty_like(_as_4d(t)).view(t.shape)


def _rope(pos: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None):
    """The kernels' ``rope`` argument: positions as (Z, H, T) (a view), the tables; None without."""
    return None if pos is None else (pos.unsqueeze(1) if pos.dim() == 2 else pos, cos, sin)


def _fwd_fake(q, k, v, is_causal):
    return _like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _fwd_rope_fake(q, k, v, is_causal, pos, cos, sin):
    return *_fwd_fake(q, k, v, is_causal), _like(q), _like(k)


def _forward_kernels(q: torch.Tensor, k: torch.Tensor):
    from cs336_systems import flash_kernels, flash_kernels_whole

    return flash_kernels_whole.flash_fwd_whole if whole_sequences(q, k) else flash_kernels.flash_fwd


def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """O (shape and layout of q) and L (shape of q without d, fp32) from the Triton forward."""
    o, lse = _forward_kernels(q, k)(_as_4d(q), _as_4d(k), _as_4d(v), is_causal)
    return o.view(q.shape), lse.view(q.shape[:-1])


def _flash_fwd_rope(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
    pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_flash_fwd` with q and k rotated by RoPE inside the kernels: (O, L, q rotated, k rotated),
    the last two in the layouts of q and k, for the backward."""
    o, lse, qr, kr = _forward_kernels(q, k)(_as_4d(q), _as_4d(k), _as_4d(v), is_causal, _rope(pos, cos, sin))
    return o.view(q.shape), lse.view(q.shape[:-1]), qr.view(q.shape), kr.view(k.shape)


def _bwd_fake(q, k, v, o, lse, do, is_causal, pos=None, cos=None, sin=None):
    return _like(q), _like(k), _like(v)


def _flash_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    is_causal: bool,
    pos: torch.Tensor | None = None, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV), each in its input's layout, from the Triton backward; dO may be non-contiguous or stride-0.
    Short sequences take the one-launch backward (the only one that applies RoPE). With ``pos, cos,
    sin``, q and k are the rotated ones `_flash_fwd_rope` returned, and dQ, dK are those of the
    unrotated inputs."""
    from cs336_systems import flash_kernels, flash_kernels_short

    args = (_as_4d(q), _as_4d(k), _as_4d(v), _as_4d(o), lse.view(-1, q.shape[-2]), _as_4d(do), is_causal)
    if pos is not None or short_sequences(q, k):  # (RoPE inside: the forward checked the length)
        dq, dk, dv = flash_kernels_short.flash_bwd_short(*args, _rope(pos, cos, sin))
    else:
        dq, dk, dv = flash_kernels.flash_bwd(*args)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, H, T, D)``: views of ``qkv`` ``(B, T, 3·H·D)``, whose last dim holds q, k, v side by
    side, each head ``h`` at columns ``h*D:(h+1)*D`` of its third (the fused projection's output)."""
    return tuple(t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))


def _bwd_packed_fake(q, k, v, o, lse, do, is_causal, pos=None, cos=None, sin=None):
    b, h, t, d = q.shape
    return q.new_empty((b, t, 3 * h * d))


def _flash_bwd_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    is_causal: bool,
    pos: torch.Tensor | None = None, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """`_flash_bwd` for 4-d q, k, v of one shape, its three gradients side by side in one
    ``(B, T, 3·H·D)`` tensor, the layout of `split_qkv`'s input, which the fused projection's
    backward takes as it is: the one-launch backward writes them there (three separate ones would
    be copied into one, ~0.05 ms a layer at the tinystories-17m shape on the H200); the two-pass
    backward's are concatenated."""
    from cs336_systems import flash_kernels, flash_kernels_short

    b, h, t, d = q.shape
    args = (q, k, v, _as_4d(o), lse.view(-1, t), _as_4d(do), is_causal)
    if pos is not None or short_sequences(q, k):
        dqkv = q.new_empty((b, t, 3 * h * d))
        flash_kernels_short.flash_bwd_short(*args, _rope(pos, cos, sin), packed=dqkv)
        return dqkv
    return torch.cat([g.transpose(1, 2).flatten(-2) for g in flash_kernels.flash_bwd(*args)], dim=-1)


flash_fwd_op = kernel_op("cs336_systems::flash_fwd", _fwd_fake)(_flash_fwd)
flash_fwd_rope_op = kernel_op("cs336_systems::flash_fwd_rope", _fwd_rope_fake)(_flash_fwd_rope)
flash_bwd_op = kernel_op("cs336_systems::flash_bwd", _bwd_fake)(_flash_bwd)
flash_bwd_packed_op = kernel_op("cs336_systems::flash_bwd_packed", _bwd_packed_fake)(_flash_bwd_packed)


class FlashAttentionTriton(torch.autograd.Function):
    """FlashAttention-2 as Triton kernels (``flash_kernels``); same contract as the PyTorch one.
    Under ``torch.compile`` the kernels run as the operators above; in eager mode the same code is
    called directly (an operator call costs ~25 us of host time, and eager steps are host-bound).

    Optional ``positions, cos, sin`` (short sequences, N_Q == N_K only): q and k are rotated by
    RoPE (adjacent pairs, fp32 tables ``(max_seq_len, D/2)``, ``positions`` int of q's shape without
    d) inside the kernels, and their gradients are those of the unrotated inputs."""

    @staticmethod
    def forward(ctx, Q, K, V, is_causal=False, positions=None, cos=None, sin=None):
        return _triton_forward(ctx, Q, K, V, is_causal, positions, cos, sin)

    @staticmethod
    def backward(ctx, dO):
        Q, K, V, O, L, *rope = ctx.saved_tensors
        bwd = flash_bwd_op if torch.compiler.is_compiling() else _flash_bwd
        dQ, dK, dV = bwd(Q, K, V, O, L, dO, ctx.is_causal, *rope)
        return dQ, dK, dV, None, None, None, None


def _triton_forward(ctx, Q, K, V, is_causal, positions, cos, sin) -> torch.Tensor:
    """The forward of the two Triton Functions: checks, kernels, what the backward needs saved."""
    _check_triton_inputs(Q, K, V)
    if positions is not None and not rope_fits_kernels(Q, K):
        raise ValueError(
            f"RoPE inside the kernels needs q and k of one shape with at most {SHORT_SEQ_MAX} positions; "
            f"got q {tuple(Q.shape)}, k {tuple(K.shape)}"
        )
    compiling = torch.compiler.is_compiling()
    if positions is None:
        rope = ()
        O, L = (flash_fwd_op if compiling else _flash_fwd)(Q, K, V, is_causal)
    else:  # the backward takes the rotated q and k the forward wrote (the inputs are not kept)
        rope = (positions, cos, sin)
        O, L, Q, K = (flash_fwd_rope_op if compiling else _flash_fwd_rope)(Q, K, V, is_causal, *rope)
    ctx.save_for_backward(Q, K, V, O, L, *rope)
    ctx.is_causal = is_causal
    return O


class FlashAttentionQKVPacked(torch.autograd.Function):
    """`FlashAttentionTriton` on q, k, v packed in one ``(B, T, 3·H·D)`` tensor (`split_qkv`), whose
    gradient comes back as one tensor of that shape: the backward writes dQ, dK, dV side by side
    (`_flash_bwd_packed`) instead of autograd concatenating three. Returns O ``(B, H, T, D)``."""

    @staticmethod
    def forward(ctx, qkv, num_heads, is_causal=True, positions=None, cos=None, sin=None):
        return _triton_forward(ctx, *split_qkv(qkv, num_heads), is_causal, positions, cos, sin)

    @staticmethod
    def backward(ctx, dO):
        Q, K, V, O, L, *rope = ctx.saved_tensors
        bwd = flash_bwd_packed_op if torch.compiler.is_compiling() else _flash_bwd_packed
        return bwd(Q, K, V, O, L, dO, ctx.is_causal, *rope), None, None, None, None, None


def flash_attn_mha(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True,
    rope: torch.nn.Module | None = None, positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over ``(B, H, T, D)`` tensors: Triton kernels on CUDA, the PyTorch version elsewhere.

    Under autocast the inputs are cast to the autocast dtype first (RoPE may leave q, k in float32
    while v is bf16).

    ``rope`` (a ``cs336_basics.model.RotaryPositionalEmbedding``) with ``positions`` (int,
    broadcastable to ``(B, H, T)``): q and k are rotated first. For self-attention over short
    sequences (`SHORT_SEQ_MAX`) on the Triton path the kernels do it as they load q and k (no
    rotated copies written and read back, nor their gradients); elsewhere ``rope`` runs as a module.
    The model passes them because this function says so (``applies_rope``).
    """
    if torch.is_autocast_enabled(q.device.type):
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    triton_ok = triton_runs_on(q.device)
    if rope is not None:
        if triton_ok and rope_fits_kernels(q, k):
            pos = torch.broadcast_to(positions, q.shape[:-1])
            return FlashAttentionTriton.apply(q, k, v, is_causal, pos, rope.cos, rope.sin)
        q, k = rope(q, positions), rope(k, positions)
    if triton_ok:
        return FlashAttentionTriton.apply(q, k, v, is_causal)
    return FlashAttentionPytorch.apply(q, k, v, is_causal)


def flash_attn_qkvpacked(
    qkv: torch.Tensor, num_heads: int, is_causal: bool = True,
    rope: torch.nn.Module | None = None, positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """`flash_attn_mha` on q, k, v packed in one ``(B, T, 3·H·D)`` tensor (`split_qkv`: the output of
    one fused q/k/v projection) -> O ``(B, H, T, D)``. On the Triton path (`FlashAttentionQKVPacked`)
    the gradient is one tensor of ``qkv``'s shape; elsewhere this is `flash_attn_mha` on the views."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be (batch, seq, 3 * {num_heads} heads * head_dim); got {tuple(qkv.shape)}")
    if torch.is_autocast_enabled(qkv.device.type):
        qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
    q, k, v = split_qkv(qkv, num_heads)
    if not triton_runs_on(qkv.device) or (rope is not None and not rope_fits_kernels(q, k)):
        return flash_attn_mha(q, k, v, is_causal, rope, positions)
    rope_args = () if rope is None else (torch.broadcast_to(positions, q.shape[:-1]), rope.cos, rope.sin)
    return FlashAttentionQKVPacked.apply(qkv, num_heads, is_causal, *rope_args)


# read by cs336_basics.model.MultiHeadSelfAttention
flash_attn_mha.applies_rope = True
flash_attn_mha.qkv_packed = flash_attn_qkvpacked
