"""Cross-entropy, softmax and gradient clipping against torch's own and explicit formulas."""

import pytest
import torch
import torch.nn.functional as F
from cs336_basics.nn_utils import clip_grad_norm, cross_entropy, softmax


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
    assert norm == pytest.approx(total, rel=1e-6)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad, e)
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7)
    assert no_grad.grad is None
