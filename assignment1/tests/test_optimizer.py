"""Our AdamW against torch.optim.AdamW; the cosine schedule against its formula."""

import copy
import math

import pytest
import torch
from cs336_basics.optimizer import AdamW, cosine_lr


def _train(opt_cls, steps=20, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = opt_cls(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return model


@pytest.mark.parametrize("kw", [
    {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1},
])
def test_adamw_matches_torch_for_20_steps(kw):
    ours, ref = _train(AdamW, **kw), _train(torch.optim.AdamW, **kw)
    for p, r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


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
