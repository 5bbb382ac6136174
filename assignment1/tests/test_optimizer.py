"""Our AdamW (foreach and fused Triton paths) against torch.optim.AdamW; the cosine schedule
against its formula. ``test_interp_*`` run the Triton kernel on CPU in the TRITON_INTERPRET=1
child process (``test_triton_interpreter.py``); ``gpu`` tests need CUDA."""

import copy
import math

import pytest
import torch
from cs336_basics import optimizer
from cs336_basics.optimizer import AdamW, cosine_lr

KWS = [
    {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _train(opt_cls, steps=20, device="cpu", **kw):
    torch.manual_seed(0)
    # 80 x 60 = 4,800 weights: more than one 4,096-element block of the fused kernel, the last partial
    model = torch.nn.Sequential(torch.nn.Linear(6, 80), torch.nn.Tanh(), torch.nn.Linear(80, 60), torch.nn.Tanh(),
                                torch.nn.Linear(60, 3)).to(device)
    opt = opt_cls(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g).to(device), torch.randn(16, 3, generator=g).to(device)
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model


def _no_foreach(monkeypatch):
    """Make the foreach path fail, so a passing test proves the fused kernel did the update."""
    def fail(*args, **kwargs):
        raise AssertionError("foreach path used")
    monkeypatch.setattr(optimizer, "foreach_adamw_step_", fail)


@pytest.mark.parametrize("kw", KWS)
def test_adamw_matches_torch_for_20_steps(kw):
    ours, ref = _train(AdamW, **kw), _train(torch.optim.AdamW, **kw)
    for p, r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", KWS)
def test_interp_fused_adamw_matches_torch_for_20_steps(kw, monkeypatch):
    _no_foreach(monkeypatch)
    ours, ref = _train(AdamW, fused=True, **kw), _train(torch.optim.AdamW, **kw)
    for p, r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


def test_interp_fused_adamw_mixed_steps_and_layouts():
    """Tensors at different step counts (a gradient missing on some steps), a non-contiguous one and
    one not 16-byte aligned (both go foreach) in one group, against torch.optim.AdamW."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(t) for t in (torch.randn(50, 90), torch.randn(7), torch.randn(20, 30).t(),
                                            torch.randn(4101)[1:])]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    opt, ref_opt = AdamW(ours, fused=True, **kw), torch.optim.AdamW(ref, **kw)
    for step in range(1, 21):
        for i, (p, r) in enumerate(zip(ours, ref)):
            p.grad = None if i == 1 and step % 3 == 0 else torch.randn(p.shape)  # tensor 1 lags behind
            r.grad = None if p.grad is None else p.grad.clone()
        opt.step(), ref_opt.step()
    assert opt.state[ours[1]]["step"] == ref_opt.state[ref[1]]["step"] == 14
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


def check_bf16_adamw(device: str, steps: int, rtol: float) -> None:
    """A bf16 parameter (bf16 states too) against the update formula in fp32, rounded to bf16
    after every step (what the kernel does: fp32 arithmetic, one rounding per stored value)."""
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(300, 20, device=device).bfloat16())
    p16, m16, v16 = x.detach().clone(), torch.zeros_like(x), torch.zeros_like(x)
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    opt = AdamW([x], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, fused=True)
    for step in range(1, steps + 1):
        x.grad = torch.randn(x.shape, device=device).bfloat16()
        opt.step()
        g, p, m, v = (t.float() for t in (x.grad, p16, m16, v16))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr / (1 - b1**step) * m / (v.sqrt() / (1 - b2**step) ** 0.5 + eps)
        p16, m16, v16 = p.bfloat16(), m.bfloat16(), v.bfloat16()
    state = opt.state[x]
    assert x.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    for ours, ref in ((x.detach(), p16), (state["exp_avg"], m16), (state["exp_avg_sq"], v16)):
        # a flip of an earlier, larger value lingers in m and v (an EMA), so ulps of the tensor's scale
        torch.testing.assert_close(ours.float(), ref.float(), rtol=rtol, atol=rtol * ref.float().abs().max().item())


def test_interp_fused_adamw_bf16_one_step():
    # the interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest): one step, 2 bf16 ulps
    check_bf16_adamw("cpu", steps=1, rtol=2**-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kw", KWS)
def test_fused_adamw_on_cuda_matches_torch_for_20_steps(kw, monkeypatch):
    _no_foreach(monkeypatch)  # fused=None picks the kernel on CUDA
    ours, ref = _train(AdamW, device="cuda", **kw), _train(torch.optim.AdamW, device="cuda", foreach=False, **kw)
    for p, r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_fused_adamw_on_cuda_bf16_20_steps():
    # rounding flips (fma) stay within 2 bf16 ulps; H100 run before atol scaled with the tensor:
    # 5 of 6,000 values off, by at most 7.3e-4 absolute (elements near zero)
    check_bf16_adamw("cuda", steps=20, rtol=2**-6)


def test_adamw_state_dict_roundtrip_continues_identically():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = AdamW([w], lr=0.1)
    for _ in range(3):
        w.grad = torch.randn(4)
        opt.step()
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = AdamW([w2], lr=0.1)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no shared buffers
    g = torch.randn(4)
    w.grad, w2.grad = g, g.clone()
    opt.step(), opt2.step()
    torch.testing.assert_close(w, w2, rtol=0, atol=0)


def test_adamw_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(1))]
    for bad in [{"lr": -1}, {"betas": (1.0, 0.9)}, {"eps": 0.0}, {"weight_decay": -0.1}]:
        with pytest.raises(ValueError):
            AdamW(p, **bad)


def test_cosine_lr_formula():
    max_lr, min_lr, warm, cyc = 1.0, 0.1, 7, 21
    for it in range(30):
        if it < warm:
            expected = it / warm * max_lr
        elif it <= cyc:
            expected = min_lr + 0.5 * (1 + math.cos((it - warm) / (cyc - warm) * math.pi)) * (max_lr - min_lr)
        else:
            expected = min_lr
        assert cosine_lr(it, max_lr, min_lr, warm, cyc) == pytest.approx(expected)
    assert cosine_lr(warm, max_lr, min_lr, warm, cyc) == pytest.approx(max_lr)
    assert cosine_lr(cyc, max_lr, min_lr, warm, cyc) == pytest.approx(min_lr)
    # the course's reference values
    ref = [0, 0.14285714285714285, 0.2857142857142857, 0.42857142857142855, 0.5714285714285714,
           0.7142857142857143, 0.8571428571428571, 1.0, 0.9887175604818206, 0.9554359905560885]
    assert [cosine_lr(i, 1, 0.1, 7, 21) for i in range(10)] == pytest.approx(ref)
