"""The Triton RMSNorm, RoPE and SwiGLU-gate kernels of ``model.py`` (forward and every gradient)
against independent fp64 computations, and the whole TransformerLM with them against its PyTorch ops.

``test_interp_*`` run the kernels on CPU in the TRITON_INTERPRET=1 child process
(``test_triton_interpreter.py``); ``gpu`` tests are their CUDA twins at the tinystories-17m sizes:
``pytest assignment1/tests/test_fused_kernels.py -m gpu``."""

import pytest
import torch
import torch.nn.functional as F
from cs336_basics import model as M
from cs336_basics.triton_support import interpreting

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (rtol, atol) of outputs and gradients in each dtype against the fp64 reference
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def backward_names(t: torch.Tensor) -> set[str]:
    """Type names of every node in ``t``'s autograd graph (to see which kernels ran)."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """``actual`` (in ``dtype``) against the fp64 ``expected``, tolerances of `TOL` times ``scale``."""
    assert actual.dtype == dtype and actual.shape == expected.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=rtol * scale, atol=atol * scale)


# ----------------------------------------------------------------------------- RMSNorm


def check_rmsnorm(shape, dtype, device, layout="contiguous", scale=1.0):
    """``model.RMSNorm`` through the kernel (asserted) against ``F.rms_norm`` in fp64: output, dx, dw.
    ``layout``: ``"strided"`` rows (a slice of wider rows, as a view of a bigger tensor) or
    ``"transposed"`` (the last dim not unit-stride)."""
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[-1]
    if layout == "strided":
        x = torch.randn(*shape[:-1], c + 5, generator=g).to(device, dtype)[..., :c]
    elif layout == "transposed":
        x = torch.randn(*shape[::-1], generator=g).to(device, dtype).transpose(0, -1)
    else:
        x = torch.randn(*shape, generator=g).to(device, dtype)
    norm = M.RMSNorm(c, eps=1e-5, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(c, generator=g))
    dy = torch.randn(shape, generator=g).to(device, dtype)
    x = leaf(x)
    y = norm(x)
    assert "_RMSNormBackward" in backward_names(y), "the Triton path did not run"
    y.backward(dy)
    x64, w64 = leaf(x.double()), leaf(norm.weight.double())
    y64 = F.rms_norm(x64, (c,), w64, eps=1e-5)
    y64.backward(dy.double())
    assert_close(y, y64, dtype, scale)
    assert_close(x.grad, x64.grad, dtype, scale)
    assert_close(norm.weight.grad, w64.grad, dtype, scale * 10)  # a sum over every row


@pytest.mark.parametrize("shape,layout", [
    ((2, 7, 48), "strided"),       # one program, padded columns, row stride > C
    ((37, 520), "contiguous"),     # 4 rows a tile: ten backward programs, ragged last one
    ((6, 40), "transposed"),
])
def test_interp_rmsnorm_fp32(shape, layout):
    check_rmsnorm(shape, torch.float32, "cpu", layout)


def test_interp_rmsnorm_bf16():
    check_rmsnorm((5, 3, 64), torch.bfloat16, "cpu")


def test_interp_rmsnorm_autocast_output():
    """Under autocast a norm that feeds only Linears writes the autocast dtype: the same values as
    the PyTorch ops' fp32 output cast by the Linear, and the same gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 9, 32)
    dy = torch.randn(3, 9, 32).bfloat16()
    outs = {}
    for fused in (True, False):
        norm, xf = M.RMSNorm(32, feeds_matmul=True), leaf(x.clone())
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
        M.FUSED_KERNELS = fused
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = norm(xf)
        finally:
            M.FUSED_KERNELS = True
        y.backward(dy.to(y.dtype))
        outs[fused] = y, xf.grad, norm.weight.grad
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = outs[True], outs[False]
    assert y.dtype == torch.bfloat16 and y_ref.dtype == torch.float32
    # at most one bf16 step apart (the interpreter truncates fp32 -> bf16, CUDA rounds to nearest)
    torch.testing.assert_close(y, y_ref.bfloat16(), rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_on_cuda(dtype):
    check_rmsnorm((8, 256, 512), dtype, "cuda")  # 2,048 rows of the 17M model's width
    check_rmsnorm((3, 100, 2560), dtype, "cuda", "strided", scale=2.0)  # the 2.7B model's width


# ----------------------------------------------------------------------------- RoPE


ROPE_NODE = "_RoPEBackward"  # the autograd node of fused_rope in eager mode
CE_NODE = "_CrossEntropyBackward"  # and of the Triton loss


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Adjacent pairs as complex numbers times ``exp(i · pos · theta^(-2k/D))``, in fp64."""
    d = x.shape[-1]
    angles = positions[..., None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(z).flatten(-2)


def check_rope(batch, heads, t, d, dtype, device, per_batch_positions=False):
    """``model.RotaryPositionalEmbedding`` through the kernel (asserted) against `rope_reference`, on
    ``(B, H, T, D)`` q as the model makes it (a transposed view of ``(B, T, H, D)``): output and dx."""
    g = torch.Generator().manual_seed(t * d)
    max_len = 2 * t + 3
    rope = M.RotaryPositionalEmbedding(10000.0, d, max_len, device=device)
    x = leaf(torch.randn(batch, t, heads, d, generator=g).to(device, dtype).transpose(1, 2))
    if per_batch_positions:  # (B, 1, T), as the model broadcasts batched positions over heads
        positions = torch.randint(0, max_len, (batch, 1, t), generator=g)
    else:
        positions = torch.randperm(max_len, generator=g)[:t]
    dy = torch.randn(batch, heads, t, d, generator=g).to(device, dtype)  # contiguous: not x's layout
    x_view = x.view_as(x)  # not a leaf: its gradient keeps the layout rope's backward gives it
    into_x = []
    x_view.register_hook(into_x.append)
    y = rope(x_view, positions.to(device))
    assert ROPE_NODE in backward_names(y), "the Triton path did not run"
    y.backward(dy)
    x64 = leaf(x.detach().cpu().double())
    y64 = rope_reference(x64, positions, 10000.0)
    y64.backward(dy.cpu().double())
    # output and gradient in the transposed view's layout (no copy on the way to attention or back
    # to the projection); size-1 dims have any stride
    for out in (y, into_x[0]):
        assert all(ts == xs for ts, xs, n in zip(out.stride(), x.stride(), x.shape) if n > 1)
    assert_close(y.cpu(), y64, dtype)
    assert_close(x.grad.cpu(), x64.grad, dtype)


@pytest.mark.parametrize("per_batch", [False, True])
def test_interp_rope_fp32(per_batch):
    check_rope(2, 3, 7, 12, torch.float32, "cpu", per_batch)  # D/2 = 6 pairs padded to 8, ragged T


def test_interp_rope_bf16_and_other_ranks():
    check_rope(1, 2, 5, 8, torch.bfloat16, "cpu")
    rope = M.RotaryPositionalEmbedding(500.0, 6, 16)
    for shape in [(9, 6), (2, 9, 6), (2, 1, 3, 9, 6)]:  # (T, D), (B, T, D) and five dims, positions (T,)
        x = leaf(torch.randn(shape))
        positions = torch.arange(3, 12)
        y = rope(x, positions)
        assert ROPE_NODE in backward_names(y)
        y.sum().backward()
        x64 = leaf(x.detach().double())
        rope_reference(x64, positions, 500.0).sum().backward()
        assert_close(y, rope_reference(x64.detach(), positions, 500.0), torch.float32)
        assert_close(x.grad, x64.grad, torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_on_cuda(dtype):
    check_rope(8, 16, 256, 32, dtype, "cuda")  # the 17M model's q/k
    check_rope(4, 4, 100, 128, dtype, "cuda", per_batch_positions=True)


def test_interp_rope_op_and_compile():
    # the operator torch.compile runs (eager mode calls the same kernel through an autograd Function;
    # tracing that one instead would fail on the interpreter's data pointers)
    from cs336_basics.fused_rope import _rope_op

    rope = M.RotaryPositionalEmbedding(10000.0, 8, 16)
    x = leaf(torch.randn(2, 6, 3, 8).transpose(1, 2))
    pos = torch.arange(6)
    pos4 = torch.broadcast_to(pos, x.shape[:-1]).contiguous()
    torch.library.opcheck(_rope_op, (x.detach(), pos4, rope.cos, rope.sin, 1.0))
    compiled = torch.compile(lambda t: rope(t, pos), backend="aot_eager", fullgraph=True)
    dy = torch.randn(2, 3, 6, 8)
    (dx,) = torch.autograd.grad(compiled(x), x, dy)
    y_ref = rope(x, pos)
    assert ROPE_NODE in backward_names(y_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    torch.testing.assert_close(compiled(x), y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_rope_under_inductor_on_cuda():
    # under torch.compile the op's kernel is launched by inductor's code (Python floats arrive as
    # fp64 there on torch 2.11); output and gradient against the eager op
    rope = M.RotaryPositionalEmbedding(10000.0, 32, 256, device="cuda")
    x = leaf(torch.randn(4, 256, 16, 32, device="cuda", dtype=torch.bfloat16).transpose(1, 2))
    dy = torch.randn(4, 16, 256, 32, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(256, device="cuda")
    y_ref = rope(x, pos)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    y = torch.compile(lambda t: rope(t, pos), fullgraph=True)(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)  # (layouts are inductor's choice here)


# ----------------------------------------------------------------------------- SwiGLU gate


def check_silu_mul(shape, dtype, device):
    """``silu(a) · b`` through the kernel against fp64 PyTorch ops: output, da, db."""
    g = torch.Generator().manual_seed(sum(shape))
    a, b, dy = (torch.randn(shape, generator=g).mul(3).to(device, dtype) for _ in range(3))
    a, b = leaf(a), leaf(b)
    kernels = M.triton_kernels("fused_swiglu", a)
    assert kernels is not None, "the Triton path would not run"
    y = kernels.silu_mul(a, b)
    y.backward(dy)
    a64, b64 = leaf(a.detach().double()), leaf(b.detach().double())
    y64 = F.silu(a64) * b64
    y64.backward(dy.double())
    assert_close(y, y64.to(y.device), dtype)
    assert_close(a.grad, a64.grad, dtype)
    assert_close(b.grad, b64.grad, dtype)


def check_silu_mul_packed(shape, dtype, device):
    """The packed gate on ``ab`` (..., 2F) against fp64 PyTorch ops on its two halves: output, d(ab)."""
    g = torch.Generator().manual_seed(sum(shape) + 1)
    ab = leaf(torch.randn(shape, generator=g).mul(3).to(device, dtype))
    dy = torch.randn((*shape[:-1], shape[-1] // 2), generator=g).to(device, dtype)
    kernels = M.triton_kernels("fused_swiglu", ab)
    assert kernels is not None, "the Triton path would not run"
    y = kernels.silu_mul_packed(ab)
    y.backward(dy)
    ab64 = leaf(ab.detach().double())
    a64, b64 = ab64.chunk(2, dim=-1)
    y64 = F.silu(a64) * b64
    y64.backward(dy.double())
    assert_close(y, y64.to(y.device), dtype)
    assert_close(ab.grad, ab64.grad, dtype)


def test_interp_silu_mul():
    check_silu_mul((3, 5, 41), torch.float32, "cpu")  # F = 41 < 64: one ragged column tile
    check_silu_mul((2, 2100), torch.bfloat16, "cpu")  # 33 column tiles, the last ragged
    check_silu_mul((70, 128), torch.float32, "cpu")  # 32-row tiles: the third ragged


def test_interp_silu_mul_packed():
    check_silu_mul_packed((3, 5, 82), torch.float32, "cpu")
    check_silu_mul_packed((37, 2 * 200), torch.bfloat16, "cpu")  # F = 200: ragged in rows and columns


def check_silu_mul_packed_compiled(device, backend):
    """The packed gate as torch.compile runs it (the operator) against the eager Function, and
    `silu_mul` on two tensors, which compiles to the same operator on their concatenation."""
    from cs336_basics import fused_swiglu

    g = torch.Generator().manual_seed(3)
    ab = leaf(torch.randn(2, 8, 2 * 96, generator=g).to(device))
    dy = torch.randn(2, 8, 96, generator=g).to(device)
    if backend == "aot_eager":
        torch.library.opcheck(fused_swiglu._packed_gate_op, (ab.detach(),))
    y_ref = fused_swiglu.silu_mul_packed(ab)
    (d_ref,) = torch.autograd.grad(y_ref, ab, dy)
    compiled = torch.compile(fused_swiglu.silu_mul_packed, backend=backend, fullgraph=True)
    y = compiled(ab)
    (d,) = torch.autograd.grad(y, ab, dy)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(d, d_ref, rtol=0, atol=0)
    a, b = (leaf(t.detach()) for t in ab.chunk(2, dim=-1))
    y2 = torch.compile(fused_swiglu.silu_mul, backend=backend, fullgraph=True)(a, b)
    torch.testing.assert_close(y2, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(torch.autograd.grad(y2, (a, b), dy), dim=-1), d_ref, rtol=0, atol=0)


def test_interp_silu_mul_packed_op_and_compile():
    check_silu_mul_packed_compiled("cpu", "aot_eager")


@pytest.mark.gpu
@needs_cuda
def test_silu_mul_packed_under_inductor_on_cuda():
    check_silu_mul_packed_compiled("cuda", "inductor")


def test_interp_silu_mul_packed_rejects_odd_width():
    kernels = M.triton_kernels("fused_swiglu", torch.empty(1))
    with pytest.raises(ValueError, match="even last dimension"):
        kernels.silu_mul_packed(torch.randn(4, 5))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_on_cuda(dtype):
    check_silu_mul((8, 256, 1344), dtype, "cuda")
    check_silu_mul_packed((8, 256, 2 * 1344), dtype, "cuda")


# ----------------------------------------------------------------------------- the whole LM


def lm_logits_and_grads(lm, ids, fused: bool, autocast_dtype=None):
    M.FUSED_KERNELS = fused
    try:
        lm.zero_grad(set_to_none=True)
        autocast = torch.autocast(ids.device.type, dtype=autocast_dtype or torch.bfloat16,
                                  enabled=autocast_dtype is not None)
        with autocast:
            logits = lm(ids)
        ran = {"_RMSNormBackward", ROPE_NODE, "_SiLUMulPackedBackward"} & backward_names(logits)
        (logits.float() ** 2).mean().backward()
        return logits, {n: p.grad for n, p in lm.named_parameters()}, ran
    finally:
        M.FUSED_KERNELS = True


TINYSTORIES_17M = {"vocab_size": 10_000, "context_length": 256, "d_model": 512, "num_layers": 4, "num_heads": 16,
                   "d_ff": 1344, "batch": 4, "t": 256}


def lm_shape(**shape) -> tuple[dict, int, int]:
    """(TransformerLM kwargs, batch, t): a small default model, overridden by ``shape``; seeds torch."""
    torch.manual_seed(0)
    cfg = {"vocab_size": 50, "context_length": 16, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_ff": 40,
           "batch": 2, "t": 11} | shape
    return cfg, cfg.pop("batch"), cfg.pop("t")


def check_lm_fused_equals_unfused(device, norm="pre", autocast_dtype=None, rel_tol=1e-5, **shape):
    """TransformerLM with the Triton kernels against the same model in PyTorch ops: logits and the
    gradient of every parameter, as relative errors ``‖fused - ref‖ / ‖ref‖``."""
    cfg, batch, t = lm_shape(**shape)
    lm = M.TransformerLM(**cfg, norm=norm, device=device)
    ids = torch.randint(0, cfg["vocab_size"], (batch, t), device=device)
    logits, grads, ran = lm_logits_and_grads(lm, ids, True, autocast_dtype)
    ref_logits, ref_grads, ran_ref = lm_logits_and_grads(lm, ids, False, autocast_dtype)
    assert ran == {"_RMSNormBackward", ROPE_NODE, "_SiLUMulPackedBackward"} and not ran_ref
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert logits.dtype == ref_logits.dtype
    assert rel(logits, ref_logits) < rel_tol
    errors = {n: rel(grads[n], ref_grads[n]) for n in grads}
    assert max(errors.values()) < 10 * rel_tol, errors


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_interp_lm_fused_equals_unfused(norm):
    check_lm_fused_equals_unfused("cpu", norm)


def test_interp_lm_fused_equals_unfused_autocast():
    check_lm_fused_equals_unfused("cpu", autocast_dtype=torch.bfloat16, rel_tol=1e-2)


def test_interp_kv_cache_decoding_with_kernels():
    """Prefill then one token at a time (RoPE at positions past..past+t) equals the full forward."""
    torch.manual_seed(0)
    lm = M.TransformerLM(50, 16, 32, 2, 4, 40)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        full = lm(ids)
        cache = lm.new_kv_cache(2)
        steps = [lm(ids[:, :4], cache)] + [lm(ids[:, i:i + 1], cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_lm_fused_equals_unfused_on_cuda():
    shape = TINYSTORIES_17M
    check_lm_fused_equals_unfused("cuda", **shape)
    check_lm_fused_equals_unfused("cuda", autocast_dtype=torch.bfloat16, rel_tol=1e-2, **shape)


def check_lm_loss_fused_equals_unfused(device, autocast_dtype=None, rel_tol=1e-5, fused_head=False, **shape):
    """``lm(ids, targets=y)`` (Triton norm/RoPE/SwiGLU and the Triton loss, or with ``fused_head``
    the LM head + loss as `linear_cross_entropy`) against `cross_entropy_torch` of the logits of the
    same model in PyTorch ops: the loss and the gradient of every parameter."""
    from cs336_basics.nn_utils import cross_entropy_torch

    cfg, batch, t = lm_shape(**shape)
    lm = M.TransformerLM(**cfg, device=device)
    ids, y = (torch.randint(0, cfg["vocab_size"], (batch, t), device=device) for _ in range(2))
    results = []
    for fused in (True, False):
        M.FUSED_KERNELS, M.FUSED_LM_HEAD = fused, fused_head
        try:
            lm.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                loss = lm(ids, targets=y) if fused else cross_entropy_torch(lm(ids), y)
            node = type(loss.grad_fn).__name__
            assert bool(fused and fused_head) == ("linear_cross_entropy" in node), node
            assert bool(fused and not fused_head) == (node == CE_NODE), node
            (3.0 * loss).backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}))
        finally:
            M.FUSED_KERNELS, M.FUSED_LM_HEAD = True, None
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=rel_tol, atol=rel_tol)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    errors = {n: rel(grads[n], ref_grads[n]) for n in grads}
    assert max(errors.values()) < 10 * rel_tol, errors


def test_interp_lm_loss_without_grad_skips_the_fused_head(monkeypatch):
    # under no_grad (evaluation) the fused head would write an (N, V) gradient nobody reads
    cfg, batch, t = lm_shape()
    lm = M.TransformerLM(**cfg)
    ids, y = (torch.randint(0, cfg["vocab_size"], (batch, t)) for _ in range(2))
    fused = M.fused_lm_loss()
    calls = []
    monkeypatch.setattr(M, "fused_lm_loss", lambda: calls.append(1) or fused)
    monkeypatch.setattr(M, "FUSED_LM_HEAD", True)
    with torch.no_grad():
        loss = lm(ids, targets=y)
    assert not calls
    assert "linear_cross_entropy" in type(lm(ids, targets=y).grad_fn).__name__ and calls
    torch.testing.assert_close(loss, F.cross_entropy(lm(ids).flatten(0, 1), y.flatten()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_head", [None, True])  # None (default): eager runs the head + Triton loss
def test_interp_lm_loss_fused_equals_unfused(fused_head):
    check_lm_loss_fused_equals_unfused("cpu", fused_head=fused_head)
    check_lm_loss_fused_equals_unfused("cpu", autocast_dtype=torch.bfloat16, rel_tol=1e-2, fused_head=fused_head)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused_head", [None, True])  # None (default): eager runs the head + Triton loss
def test_lm_loss_fused_equals_unfused_on_cuda(fused_head):
    shape = TINYSTORIES_17M
    check_lm_loss_fused_equals_unfused("cuda", fused_head=fused_head, **shape)
    check_lm_loss_fused_equals_unfused("cuda", autocast_dtype=torch.bfloat16, rel_tol=1e-2, fused_head=fused_head,
                                       **shape)


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.skipif(interpreting(), reason="the CPU path outside the interpreter")
def test_cpu_runs_the_pytorch_ops():
    x = torch.randn(2, 4, 8, requires_grad=True)
    assert M.triton_kernels("fused_rmsnorm", x) is None
    names = backward_names(M.RMSNorm(8)(x)) | backward_names(M.RotaryPositionalEmbedding(1e4, 8, 4)(x, torch.arange(4)))
    assert not names & {"_RMSNormBackward", ROPE_NODE}
