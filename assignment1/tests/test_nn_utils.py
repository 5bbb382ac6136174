"""Cross-entropy, softmax and gradient clipping against torch's own and explicit formulas.

``test_interp_*`` run the Triton cross-entropy on CPU in the TRITON_INTERPRET=1 child process
(``test_triton_interpreter.py``); ``gpu`` tests need CUDA."""

import pytest
import torch
import torch.nn.functional as F
from cs336_basics.nn_utils import clip_grad_norm, cross_entropy, cross_entropy_torch, softmax

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cross_entropy_matches_functional_any_leading_dims():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 7, 13), torch.randint(0, 13, (4, 7))
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits.view(-1, 13), targets.view(-1)))
    flat = torch.randn(8, 5)
    t = torch.randint(0, 5, (8,))
    torch.testing.assert_close(cross_entropy(flat, t), F.cross_entropy(flat, t))


def test_cross_entropy_stable_for_large_logits_and_bf16():
    logits = torch.tensor([[1e4, 0.0, -1e4], [5e3, 5e3 + 1, 0.0]])
    t = torch.tensor([1, 0])
    loss = cross_entropy(logits, t)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits.double(), t).float())
    lb = torch.randn(6, 11).bfloat16()
    t = torch.randint(0, 11, (6,))
    torch.testing.assert_close(cross_entropy(lb, t), F.cross_entropy(lb.float(), t))  # fp32 math


def test_cross_entropy_gradient_matches():
    logits = torch.randn(5, 9, requires_grad=True)
    t = torch.randint(0, 9, (5,))
    cross_entropy(logits, t).backward()
    expected = (F.softmax(logits.detach(), -1) - F.one_hot(t, 9)) / 5
    torch.testing.assert_close(logits.grad, expected)


def check_kernel_cross_entropy(shape, vocab, dtype, device, scale=1.0, tol=1e-5):
    """`cross_entropy` through the Triton kernels (asserted) against F.cross_entropy on the same
    values in fp32: the loss, and the gradient of ``2.5 · loss`` (upstream gradient not 1) in the
    logits' dtype."""
    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(*shape, vocab, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, vocab, shape, generator=g).to(device)
    loss = cross_entropy(x, t)
    assert type(loss.grad_fn).__name__ == "_CrossEntropyBackward", "the Triton path did not run"
    (2.5 * loss).backward()
    ref_x = x.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_x.reshape(-1, vocab), t.reshape(-1))
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad, ref_x.grad.to(dtype), rtol=tol, atol=tol if dtype == torch.float32 else 1e-3)


# vocab sizes around the kernel's 2,048-wide blocks: one partial block, exact blocks, several + partial
@pytest.mark.parametrize("shape,vocab", [((7,), 33), ((2, 3), 2048), ((3, 5), 4100)])
def test_interp_triton_cross_entropy_matches_functional(shape, vocab):
    check_kernel_cross_entropy(shape, vocab, torch.float32, "cpu")


def test_interp_triton_cross_entropy_bf16_and_large_logits():
    check_kernel_cross_entropy((6,), 2100, torch.bfloat16, "cpu", tol=1e-4)
    check_kernel_cross_entropy((4,), 300, torch.float32, "cpu", scale=1e4)  # no overflow


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cross_entropy_on_cuda(dtype):
    check_kernel_cross_entropy((8, 256), 10_000, dtype, "cuda", tol=1e-4)  # the tinystories-17m vocab


def check_linear_cross_entropy(n, d, vocab, dtype, device, tol):
    """`linear_cross_entropy` (LM head + loss, one op) against F.cross_entropy of ``h Wᵀ`` in fp32:
    the loss and the gradients of ``2.5 · loss`` for h and W, with fp32 inputs under autocast
    when ``dtype`` is bf16 (as the model runs)."""
    from cs336_basics import fused_cross_entropy as fce

    g = torch.Generator().manual_seed(vocab + d)
    h = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) / d**0.5).to(device).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g).to(device)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        loss = fce.linear_cross_entropy(h, w, t)
    (2.5 * loss).backward()
    h_ref, w_ref = (x.detach().clone().requires_grad_() for x in (h, w))
    ref = F.cross_entropy(h_ref.to(dtype).float() @ w_ref.to(dtype).float().T, t)
    (2.5 * ref).backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    for got, want in ((h.grad, h_ref.grad), (w.grad, w_ref.grad)):
        assert ((got - want).norm() / want.norm()).item() < tol


# vocab sizes around the kernel's 2,048-wide blocks: one partial block, exact blocks, several + partial
@pytest.mark.parametrize("vocab", [33, 2048, 4100])
def test_interp_linear_cross_entropy_matches_functional(vocab):
    check_linear_cross_entropy(12, 16, vocab, torch.float32, "cpu", 1e-5)
    check_linear_cross_entropy(64, 32, vocab, torch.bfloat16, "cpu", 1e-2)  # bf16 autocast


def test_interp_linear_cross_entropy_custom_op_and_compile():
    from cs336_basics import fused_cross_entropy as fce

    h, w, t = torch.randn(5, 8), torch.randn(40, 8), torch.randint(0, 40, (5,))
    torch.library.opcheck(torch.ops.cs336_basics.linear_cross_entropy, (h, w, t))  # fake impl, autograd
    compiled = torch.compile(fce.linear_cross_entropy, backend="aot_eager", fullgraph=True)  # no graph break
    torch.testing.assert_close(compiled(h, w, t), F.cross_entropy(h @ w.T, t))


def test_interp_cross_entropy_ops_and_compile():
    # the operators torch.compile runs (eager mode calls the same kernels through an autograd Function)
    from cs336_basics import fused_cross_entropy as fce

    x, t = torch.randn(6, 50, requires_grad=True), torch.randint(0, 50, (6,))
    torch.library.opcheck(torch.ops.cs336_basics.cross_entropy, (x, t))
    _, lse = fce._ce_op(x.detach(), t)
    torch.library.opcheck(torch.ops.cs336_basics.cross_entropy_backward, (x.detach(), t, lse, torch.tensor(2.0)))
    compiled = torch.compile(lambda a, b: 3.0 * cross_entropy(a, b), backend="aot_eager", fullgraph=True)
    (dx,) = torch.autograd.grad(compiled(x, t), x)
    x_ref = x.detach().requires_grad_()
    (dx_ref,) = torch.autograd.grad(3.0 * F.cross_entropy(x_ref, t), x_ref)
    torch.testing.assert_close(compiled(x, t), 3.0 * F.cross_entropy(x, t))
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_on_cuda(dtype):
    # the tinystories-17m head and GPT-2's vocabulary
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3  # bf16 logits and G; fp32 may run TF32 matmuls
    check_linear_cross_entropy(4096, 512, 10_000, dtype, "cuda", tol)
    check_linear_cross_entropy(1024, 256, 50_257, dtype, "cuda", tol)


def test_cross_entropy_torch_is_the_cpu_path():
    logits, t = torch.randn(3, 4, 20), torch.randint(0, 20, (3, 4))
    torch.testing.assert_close(cross_entropy(logits, t), cross_entropy_torch(logits, t), rtol=0, atol=0)


def test_softmax_reexport():
    x = torch.randn(3, 4)
    torch.testing.assert_close(softmax(x, 1), F.softmax(x, 1))


@pytest.mark.parametrize("max_norm", [0.01, 1.0, 1e6])
def test_clip_grad_norm_matches_formula_and_torch(max_norm):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    no_grad = torch.nn.Parameter(torch.randn(3))  # params without grad are ignored
    for p in ps:
        p.grad = torch.randn_like(p)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    total = torch.sqrt(sum((p.grad**2).sum() for p in ps)).item()
    scale = min(1.0, max_norm / (total + 1e-6))
    expected = [p.grad * scale for p in ps]
    norm = clip_grad_norm(ps + [no_grad], max_norm)
    assert isinstance(norm, torch.Tensor) and norm.dim() == 0  # a tensor: no host sync inside
    assert float(norm) == pytest.approx(total, rel=1e-6)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad, e)
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)
    assert no_grad.grad is None
