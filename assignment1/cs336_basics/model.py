"""The CS336 Transformer language model, written from scratch, top to bottom.

Pre-norm decoder-only Transformer (Llama-style): RMSNorm, causal multi-head self-attention with
rotary position embeddings (RoPE, Su et al. 2021, rotating *adjacent* pairs ``(x[2i], x[2i+1])``),
SwiGLU feed-forward (Shazeer 2020), no biases. Options for the course's ablations: ``norm="post"``
or ``"none"``, ``use_rope=False`` (NoPE), ``ffn="silu"``, ``tie_embeddings=True``.

The attention kernel is chosen once, at construction (``attn_backend``): ``"math"`` (our own
softmax attention below), ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``),
``"flash"`` (``cs336_systems.flash_attention.flash_attn_mha``) or any callable
``attn_fn(q, k, v, is_causal) -> o`` on ``(B, H, T, D)`` tensors. ``forward`` never branches on it,
except that a backend with ``attn_fn.applies_rope = True`` (the "flash" one) is handed q, k unrotated
with ``rope=`` (the module) and ``positions=``, so it can rotate them inside its kernels, and one
with ``attn_fn.qkv_packed(qkv, num_heads, is_causal, **rope)`` (the "flash" one) is handed the fused
projection's ``(B, T, 3C)`` output as it is, so its backward can return one gradient for it.

RMSNorm, RoPE and SwiGLU's ``silu(a) · b`` run as Triton kernels, forward and backward, on CUDA in
eager mode (``fused_rmsnorm.py``, ``fused_rope.py``, ``fused_swiglu.py``: one pass over memory
where the PyTorch ops below take several); under ``torch.compile`` inductor fuses the PyTorch ops
itself, except for the kernels in ``COMPILED_KERNELS`` (operators: RoPE, which keeps q/k in the
projections' layout, and SwiGLU's gate on the halves of the one ``[W1; W3]`` product, whose
gradient inductor would otherwise assemble with a slower ``cat``). The PyTorch ops stay the
reference and run everywhere else; ``model.FUSED_KERNELS = False`` runs them on CUDA too (to
measure before/after in one process).

Shapes: B batch, T sequence, H heads, D head dim, C d_model, F d_ff, V vocab.

    from cs336_basics.model import TransformerLM
    lm = TransformerLM(10_000, 256, 512, 4, 16, 1344)      # the course's TinyStories 17M model
    logits = lm(token_ids)                                  # (B, T) -> (B, T, V)
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cs336_basics.triton_support import kernels_for, runs_on, traceable_kernels

AttnFn = Callable[[Tensor, Tensor, Tensor, bool], Tensor]

FUSED_KERNELS = True  # False: the PyTorch ops on every device (read at each call, see `triton_kernels`)
# the kernels that are operators (``triton_support.kernel_op``) and also replace inductor's fusion of
# the PyTorch ops under torch.compile; empty: inductor fuses everything (to measure one against the other)
COMPILED_KERNELS: set[str] = {"fused_rope", "fused_swiglu"}
# ``forward(ids, targets=y)`` on CUDA: True runs the LM head and the loss as one op
# (``fused_cross_entropy.linear_cross_entropy``; the logits are freed inside it), False the head GEMM
# + the two-kernel Triton loss, None (default) the first under ``torch.compile`` and the second in
# eager mode, as measured on the H200 (docs/benchmarks.md): compiled, the fused op gave 11.23 ms per
# tinystories-17m step against 11.80 for the loss inside the graph (inductor copies the (N, V)
# logits twice around a separate loss op) and 11.96 for the loss outside it; eager it was slower.
FUSED_LM_HEAD: bool | None = None


def triton_kernels(name: str, x: Tensor) -> ModuleType | None:
    """The Triton kernel module ``cs336_basics.<name>`` to run on ``x``, or None for the PyTorch ops:
    None when `FUSED_KERNELS` is off, while ``torch.compile`` traces unless ``name`` is in
    `COMPILED_KERNELS` (inductor fuses the PyTorch ops itself), where Triton cannot take ``x`` (CPU
    outside the interpreter) or for its dtype."""
    if not FUSED_KERNELS:
        return None
    if torch.compiler.is_compiling():
        kernels = traceable_kernels(name) if name in COMPILED_KERNELS and runs_on(x.device) else None
    else:
        kernels = kernels_for(x.device, name)
    return kernels if kernels is not None and x.dtype in kernels.SUPPORTED_DTYPES else None


def fused_lm_loss() -> Callable[[Tensor, Tensor, Tensor], Tensor] | None:
    """``fused_cross_entropy.linear_cross_entropy`` (LM head + loss), or None without Triton; by
    `traceable_kernels`, so ``torch.compile`` traces the lookup."""
    kernels = traceable_kernels("fused_cross_entropy")
    return None if kernels is None else kernels.linear_cross_entropy


def fuse_here(fuse_projections: bool | None, x: Tensor) -> bool:
    """A module's ``fuse_projections`` for input ``x``: True or False as set, or for None (the default)
    True where the Triton kernels run (CUDA, or the CPU under the interpreter, which stands in for
    it in tests). On a GPU one wide matmul beats two or three (docs/benchmarks.md, eighth round). On
    a CPU the concatenated weights cost more than they save: a copy of every weight per forward
    against matmuls that are no faster together (one-token decoding of the 17M model, 2 cores:
    5.5 ms per token fused, 3.6 ms apart)."""
    return runs_on(x.device) if fuse_projections is None else fuse_projections


def unhooked(*modules: nn.Module) -> bool:
    """Whether no forward hook is registered on any of ``modules``: only then may a fused projection
    read their weights directly instead of calling them (a wrapper that gathers or swaps a Linear's
    weight in its hooks, e.g. ``cs336_systems.fsdp``, must see the call)."""
    return not any(m._forward_pre_hooks or m._forward_hooks for m in modules)


# ----------------------------------------------------------------------------- leaf ops


def silu(x: Tensor) -> Tensor:
    """SiLU / swish: ``x * sigmoid(x)``."""
    return x * torch.sigmoid(x)


def softmax(x: Tensor, dim: int) -> Tensor:
    """Numerically stable softmax: subtracting the max makes every ``exp`` ≤ 1."""
    z = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return z / z.sum(dim=dim, keepdim=True)


class Linear(nn.Module):
    """``y = x W^T`` without bias; ``W`` is ``(d_out, d_in)`` and starts as
    N(0, 2 / (d_in + d_out)) truncated at ±3σ (the course's initialization)."""

    def __init__(self, d_in: int, d_out: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (d_in + d_out))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T  # (..., d_in) -> (..., d_out)

    def extra_repr(self) -> str:
        return f"d_in={self.weight.shape[1]}, d_out={self.weight.shape[0]}"


class Embedding(nn.Module):
    """Lookup table ``(vocab_size, d_model)``, initialized N(0, 1) truncated at ±3."""

    def __init__(self, vocab_size: int, d_model: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        return self.weight[token_ids]  # (...) -> (..., C)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * w`` (Zhang & Sennrich 2019). ``feeds_matmul``: the output goes
    only into Linears, so under autocast the Triton kernel writes it in the autocast dtype, the
    values the Linears' casts would make (a full-size cast per Linear saved; see fused_rmsnorm.py)."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None, *, feeds_matmul: bool = False):
        super().__init__()
        self.eps, self.feeds_matmul = eps, feeds_matmul
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if (kernels := triton_kernels("fused_rmsnorm", x)) is not None:
            return kernels.rms_norm(x, self.weight, self.eps, autocast_output=self.feeds_matmul)
        in_dtype = x.dtype
        x = x.float()  # fp32 for the mean of squares: bf16 loses too much in the sum
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(in_dtype)


class RotaryPositionalEmbedding(nn.Module):
    """RoPE: rotate each adjacent pair ``(x[2i], x[2i+1])`` of a query/key vector by the angle
    ``pos * theta^(-2i/d_k)``. cos/sin tables are precomputed for ``max_seq_len`` positions and
    kept as non-persistent buffers (not in the state dict: they are a function of the config)."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even head dimension, got d_k={d_k}")
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=torch.float64) / d_k)
        angles = torch.arange(max_seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # (max_seq_len, D/2)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        """``x`` ``(..., T, D)``, ``token_positions`` ``(..., T)`` broadcastable to x's leading dims."""
        if (kernels := triton_kernels("fused_rope", x)) is not None:
            return kernels.rope(x, token_positions, self.cos, self.sin)
        cos, sin = self.cos[token_positions], self.sin[token_positions]  # (..., T, D/2)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., T, D/2) each: even, odd
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., T, D/2, 2)
        return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- attention


def scaled_dot_product_attention(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(Q K^T / sqrt(d_k)) V`` (Vaswani et al. 2017, eq. 1). ``mask`` ``(..., q, k)`` bool,
    True where a query may attend."""
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])  # (..., q, k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return softmax(scores, dim=-1) @ V  # (..., q, d_v)


def causal_mask(t_q: int, t_k: int, device=None) -> Tensor:
    """``(t_q, t_k)`` bool mask, aligned bottom-right: query i sits at position ``t_k - t_q + i``
    (so it also serves a KV-cache chunk whose keys start earlier)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def math_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    """Our own attention as a backend: ``(B, H, T, D)`` in and out."""
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if is_causal else None
    return scaled_dot_product_attention(q, k, v, mask)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
    """PyTorch's fused kernel (FlashAttention-2 / memory-efficient on CUDA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def resolve_attn_backend(backend: str | AttnFn) -> AttnFn:
    """Turn ``"math"``/``"sdpa"``/``"flash"``/a callable into ``attn_fn(q, k, v, is_causal)``."""
    if callable(backend):
        return backend
    if backend == "math":
        return math_attention
    if backend == "sdpa":
        return sdpa_attention
    if backend == "flash":
        try:  # imported lazily: cs336_basics must not depend on cs336_systems
            module = importlib.import_module("cs336_systems.flash_attention")
            return module.flash_attn_mha
        except (ImportError, AttributeError) as e:
            raise ImportError(
                "attn_backend='flash' needs cs336_systems.flash_attention.flash_attn_mha "
                f"(install the cs336-systems package): {e}"
            ) from e
    raise ValueError(f"unknown attn_backend {backend!r}; use 'math', 'sdpa', 'flash' or a callable")


@dataclass
class KVCache:
    """Preallocated keys/values of every layer, ``(L, B, H, max_len, D)``, for generation:
    each new token costs one attention row over the cached prefix instead of a full recompute."""

    k: Tensor
    v: Tensor
    length: int = 0  # positions already filled

    @classmethod
    def empty(cls, num_layers, batch, num_heads, max_len, head_dim, device=None, dtype=None):
        shape = (num_layers, batch, num_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention. Head h uses rows ``h*D:(h+1)*D`` of each projection.

    ``fuse_projections`` (an attribute, per instance; None = where Triton runs, `fuse_here`): q, k and
    v come from one ``(T, C) x (C, 3C)`` matmul on the three weights concatenated at each forward (the
    parameters stay ``q_proj``, ``k_proj``, ``v_proj``); one GEMM instead of three, forward and
    backward. Not while any of the three has a forward hook (`unhooked`): then each is called."""

    fuse_projections: bool | None = None

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rope: RotaryPositionalEmbedding | None = None,
        attn_backend: str | AttnFn = "math",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.k_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.v_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.output_proj = Linear(d_model, d_model, device=device, dtype=dtype)
        self.rope = rope
        self.attn_fn = resolve_attn_backend(attn_backend)
        # a backend that says it can (``applies_rope``, e.g. the "flash" one) gets q, k unrotated with
        # ``rope=, positions=`` and applies RoPE itself (inside its kernels where it can)
        self.attn_applies_rope = rope is not None and getattr(self.attn_fn, "applies_rope", False)

    def forward(
        self,
        x: Tensor,
        token_positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> Tensor:
        t = x.shape[-2]
        past = kv_cache.length if kv_cache is not None else 0
        pos = rope_kw = None
        if self.rope is not None:
            if token_positions is None:
                token_positions = torch.arange(past, past + t, device=x.device)
            pos = token_positions.unsqueeze(-2) if token_positions.dim() > 1 else token_positions  # (..., 1, T)
            if self.attn_applies_rope and kv_cache is None:
                rope_kw = {"rope": self.rope, "positions": pos}
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if fuse_here(self.fuse_projections, x) and unhooked(*projections):  # q, k, v: views of one (..., T, 3C) product
            qkv = x @ torch.cat([p.weight for p in projections]).T
            packed = getattr(self.attn_fn, "qkv_packed", None)  # a backend that takes qkv as it is
            if packed is not None and kv_cache is None and qkv.dim() == 3 and (self.rope is None or rope_kw):
                o = packed(qkv, self.num_heads, t > 1, **(rope_kw or {}))  # (B, H, T, D)
                return self.output_proj(o.transpose(-3, -2).flatten(-2))
            q, k, v = qkv.split(self.q_proj.weight.shape[0], dim=-1)
        else:
            q, k, v = (p(x) for p in projections)
        # (..., T, C) -> (..., H, T, D)
        q, k, v = (u.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2) for u in (q, k, v))
        if self.rope is not None and rope_kw is None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        attn_fn = self.attn_fn
        if kv_cache is not None:
            kv_cache.k[layer_idx, ..., past:past + t, :] = k
            kv_cache.v[layer_idx, ..., past:past + t, :] = v
            k = kv_cache.k[layer_idx, ..., :past + t, :].to(q.dtype)
            v = kv_cache.v[layer_idx, ..., :past + t, :].to(q.dtype)
            if past and t > 1:  # fused kernels align is_causal top-left; ours aligns bottom-right
                attn_fn = math_attention
        o = attn_fn(q, k, v, t > 1, **(rope_kw or {}))  # (..., H, T, D); one query needs no mask
        return self.output_proj(o.transpose(-3, -2).flatten(-2))  # (..., T, C)


# ----------------------------------------------------------------------------- feed-forward


class SwiGLU(nn.Module):
    """``W2 (SiLU(W1 x) ⊙ W3 x)`` (Shazeer 2020).

    ``fuse_projections`` (an attribute, per instance; None = where Triton runs, `fuse_here`): ``W1 x``
    and ``W3 x`` come from one matmul on ``[W1; W3]`` concatenated at each forward (the parameters
    stay ``w1``, ``w3``), the gate reads the two halves of its ``(..., 2F)`` product. Not while ``w1``
    or ``w3`` has a forward hook (`unhooked`)."""

    fuse_projections: bool | None = None

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if fuse_here(self.fuse_projections, x) and unhooked(self.w1, self.w3):
            ab = x @ torch.cat([self.w1.weight, self.w3.weight]).T  # (..., 2F): W1 x, then W3 x
            if (kernels := triton_kernels("fused_swiglu", ab)) is not None:
                return self.w2(kernels.silu_mul_packed(ab))
            a, b = ab.chunk(2, dim=-1)
        else:
            a, b = self.w1(x), self.w3(x)  # (..., F) each
            # (compiled, the gate's operator would take them concatenated: inductor fuses it instead)
            if not torch.compiler.is_compiling() and (kernels := triton_kernels("fused_swiglu", a)) is not None:
                return self.w2(kernels.silu_mul(a, b))
        return self.w2(silu(a) * b)


class SiLUFFN(nn.Module):
    """``W2 SiLU(W1 x)``: the ungated ablation (use d_ff = 4 d_model to match SwiGLU's params)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(silu(self.w1(x)))


# ----------------------------------------------------------------------------- block and LM


class TransformerBlock(nn.Module):
    """Pre-norm: ``x + attn(ln1(x))`` then ``+ ffn(ln2(.))``. Post-norm: ``ln1(x + attn(x))`` then
    ``ln2(. + ffn(.))`` (the original Transformer). ``norm="none"``: plain residuals."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        rope: RotaryPositionalEmbedding | None = None,
        *,
        norm: str = "pre",
        ffn: str = "swiglu",
        attn_backend: str | AttnFn = "math",
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if norm not in ("pre", "post", "none"):
            raise ValueError(f"norm must be 'pre', 'post' or 'none', got {norm!r}")
        if ffn not in ("swiglu", "silu"):
            raise ValueError(f"ffn must be 'swiglu' or 'silu', got {ffn!r}")
        kw = {"device": device, "dtype": dtype}
        self.pre_norm = norm == "pre"
        self.attn = MultiHeadSelfAttention(d_model, num_heads, rope, attn_backend, **kw)
        self.ffn = SwiGLU(d_model, d_ff, **kw) if ffn == "swiglu" else SiLUFFN(d_model, d_ff, **kw)
        # pre-norm: each norm's output feeds only the next projections
        make_norm = (lambda: RMSNorm(d_model, eps, feeds_matmul=norm == "pre", **kw)) if norm != "none" else nn.Identity
        self.ln1, self.ln2 = make_norm(), make_norm()

    def forward(self, x: Tensor, token_positions: Tensor | None = None,
                kv_cache: KVCache | None = None, layer_idx: int = 0) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), token_positions, kv_cache, layer_idx)
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x, token_positions, kv_cache, layer_idx))
        return self.ln2(x + self.ffn(x))


class TransformerLM(nn.Module):
    """Token embedding → ``num_layers`` blocks → final RMSNorm → LM head. (B, T) ids -> (B, T, V)."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        d_ff: int,
        rope_theta: float = 10000.0,
        *,
        norm: str = "pre",
        ffn: str = "swiglu",
        use_rope: bool = True,
        tie_embeddings: bool = False,
        attn_backend: str | AttnFn = "math",
        eps: float = 1e-5,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.vocab_size, self.context_length = vocab_size, context_length
        self.num_layers, self.num_heads, self.d_model = num_layers, num_heads, d_model
        kw = {"device": device, "dtype": dtype}
        rope = RotaryPositionalEmbedding(rope_theta, d_model // num_heads, context_length, device) if use_rope else None
        self.token_embeddings = Embedding(vocab_size, d_model, **kw)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, num_heads, d_ff, rope, norm=norm, ffn=ffn,
                             attn_backend=attn_backend, eps=eps, **kw)
            for _ in range(num_layers)
        )
        self.ln_final = RMSNorm(d_model, eps, feeds_matmul=True, **kw) if norm != "none" else nn.Identity()
        self.lm_head = Linear(d_model, vocab_size, **kw)
        if tie_embeddings:  # one (V, C) matrix serves as both input and output embedding
            self.lm_head.weight = self.token_embeddings.weight

    def forward(self, token_ids: Tensor, kv_cache: KVCache | None = None, targets: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, V)`` of ``token_ids`` ``(B, T)``; with ``targets`` ``(B, T)`` instead the mean
        cross-entropy (fp32 scalar): on CUDA the Triton loss of ``nn_utils.cross_entropy``, or the LM
        head and loss as one op (the logits are never kept), see `FUSED_LM_HEAD`."""
        t = token_ids.shape[-1]
        past = kv_cache.length if kv_cache is not None else 0
        if past + t > self.context_length:
            raise ValueError(
                f"sequence of {past + t} tokens is longer than the model's context_length={self.context_length}"
            )
        positions = torch.arange(past, past + t, device=token_ids.device)  # (T,)
        x = self.token_embeddings(token_ids)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length = past + t
        h = self.ln_final(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(h)  # (B, T, V)
        fused_head = torch.compiler.is_compiling() if FUSED_LM_HEAD is None else FUSED_LM_HEAD
        fused_head = fused_head and torch.is_grad_enabled()  # its forward also writes the (N, V) gradient
        if FUSED_KERNELS and fused_head and runs_on(h.device) and (fused := fused_lm_loss()) is not None:
            return fused(h, self.lm_head.weight, targets)
        from cs336_basics.nn_utils import cross_entropy  # here: nn_utils imports this module

        return cross_entropy(self.lm_head(h), targets)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` (default: context) tokens."""
        w = self.lm_head.weight
        return KVCache.empty(self.num_layers, batch_size, self.num_heads, max_len or self.context_length,
                             self.d_model // self.num_heads, device=w.device, dtype=dtype or w.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the input embedding (as in Kaplan et al.)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.lm_head.weight is not self.token_embeddings.weight:
            n -= self.token_embeddings.weight.numel()
        return n
