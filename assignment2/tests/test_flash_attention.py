"""FlashAttention-2 (PyTorch and Triton) against naive float64 attention: output, L and all grads.

The Triton kernels run on CPU under ``TRITON_INTERPRET=1``. Triton reads that variable when a
kernel is decorated, i.e. when ``cs336_systems.flash_kernels`` is first imported, so those cases
run in a child pytest process with the variable set (``test_triton_kernels_in_interpreter``);
in this process they are deselected (conftest). The GPU twin at real sizes is ``scripts/gpu_flash_check.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from cs336_basics.model import RotaryPositionalEmbedding, TransformerLM
from cs336_basics.triton_support import interpreting, run_interpreter_tests
from cs336_systems import flash_attention
from cs336_systems.flash_attention import (
    FlashAttentionPytorch,
    FlashAttentionTriton,
    flash_attn_mha,
    flash_attn_qkvpacked,
    flash_bwd_op,
    flash_bwd_packed_op,
    flash_fwd_op,
    flash_fwd_rope_op,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INTERPRETING = interpreting()
interp_only = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child process")

# (q shape, n_k): 3-D is the adapter contract (batch, seq, d), 4-D adds heads; ragged lengths
# cross several tiles of both implementations (PyTorch 64, interpreter 16/32) with a partial last one.
SHAPES = [
    ((2, 64, 16), 64),
    ((3, 100, 32), 100),
    ((1, 129, 64), 129),
    ((2, 2, 50, 128), 50),
    ((2, 37, 16), 70),  # n_q != n_k
    ((1, 70, 32), 37),
]
INTERP_SHAPES = [SHAPES[0], SHAPES[2], SHAPES[3], SHAPES[4]]  # the interpreter is slow: a subset


def attention_reference(q, k, v, is_causal):
    """Naive attention in float64: (O, L)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        n_q, n_k = s.shape[-2:]
        s = s.masked_fill(torch.arange(n_k)[None, :] > torch.arange(n_q)[:, None], -math.inf)
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def rope_reference(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE in float64 from its formula: adjacent pairs (x[2i], x[2i+1]) rotated by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = pos.double()[..., None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x.double()[..., 0::2], x.double()[..., 1::2]
    return torch.stack((x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()), -1).flatten(-2)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def check_against_reference(fn, q_shape, n_k, is_causal, dtype=torch.float32, tol=1e-5, grad_layout="dense"):
    g = torch.Generator().manual_seed(hash((q_shape, n_k, is_causal)) % 2**31)
    kv_shape = (*q_shape[:-2], n_k, q_shape[-1])
    q, k, v = (torch.randn(s, generator=g).to(dtype).requires_grad_() for s in (q_shape, kv_shape, kv_shape))
    o = fn(q, k, v, is_causal)
    saved_L = [t for t in o.grad_fn.saved_tensors if t.shape == q.shape[:-1]]
    assert len(saved_L) == 1, "exactly one saved tensor must have the shape of L"
    if grad_layout == "dense":
        do = torch.randn(q_shape, generator=g).to(dtype)
        (o * do).sum().backward()
    elif grad_layout == "sum":  # all strides 0, as the leaderboard's o.sum().backward()
        do = torch.ones(q_shape, dtype=dtype)
        o.sum().backward()
    elif grad_layout == "sum_over_tokens":  # token stride 0, last dim dense
        w = torch.randn(q_shape[-1], generator=g).to(dtype)
        do = w.expand(q_shape)
        (o.sum(dim=-2) * w).sum().backward()
    else:  # a non-contiguous gradient: backward through a transpose
        do = torch.randn(q_shape, generator=g).to(dtype)
        (o.transpose(-1, -2) * do.transpose(-1, -2).contiguous()).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, L_ref = attention_reference(q64, k64, v64, is_causal)
    (o_ref * do.double()).sum().backward()
    errors = {
        "O": rel_err(o, o_ref),
        "L": rel_err(saved_L[0], L_ref),
        "dQ": rel_err(q.grad, q64.grad),
        "dK": rel_err(k.grad, k64.grad),
        "dV": rel_err(v.grad, v64.grad),
    }
    assert max(errors.values()) < tol, errors


# --------------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("q_shape,n_k", SHAPES)
def test_pytorch_flash_matches_reference(q_shape, n_k, is_causal):
    check_against_reference(FlashAttentionPytorch.apply, q_shape, n_k, is_causal)


@pytest.mark.parametrize("grad_layout", ["sum", "sum_over_tokens", "transposed"])
def test_pytorch_flash_odd_grad_layouts(grad_layout):
    check_against_reference(FlashAttentionPytorch.apply, (2, 80, 32), 80, True, grad_layout=grad_layout)


def test_pytorch_flash_bf16():
    check_against_reference(FlashAttentionPytorch.apply, (2, 96, 64), 96, True, dtype=torch.bfloat16, tol=1e-2)


def test_flash_attn_mha_on_cpu_uses_pytorch():
    q, k, v = (torch.randn(2, 3, 40, 16) for _ in range(3))
    o = flash_attn_mha(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


def test_triton_rejects_unsupported_inputs():
    q = torch.randn(1, 8, 16)
    with pytest.raises(ValueError, match="head dim"):
        FlashAttentionTriton.apply(torch.randn(1, 8, 24), torch.randn(1, 8, 24), torch.randn(1, 8, 24))
    with pytest.raises(ValueError, match="dtype"):
        FlashAttentionTriton.apply(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="dtypes differ"):
        FlashAttentionTriton.apply(q, q, q.bfloat16())
    with pytest.raises(ValueError, match="shape mismatch"):
        FlashAttentionTriton.apply(q, torch.randn(1, 8, 32), torch.randn(1, 8, 32))
    if not INTERPRETING:
        with pytest.raises(ValueError, match="CUDA"):
            FlashAttentionTriton.apply(q, q, q)


# --------------------------------------------------------------------------------- Triton


# (WHOLE_SEQ_BYTES, SHORT_SEQ_MAX) that make the small test shapes take each set of kernels: the tiled
# forward with the two-pass or the one-launch backward, or the whole-sequence forward with the latter
KERNEL_KINDS = {"two_pass": (0, 0), "short": (0, 256), "whole": (2**30, 256)}


def use_kernels(monkeypatch, kind: str) -> None:
    whole_bytes, short_max = KERNEL_KINDS[kind]
    monkeypatch.setattr(flash_attention, "WHOLE_SEQ_BYTES", whole_bytes)
    monkeypatch.setattr(flash_attention, "SHORT_SEQ_MAX", short_max)


@pytest.fixture(params=list(KERNEL_KINDS))
def backward_kind(request, monkeypatch):
    """Every kernel set at the same small shapes."""
    use_kernels(monkeypatch, request.param)
    return request.param


@pytest.fixture(params=["short", "whole"])
def rotating_kind(request, monkeypatch):
    """The kernel sets that apply RoPE inside (both forwards, with the one-launch backward)."""
    use_kernels(monkeypatch, request.param)
    return request.param


@interp_only
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("q_shape,n_k", INTERP_SHAPES)
def test_interp_triton_matches_reference(q_shape, n_k, is_causal, backward_kind):
    check_against_reference(FlashAttentionTriton.apply, q_shape, n_k, is_causal)


@interp_only
@pytest.mark.parametrize("grad_layout", ["sum", "sum_over_tokens", "transposed"])
def test_interp_triton_odd_grad_layouts(grad_layout, backward_kind):
    check_against_reference(FlashAttentionTriton.apply, (1, 48, 32), 48, True, grad_layout=grad_layout)


@interp_only
@pytest.mark.parametrize("positions", ["arange", "per_batch"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_interp_rope_inside_kernels(positions, is_causal, rotating_kind):
    # q, k rotated as the kernels load them, gradients rotated back: against RoPE's formula + attention in fp64
    g = torch.Generator().manual_seed(3)
    b, t, h, d = 2, 45, 3, 16
    q, k, v = (torch.randn(b, t, h, d, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    pos = torch.arange(t) if positions == "arange" else torch.randint(0, 64, (b, 1, t), generator=g)
    rope = RotaryPositionalEmbedding(10000.0, d, 64)
    o = flash_attn_mha(q, k, v, is_causal, rope=rope, positions=pos)
    assert any(t.dtype == torch.int64 for t in o.grad_fn.saved_tensors), "RoPE did not run inside the kernels"
    do = torch.randn(o.shape, generator=g)
    (o * do).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o_ref, _ = attention_reference(rope_reference(q64, pos), rope_reference(k64, pos), v64, is_causal)
    (o_ref * do.double()).sum().backward()
    for got, ref in ((o, o_ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, ref) < 1e-5
    assert all(x.transpose(1, 2).is_contiguous() for x in (o, q.grad, k.grad, v.grad))


@interp_only
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("t", [40, 77])
def test_interp_forward_writes_rotated_q_and_k(t, is_causal, rotating_kind, monkeypatch):
    # the backward reads the q and k the forward rotated instead of rotating them again: every row
    # must be written (the buffers start as NaN) and equal RoPE's formula, causal or not, ragged tails too
    from cs336_systems import flash_kernels

    monkeypatch.setattr(flash_kernels, "POISON_OUTPUTS", True)
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, t, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    pos = torch.randperm(t, generator=g)
    rope = RotaryPositionalEmbedding(10000.0, 16, t)
    o, _, q_rot, k_rot = flash_fwd_rope_op(q, k, v, is_causal, pos.expand(2, 3, t), rope.cos, rope.sin)
    for got, x in ((q_rot, q), (k_rot, k)):
        assert got.stride() == x.stride()
        torch.testing.assert_close(got.double(), rope_reference(x.double(), pos), atol=1e-5, rtol=1e-5)
    o_ref, _ = attention_reference(rope_reference(q.double(), pos), rope_reference(k.double(), pos), v.double(),
                                   is_causal)
    assert rel_err(o, o_ref) < 1e-5


@interp_only
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_q=st.integers(1, 80), n_k=st.integers(1, 80), is_causal=st.booleans(), use_rope=st.booleans(),
       seed=st.integers(0, 2**16))
def test_interp_short_kernels_property(n_q, n_k, is_causal, use_rope, seed, rotating_kind):
    # any lengths (tiles of 16 x 32 in the interpreter: ragged, n_q != n_k, a query tile whose last
    # visible key tile is not the diagonal one; whole sequences padded to a power of two): the
    # one-launch backward, after either forward, against fp64 attention
    n_k = n_q if use_rope else n_k  # RoPE inside needs one position table for queries and keys
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n_q, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, n_k, 16, generator=g, requires_grad=True) for _ in range(2))
    rope, pos = (RotaryPositionalEmbedding(10000.0, 16, 80), torch.arange(n_q)) if use_rope else (None, None)
    o = flash_attn_mha(q, k, v, is_causal, rope=rope, positions=pos)
    do = torch.randn(o.shape, generator=g)
    (o * do).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    qr, kr = (rope_reference(q64, pos), rope_reference(k64, pos)) if use_rope else (q64, k64)
    o_ref, _ = attention_reference(qr, kr, v64, is_causal)
    (o_ref * do.double()).sum().backward()
    for got, ref in ((o, o_ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert (got.double() - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())


@interp_only
def test_interp_rope_outside_kernels_for_long_sequences(monkeypatch):
    # past SHORT_SEQ_MAX the two-pass backward runs (after the tiled forward), and RoPE runs as the
    # module first: same numbers
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    rope, pos = RotaryPositionalEmbedding(10000.0, 16, 40), torch.arange(40)
    inside = flash_attn_mha(q, k, v, True, rope=rope, positions=pos)
    monkeypatch.setattr(flash_attention, "SHORT_SEQ_MAX", 16)
    monkeypatch.setattr(flash_attention, "WHOLE_SEQ_BYTES", 0)
    outside = flash_attn_mha(q, k, v, True, rope=rope, positions=pos)
    assert not any(t.dtype == torch.int64 for t in outside.grad_fn.saved_tensors)
    torch.testing.assert_close(inside, outside, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="RoPE inside the kernels"):
        FlashAttentionTriton.apply(q, k, v, True, pos.expand(1, 2, 40), rope.cos, rope.sin)


@interp_only
@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("rope_inside", [True, False])
def test_interp_model_with_flash_backend_matches_math(fuse, rope_inside):
    # the whole LM (RoPE handed to the attention kernels or applied first as its own kernels; fused
    # with RoPE inside: the one q/k/v product handed to them packed, its gradient one tensor)
    # against our own softmax attention
    torch.manual_seed(5)
    kw = {"vocab_size": 50, "context_length": 40, "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 48}
    ref = TransformerLM(**kw, attn_backend="math")
    lm = TransformerLM(**kw, attn_backend="flash")
    lm.load_state_dict(ref.state_dict())
    assert lm.layers[0].attn.attn_applies_rope
    for layer in lm.layers:
        layer.attn.fuse_projections = fuse
        layer.attn.attn_applies_rope = rope_inside
    ids = torch.randint(0, 50, (2, 37))
    logits_ref, logits = ref(ids), lm(ids)
    nodes, stack = set(), [logits.grad_fn]
    while stack:  # which attention Function the graph holds
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(n for n, _ in node.next_functions)
    names = {type(n).__name__ for n in nodes}
    packed = fuse and rope_inside
    assert ("FlashAttentionQKVPackedBackward" in names) == packed
    assert ("FlashAttentionTritonBackward" in names) != packed
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    logits_ref.square().mean().backward()
    logits.square().mean().backward()
    for (name, p), p_ref in zip(lm.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


@interp_only
def test_interp_train_loop_with_flash_backend_matches_math(tmp_path):
    # `cs336-basics train` with our FlashAttention (the "auto" choice on CUDA): training steps, the
    # no-grad evaluations and the checkpoint, step for step the losses of our own softmax attention
    import json

    import numpy as np
    from cs336_basics.config import TrainConfig
    from cs336_basics.train import train

    rng = np.random.default_rng(0)
    paths = {}
    for name, n in (("train", 3000), ("val", 400)):
        rng.integers(0, 32, n, dtype=np.uint16).tofile(tmp_path / f"{name}.bin")
        (tmp_path / f"{name}.bin.json").write_text(json.dumps({"dtype": "uint16", "num_tokens": n}))
        paths[f"{name}_data"] = str(tmp_path / f"{name}.bin")
    base = TrainConfig(vocab_size=32, context_length=24, d_model=32, num_layers=2, num_heads=2, d_ff=48,
                       batch_size=4, max_steps=6, warmup_steps=2, eval_interval=3, eval_batches=2,
                       checkpoint_interval=0, dtype="fp32", device="cpu", **paths)
    rows = {}
    for backend in ("math", "flash"):
        cfg = base.replace(attn_backend=backend, out_dir=str(tmp_path / backend))
        assert train(cfg)["stopped"] == "done"
        lines = (tmp_path / backend / "metrics.jsonl").read_text().splitlines()
        rows[backend] = [(r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, lines)]
    assert [s for s, _ in rows["flash"]] == [s for s, _ in rows["math"]] and len(rows["math"]) == 9
    for (_, got), (_, want) in zip(rows["flash"], rows["math"], strict=True):
        assert got == pytest.approx(want, rel=1e-4)


@interp_only
@pytest.mark.parametrize("use_rope", [False, True])
def test_interp_qkvpacked_matches_separate_inputs(use_rope, backward_kind):
    # one (B, T, 3C) input: the output and gradient of flash_attn_mha on its three views, the gradient
    # one contiguous tensor (the kernels wrote dQ, dK, dV into its thirds); also compiled, fullgraph
    g = torch.Generator().manual_seed(6)
    b, t, h, d = 2, 40, 2, 16
    qkv = torch.randn(b, t, 3 * h * d, generator=g, requires_grad=True)
    do = torch.randn(b, h, t, d, generator=g)
    rope, pos = (RotaryPositionalEmbedding(10000.0, d, t), torch.arange(t)) if use_rope else (None, None)
    o = flash_attn_qkvpacked(qkv, h, True, rope, pos)
    (dqkv,) = torch.autograd.grad(o, qkv, do)
    # (RoPE past the one-launch backward's lengths runs as the module: flash_attn_mha on the views)
    packed = not (use_rope and backward_kind == "two_pass")
    assert (type(o.grad_fn).__name__ == "FlashAttentionQKVPackedBackward") == packed and dqkv.is_contiguous()
    ref_in = qkv.detach().clone().requires_grad_()
    q, k, v = (x.unflatten(-1, (h, d)).transpose(1, 2) for x in ref_in.chunk(3, dim=-1))
    o_ref = flash_attn_mha(q, k, v, True, rope, pos)
    (d_ref,) = torch.autograd.grad(o_ref, ref_in, do)
    torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
    torch.testing.assert_close(dqkv, d_ref, atol=0, rtol=0)
    compiled = torch.compile(lambda x: flash_attn_qkvpacked(x, h, True, rope, pos), backend="aot_eager",
                             fullgraph=True)
    o_c = compiled(qkv)
    (d_c,) = torch.autograd.grad(o_c, qkv, do)
    torch.testing.assert_close(o_c, o_ref, atol=0, rtol=0)
    torch.testing.assert_close(d_c, d_ref, atol=0, rtol=0)


@interp_only
def test_interp_qkvpacked_op_passes_opcheck_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(1, 40, 3 * 2 * 16, generator=g)
    q, k, v = flash_attention.split_qkv(qkv, 2)
    o, lse = flash_fwd_op(q, k, v, True)
    do = torch.randn(o.shape, generator=g)
    torch.library.opcheck(flash_bwd_packed_op, (q, k, v, o, lse, do, True))
    with pytest.raises(ValueError, match="qkv must be"):
        flash_attn_qkvpacked(torch.randn(1, 40, 95), 2)
    with pytest.raises(ValueError, match="qkv must be"):
        flash_attn_qkvpacked(torch.randn(40, 96), 2)


@interp_only
def test_interp_triton_fp16():
    # (bf16 is covered on the GPU only: the interpreter of triton 3.9 mis-computes bf16 tl.dot)
    check_against_reference(FlashAttentionTriton.apply, (1, 48, 32), 48, True, dtype=torch.float16, tol=2e-3)


@interp_only
def test_interp_flash_attn_mha_strided_heads():
    # (B, H, T, D) seen through a transpose of a (B, T, H, D) buffer, as the model produces it
    q, k, v = (torch.randn(1, 40, 2, 16).transpose(1, 2) for _ in range(3))
    o = flash_attn_mha(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


@interp_only
def test_interp_custom_ops_pass_opcheck(rotating_kind):
    # schema, fake (meta) implementation against the real one, autograd registration, AOT dispatch
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    torch.library.opcheck(flash_fwd_op, (q, k, v, True))
    o, lse = flash_fwd_op(q, k, v, True)
    do = torch.randn(o.shape, generator=g)
    torch.library.opcheck(flash_bwd_op, (q, k, v, o, lse, do, True))
    rope = (torch.arange(40).expand(1, 2, 40), *(torch.rand(40, 8, generator=g) for _ in range(2)))
    torch.library.opcheck(flash_fwd_rope_op, (q, k, v, True, *rope))
    o, lse, q_rot, k_rot = flash_fwd_rope_op(q, k, v, True, *rope)
    torch.library.opcheck(flash_bwd_op, (q_rot, k_rot, v, o, lse, do, True, *rope))


@interp_only
def test_interp_flash_attn_mha_under_torch_compile():
    # fullgraph=True fails on any graph break: the kernels must be opaque custom ops to dynamo
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    do = torch.randn(1, 2, 48, 16, generator=g)
    compiled = torch.compile(lambda a, b, c: flash_attn_mha(a, b, c, True), backend="aot_eager", fullgraph=True)
    o = compiled(q, k, v)
    (o * do).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, _ = attention_reference(q64, k64, v64, True)
    (o_ref * do.double()).sum().backward()
    for got, ref in ((o, o_ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, ref) < 1e-5
    # outputs and gradients keep the (B, T, H, D) layout of the inputs: no transpose copies around attention
    assert all(t.transpose(1, 2).is_contiguous() for t in (o, q.grad, k.grad, v.grad))


def test_kernel_choice_by_sequence_length():
    # bf16 heads of d = 32 up to T = 128 take the whole-sequence forward, the tinystories-17m attention
    # (T = 256) the tiled one; fp32 or wider heads fit fewer positions. Up to SHORT_SEQ_MAX the
    # one-launch backward
    def qk(t, d=32, dtype=torch.bfloat16):
        x = torch.empty(2, 16, t, d, dtype=dtype, device="meta")
        return x, x

    assert flash_attention.whole_sequences(*qk(128)) and flash_attention.whole_sequences(*qk(100))
    assert not flash_attention.whole_sequences(*qk(129)) and not flash_attention.whole_sequences(*qk(256))
    assert flash_attention.short_sequences(*qk(256)) and not flash_attention.short_sequences(*qk(257))
    assert not flash_attention.whole_sequences(*qk(128, dtype=torch.float32))
    assert flash_attention.whole_sequences(*qk(64, 64)) and not flash_attention.whole_sequences(*qk(128, 64))
    assert flash_attention.rope_fits_kernels(*qk(256)) and not flash_attention.rope_fits_kernels(*qk(512))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("t", [128, 256])
def test_flash_attn_mha_under_inductor_on_gpu(use_rope, t):
    # the real path: inductor traces the triton_ops and launches the kernels itself (the interpreter
    # twin above runs them as opaque custom ops); bf16 heads of the tinystories-17m model, which take the
    # one-launch backward after the tiled forward (T = 256) or the whole-sequence forward (T = 128);
    # use_rope: RoPE inside the kernels (the model's path)
    g = torch.Generator(device="cuda").manual_seed(6 if use_rope else 2)
    q, k, v = (torch.randn(4, t, 16, 32, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    do = torch.randn(4, 16, t, 32, generator=g, device="cuda", dtype=torch.bfloat16)
    rope, pos = RotaryPositionalEmbedding(10000.0, 32, t, device="cuda"), torch.arange(t, device="cuda")
    kw = {"rope": rope, "positions": pos} if use_rope else {}
    compiled = torch.compile(lambda a, b, c: flash_attn_mha(a, b, c, True, **kw) * 2, fullgraph=True)
    o = compiled(q, k, v)
    (o * do).sum().backward()
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    qr, kr = (rope_reference(q64, pos.cpu()), rope_reference(k64, pos.cpu())) if use_rope else (q64, k64)
    o_ref, _ = attention_reference(qr, kr, v64, True)
    (2 * o_ref * do.cpu().double()).sum().backward()
    for got, ref in ((o, 2 * o_ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got.cpu(), ref) < 2e-2
    assert all(t.transpose(1, 2).is_contiguous() for t in (o, q.grad, k.grad, v.grad))


@pytest.mark.skipif(INTERPRETING, reason="this is the parent of the interpreter run")
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    proc = run_interpreter_tests(__file__)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
