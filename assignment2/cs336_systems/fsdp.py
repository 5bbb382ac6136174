"""Fully sharded data parallel (ZeRO stage 3) for an unchanged ``nn.Module`` (CS336 assignment 2;
Zhao et al., 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel").

Every trainable parameter of a Linear / Embedding module (``torch.nn`` or ``cs336_basics.model``,
matched by class name) is flattened, padded to a multiple of the world size and split: rank r keeps
chunk r as an fp32 *master shard*, an ``nn.Parameter`` of this wrapper that the optimizer updates.
The module itself sees a plain tensor (the "full" parameter) whose storage exists only while needed:

- forward: a pre-hook all-gathers the module's parameters (waiting for a prefetch issued by the
  previous module) and prefetches the next module's, in the forward order recorded on the first step;
  a post-hook frees the storage again (autograd keeps only a reference to the now-empty tensor).
- backward: a hook on the module's output re-gathers the parameters before the module's backward
  runs (Embedding skips this: its backward needs only the indices) and prefetches the next module in
  backward order. When autograd has accumulated the full gradient, a hook divides it by the world
  size, launches an async reduce-scatter (each rank receives its chunk, summed over ranks) and frees
  the full parameter. ``finish_gradient_synchronization()`` waits and adds the chunks, as fp32, to
  the shards' ``.grad``.
- ``compute_dtype`` (bf16 / fp16): gathers, compute and the gradient reduce-scatter run in that dtype;
  shards, and the optimizer, stay fp32. Inputs of the sharded modules are cast to it.

Everything else (RMSNorm gains, frozen parameters) stays replicated as in DDP: gradients are averaged
with one flat all-reduce after backward. Tied parameters (same tensor in two modules) share one
shard. The full tensors are re-gathered "in place" through an alias with its own version counter, so
autograd's saved-tensor checks see no modification. Collectives are issued in hook order, which is
identical on every rank for a fixed architecture (a sharded parameter unused by every rank keeps
``grad=None``). gloo in torch >= 2.6 has reduce_scatter / all_gather_into_tensor; older gloo builds
fall back to all_reduce + slice (`dist_utils.reduce_scatter_tensor`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from cs336_systems.ddp import broadcast_module_
from cs336_systems.dist_utils import all_gather_into_tensor, reduce_scatter_tensor

SHARDED_MODULE_NAMES = ("Linear", "Embedding")


def is_sharded_module(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or type(module).__name__ in SHARDED_MODULE_NAMES


class _FlatShard:
    """One sharded parameter: fp32 master shard, compute-dtype full tensor (storage on demand), and
    the in-flight gather / reduce-scatter."""

    def __init__(self, param: nn.Parameter, rank: int, world_size: int, compute_dtype: torch.dtype | None, group):
        self.shape, self.numel = param.shape, param.numel()
        self.chunk = -(-self.numel // world_size)
        self.world_size, self.group = world_size, group
        self.dtype = compute_dtype or param.dtype
        padded = torch.zeros(self.chunk * world_size, dtype=param.dtype, device=param.device)
        padded[: self.numel] = param.detach().reshape(-1)
        self.shard = nn.Parameter(padded[rank * self.chunk : (rank + 1) * self.chunk].clone())
        # `buffer` (padded) and `full` (the module's view) alias one storage; gathers write through
        # `buffer`, whose version counter is separate from `full`'s, so saved tensors stay valid.
        self.buffer = torch.empty(self.chunk * world_size, dtype=self.dtype, device=param.device)
        storage = self.buffer.untyped_storage()
        self.full = torch.empty(0, dtype=self.dtype, device=param.device).set_(storage, 0, self.shape)
        self.full.requires_grad_(True)
        self.nbytes = storage.nbytes()
        storage.resize_(0)
        self.allocated = False
        self.gather_work = None
        self.grad_out: torch.Tensor | None = None
        self.grad_work = None

    def start_gather(self) -> None:
        if self.allocated or self.gather_work is not None:
            return
        self.buffer.untyped_storage().resize_(self.nbytes)
        send = self.shard.detach().to(self.dtype)
        self.gather_work = all_gather_into_tensor(self.buffer, send, group=self.group, async_op=True)

    def wait_gather(self) -> None:
        self.start_gather()
        if self.gather_work is not None:
            self.gather_work.wait()
            self.gather_work = None
            self.allocated = True

    def free(self) -> None:
        if self.gather_work is not None:  # never free under an in-flight gather
            self.wait_gather()
        self.buffer.untyped_storage().resize_(0)
        self.allocated = False

    def on_full_grad(self, full: torch.Tensor) -> None:
        grad = full.grad
        full.grad = None
        if self.chunk * self.world_size == self.numel:
            send = grad.reshape(-1)
        else:
            send = torch.zeros(self.chunk * self.world_size, dtype=grad.dtype, device=grad.device)
            send[: self.numel] = grad.reshape(-1)
        send.div_(self.world_size)  # pre-divide: exact for powers of two, no fp16 overflow
        out = torch.empty(self.chunk, dtype=grad.dtype, device=grad.device)
        if self.grad_work is not None:  # a second backward before finish: fold the first one in
            self.finish_grad()
        self.grad_out, self.grad_work = out, reduce_scatter_tensor(out, send, group=self.group, async_op=True)
        self.free()

    def finish_grad(self) -> None:
        if self.grad_work is None:
            return
        self.grad_work.wait()
        g = self.grad_out.to(self.shard.dtype)
        self.shard.grad = g if self.shard.grad is None else self.shard.grad.add_(g)
        self.grad_work, self.grad_out = None, None


class FSDP(nn.Module):
    """Shards Linear/Embedding parameters of ``module`` across the ranks of ``process_group``."""

    def __init__(self, module: nn.Module, compute_dtype: torch.dtype | None = None, process_group=None, prefetch: bool = True):
        super().__init__()
        self.module = module
        self.compute_dtype = compute_dtype
        self.process_group = process_group
        self.prefetch = prefetch
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        broadcast_module_(module, group=process_group)
        self.param_names = [name for name, _ in module.named_parameters(remove_duplicate=False)]
        self.unique_param_names = [name for name, _ in module.named_parameters()]  # a plain optimizer's order

        self._handles: dict[int, _FlatShard] = {}  # id(original param) -> shard
        self._module_handles: dict[nn.Module, list[_FlatShard]] = {}
        self._full_names: dict[str, _FlatShard] = {}
        shards = []
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            if not is_sharded_module(mod):
                continue
            handles = []
            for pname, p in list(mod._parameters.items()):
                if p is None or not p.requires_grad:
                    continue
                if id(p) not in self._handles:
                    h = _FlatShard(p, self.rank, self.world_size, compute_dtype, process_group)
                    h.full.register_post_accumulate_grad_hook(h.on_full_grad)
                    self._handles[id(p)] = h
                    shards.append(h.shard)
                h = self._handles[id(p)]
                handles.append(h)
                self._full_names[f"{mod_name}.{pname}" if mod_name else pname] = h
            if handles and mod not in self._module_handles:
                self._module_handles[mod] = handles
        for mod, handles in self._module_handles.items():
            for pname, p in list(mod._parameters.items()):
                if p is not None and id(p) in self._handles:
                    del mod._parameters[pname]
                    setattr(mod, pname, self._handles[id(p)].full)
            mod.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            mod.register_forward_hook(self._post_forward)
        self.shards = nn.ParameterList(shards)
        self._replicated = [p for p in module.parameters() if p.requires_grad]
        self._forward_order: list[nn.Module] = []
        self._recording = True
        self.comm_wait_s = 0.0

    # -- hooks -----------------------------------------------------------------------------------
    def _next(self, mod: nn.Module, step: int) -> nn.Module | None:
        order = self._forward_order
        if self._recording or not self.prefetch:
            return None
        try:
            i = order.index(mod) + step
        except ValueError:
            return None
        return order[i] if 0 <= i < len(order) else None

    def _pre_forward(self, mod: nn.Module, args, kwargs):
        if self._recording:
            self._forward_order.append(mod)
        for h in self._module_handles[mod]:
            h.wait_gather()
        nxt = self._next(mod, +1)
        if nxt is not None:
            for h in self._module_handles[nxt]:
                h.start_gather()
        if self.compute_dtype is not None:
            cast = lambda t: t.to(self.compute_dtype) if torch.is_tensor(t) and t.is_floating_point() else t
            return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        return None

    def _post_forward(self, mod: nn.Module, args, output):
        for h in self._module_handles[mod]:
            h.free()
        if torch.is_tensor(output) and output.requires_grad:
            needs_params = not (isinstance(mod, nn.Embedding) or type(mod).__name__ == "Embedding")
            output.register_hook(lambda grad: self._pre_backward(mod, needs_params))

    def _pre_backward(self, mod: nn.Module, needs_params: bool) -> None:
        if needs_params:
            for h in self._module_handles[mod]:
                h.wait_gather()
        nxt = self._next(mod, -1)
        if nxt is not None and not (isinstance(nxt, nn.Embedding) or type(nxt).__name__ == "Embedding"):
            for h in self._module_handles[nxt]:
                h.start_gather()

    # -- API ---------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self._recording:
            self._forward_order = []
        return self.module(*args, **kwargs)

    def on_train_batch_start(self) -> None:
        """Per-step hook of the adapter contract (nothing to reset)."""

    def finish_gradient_synchronization(self) -> None:
        t0 = time.perf_counter()
        self._recording = False  # the forward order is known after the first step
        for h in self._handles.values():
            h.finish_grad()
            if h.allocated or h.gather_work is not None:  # e.g. a prefetch that backward never used
                h.free()
        if self._replicated:
            grads = [p.grad for p in self._replicated]
            used = torch.tensor([float(g is not None) for g in grads], device=self._replicated[0].device)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, self._replicated)] + [used])
            flat[: flat.numel() - len(grads)].div_(self.world_size)
            dist.all_reduce(flat, group=self.process_group)
            offset = 0
            for p, u in zip(self._replicated, flat[flat.numel() - len(grads) :].tolist()):
                p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone() if u > 0 else None
                offset += p.numel()
        self.comm_wait_s = time.perf_counter() - t0

    @torch.no_grad()
    def gather_full_params(self) -> dict[str, torch.Tensor]:
        """``{name: full tensor}`` (master dtype) for every parameter name of the wrapped module, tied
        names included, as in ``module.named_parameters(remove_duplicate=False)``. Collective."""
        full: dict[int, torch.Tensor] = {}
        for h in self._handles.values():
            out = torch.empty(h.chunk * self.world_size, dtype=h.shard.dtype, device=h.shard.device)
            all_gather_into_tensor(out, h.shard.detach(), group=self.process_group)
            full[id(h)] = out[: h.numel].view(h.shape)
        replicated = dict(self.module.named_parameters(remove_duplicate=False))
        return {
            name: full[id(self._full_names[name])] if name in self._full_names else replicated[name].detach().clone()
            for name in self.param_names
        }

    def _plain_order(self) -> list[tuple[torch.Tensor, _FlatShard | None]]:
        """(parameter the optimizer sees, its shard handle or None) in the plain module's order."""
        replicated = dict(self.module.named_parameters(remove_duplicate=False))
        return [(self._full_names[n].shard, self._full_names[n]) if n in self._full_names else (replicated[n], None)
                for n in self.unique_param_names]

    @torch.no_grad()
    def full_optim_state_dict(self, optimizer: torch.optim.Optimizer) -> dict:
        """The state of ``optimizer`` (built over this wrapper's parameters, one param group) in the
        format the same optimizer class has over the plain module's parameters: shard-shaped state
        tensors are all-gathered to full shape. Collective: call on every rank."""
        if len(optimizer.param_groups) != 1:
            raise ValueError("full_optim_state_dict supports one parameter group")
        state = {}
        for i, (q, h) in enumerate(self._plain_order()):
            entry = {}
            for k, v in optimizer.state.get(q, {}).items():
                if h is not None and torch.is_tensor(v) and v.shape == h.shard.shape:
                    out = torch.empty(h.chunk * self.world_size, dtype=v.dtype, device=v.device)
                    all_gather_into_tensor(out, v.contiguous(), group=self.process_group)
                    v = out[: h.numel].view(h.shape)
                entry[k] = v.clone() if torch.is_tensor(v) else v
            if entry:
                state[i] = entry
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [group | {"params": list(range(len(self.unique_param_names)))}]}

    @torch.no_grad()
    def shard_optim_state_dict(self, optimizer: torch.optim.Optimizer, full: dict) -> dict:
        """Inverse of `full_optim_state_dict`: this rank's slice, in ``optimizer``'s own format."""
        own = torch.optim.Optimizer.state_dict(optimizer)
        index = {id(p): j for j, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        saved = {int(k): v for k, v in full["state"].items()}
        state = {}
        for i, (q, h) in enumerate(self._plain_order()):
            if i not in saved:
                continue
            entry = {}
            for k, v in saved[i].items():
                if h is not None and torch.is_tensor(v) and tuple(v.shape) == tuple(h.shape):
                    padded = torch.zeros(h.chunk * self.world_size, dtype=v.dtype, device=h.shard.device)
                    padded[: h.numel] = v.reshape(-1)
                    v = padded[self.rank * h.chunk : (self.rank + 1) * h.chunk]
                entry[k] = v.clone() if torch.is_tensor(v) else v
            state[index[id(q)]] = entry
        own["state"] = state
        own["param_groups"][0].update({k: v for k, v in full["param_groups"][0].items() if k != "params"})
        return own

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped module's ``state_dict()`` with full parameters (loads into the plain module).
        Collective: call on every rank."""
        state = dict(self.gather_full_params())
        state.update(self.module.state_dict())  # buffers (and the replicated parameters again)
        return state
