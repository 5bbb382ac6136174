"""AdamW (Loshchilov & Hutter 2019, Algorithm 2) and the cosine learning-rate schedule with warmup."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay.

    Per parameter, at step t (g = gradient, α = lr, λ = weight_decay):
        θ ← θ - αλθ                                  (decoupled decay)
        m ← β1 m + (1 - β1) g,   v ← β2 v + (1 - β2) g²
        θ ← θ - α/(1 - β1^t) · m / (sqrt(v / (1 - β2^t)) + ε)
    (the same ε placement as ``torch.optim.AdamW``). The update of a whole parameter group runs as
    a handful of multi-tensor ``torch._foreach_*`` kernels instead of a Python loop per tensor:
    for the 17M model that is the difference between ~10 and ~400 kernel launches per step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"invalid eps={eps} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params, grads, ms, vs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(ms, grads, 1 - beta1)  # m + (1-β1)(g - m) = β1 m + (1-β1) g
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, ms, denom, [-lr / (1 - beta1**t) for t in steps])
        return loss


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """Linear warmup to ``max_lr`` over ``warmup_iters``, cosine decay to ``min_lr`` at
    ``cosine_cycle_iters``, then ``min_lr`` (the course's schedule, from Touvron et al. 2023)."""
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it <= cosine_cycle_iters:
        progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    return min_lr
