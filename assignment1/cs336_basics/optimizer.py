"""AdamW (Loshchilov & Hutter 2019, Algorithm 2) and the cosine learning-rate schedule with warmup."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cs336_basics.triton_support import import_kernels, kernels_for


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay.

    Per parameter, at step t (g = gradient, α = lr, λ = weight_decay):
        θ ← θ - αλθ                                  (decoupled decay)
        m ← β1 m + (1 - β1) g,   v ← β2 v + (1 - β2) g²
        θ ← θ - α/(1 - β1^t) · m / (sqrt(v / (1 - β2^t)) + ε)
    (the same ε placement as ``torch.optim.AdamW``). Two implementations of the same update:

    - fused (``fused_adamw.py``): one Triton kernel launch per bucket of tensors that reads p, g,
      m, v once and writes p, m, v once. ``fused=None`` (default) uses it for CUDA tensors when
      Triton imports; ``fused=True`` insists on Triton (tensors it cannot take still go foreach).
    - foreach: a handful of multi-tensor ``torch._foreach_*`` kernels per group instead of a Python
      loop per tensor (for the 17M model ~10 instead of ~400 launches, but ~8 passes over memory
      and a full-size temporary). Used on CPU/MPS, without Triton, or with ``fused=False``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        fused: bool | None = None,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"invalid eps={eps} or weight_decay={weight_decay}")
        if fused and import_kernels("fused_adamw") is None:
            raise ValueError("fused=True needs Triton (pip install triton); use fused=None or False")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.fused = fused  # not a group entry: state dicts stay as they were
        # per parameter: (storage addresses of p, m, v when checked, fused kernel takes them?, key part)
        self._static: dict[torch.Tensor, tuple[tuple[int, int, int], bool, tuple]] = {}

    def _bucket_key(self, p: torch.Tensor, state: dict) -> tuple:
        """(fused?, device, dtypes, step): tensors with one key are updated together. The checks on
        p and its states are cached while their storage stays: the step's host time can be on the
        critical path of a fast GPU (for the 39 tensors of tinystories-17m the checks took 104 of
        the 207 us per step on CPU; 148 us with the cache)."""
        m, v = state["exp_avg"], state["exp_avg_sq"]
        addresses = (p.data_ptr(), m.data_ptr(), v.data_ptr())
        cached = self._static.get(p)
        if cached is None or cached[0] != addresses:
            kernels = kernels_for(p.device, "fused_adamw") if self.fused is not False else None
            ok = kernels is not None and kernels.supports_states(p, m, v)
            cached = self._static[p] = (addresses, ok, (p.device, p.dtype, m.dtype))
        _, ok, static_key = cached
        fused = ok and import_kernels("fused_adamw").supports_grad(p.grad)
        return (fused, *static_key, p.grad.dtype, state["step"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # buckets of tensors updated together: same implementation, device, dtypes and step
            buckets: dict[tuple, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                key = self._bucket_key(p, state)
                for lst, t in zip(buckets.setdefault(key, ([], [], [], [])),
                                  (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(t)
            beta1, beta2 = group["betas"]
            hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                     "weight_decay": group["weight_decay"]}
            for (fused, *_, step), tensors in buckets.items():
                update = import_kernels("fused_adamw").adamw_step_ if fused else foreach_adamw_step_
                update(*tensors, step, **hyper)
        return loss


@torch.no_grad()
def foreach_adamw_step_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], step: int, *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float,
) -> None:
    """The AdamW update of ``params`` (all at step ``step``) as multi-tensor ``torch._foreach_*`` ops."""
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m + (1-β1)(g - m) = β1 m + (1-β1) g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)  # a full-size temporary
    torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / (1 - beta1**step))


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, cosine_cycle_iters: int) -> float:
    """Linear warmup to ``max_lr`` over ``warmup_iters``, cosine decay to ``min_lr`` at
    ``cosine_cycle_iters``, then ``min_lr`` (the course's schedule, from Touvron et al. 2023)."""
    if it < warmup_iters:
        return it / warmup_iters * max_lr
    if it <= cosine_cycle_iters:
        progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
        return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)
    return min_lr
