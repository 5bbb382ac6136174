"""ZeRO stage 1: optimizer state sharded across data-parallel ranks (CS336 assignment 2, §2.3;
Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models").

Every rank still holds all parameters and (after DDP's all-reduce) all gradients, but each
parameter is *owned* by one rank, and only the owner keeps its optimizer state and runs its
update. After the local step each rank broadcasts the parameters it owns (one coalesced broadcast
per rank and dtype), so the replicas agree again. Ownership is assigned greedily by size (largest
parameter to the least-loaded rank), which balances state memory far better than round-robin for
transformer shapes. For AdamW the state is 2 fp32 tensors per parameter, so per-rank optimizer
memory drops from 2·P to about 2·P / world_size.

Usage: ``ShardedOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)`` (any optimizer class);
it behaves like a normal ``torch.optim.Optimizer``: ``step``, ``zero_grad``, ``add_param_group``,
``param_groups`` (learning-rate schedules write there; the values are copied to the local optimizer
before each step). As with ``torch.distributed.optim.ZeroRedundancyOptimizer``, ``state_dict()`` needs
a preceding ``consolidate_state_dict()`` on every rank (a collective); it then returns the full state
in the format of an unsharded ``optimizer_cls``, so single-process runs can resume from it, and
``load_state_dict`` takes that format back (each rank keeps the entries it owns).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class ShardedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, optimizer_cls: type[torch.optim.Optimizer], process_group=None, **kwargs: Any):
        # Set before super().__init__, which calls add_param_group for each group.
        self.optimizer_cls = optimizer_cls
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.owner: dict[int, int] = {}  # id(param) -> owning rank
        self._load = [0] * self.world_size  # elements owned per rank
        self.local_optimizer: torch.optim.Optimizer | None = None
        self._optimizer_kwargs = kwargs
        self._steps = 0
        self._consolidated: tuple[int, dict] | None = None
        super().__init__(params, defaults=kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        local = []
        for p in sorted(group["params"], key=lambda t: -t.numel()):
            if id(p) not in self.owner:
                r = min(range(self.world_size), key=lambda i: self._load[i])
                self.owner[id(p)] = r
                self._load[r] += p.numel()
        local = [p for p in group["params"] if self.owner[id(p)] == self.rank]
        local_group = {k: v for k, v in group.items() if k != "params"} | {"params": local}
        if self.local_optimizer is None:
            self.local_optimizer = self.optimizer_cls([local_group], **self._optimizer_kwargs)
        else:
            self.local_optimizer.add_param_group(local_group)

    @torch.no_grad()
    def step(self, closure=None, **kwargs: Any):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, local in zip(self.param_groups, self.local_optimizer.param_groups):
            for k, v in group.items():
                if k != "params":
                    local[k] = v  # learning-rate schedules edit self.param_groups
        self.local_optimizer.step(**kwargs)
        self._broadcast_owned()
        self._steps += 1
        return loss

    def _broadcast_owned(self) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for src in range(self.world_size):
            owned = [p for p in params if self.owner[id(p)] == src]
            by_dtype: dict[tuple, list[torch.Tensor]] = {}
            for p in owned:
                by_dtype.setdefault((p.dtype, p.device), []).append(p)
            for tensors in by_dtype.values():
                flat = _flatten_dense_tensors([t.data for t in tensors])
                dist.broadcast(flat, src=dist.get_global_rank(self.process_group, src) if self.process_group else src, group=self.process_group)
                if src != self.rank:
                    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                        t.copy_(synced)

    def local_state_numel(self) -> int:
        """Elements of optimizer state tensors held by this rank (for memory accounting and tests)."""
        return sum(v.numel() for s in self.local_optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)

    def _local_index(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(q for g in self.local_optimizer.param_groups for q in g["params"])}

    def consolidate_state_dict(self) -> dict[str, Any]:
        """Gather the full state, in ``optimizer_cls``'s own format (indices as an unsharded optimizer
        over the same param groups would use), on every rank. Collective: call on all ranks."""
        params = [p for g in self.param_groups for p in g["params"]]
        local_index = self._local_index()
        local_state = self.local_optimizer.state_dict()["state"]
        mine = {i: local_state[local_index[id(p)]] for i, p in enumerate(params) if local_index.get(id(p)) in local_state}
        gathered: list[dict] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, {i: {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in s.items()} for i, s in mine.items()}, group=self.process_group)
        state = {}
        for part in gathered:
            state.update(part)
        device = params[0].device if params else torch.device("cpu")
        state = {i: {k: (v.to(device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in s.items()} for i, s in sorted(state.items())}
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({k: v for k, v in g.items() if k != "params"} | {"params": list(range(start, start + n))})
            start += n
        full = {"state": state, "param_groups": groups}
        self._consolidated = (self._steps, full)
        return full

    def state_dict(self) -> dict[str, Any]:
        if self._consolidated is None or self._consolidated[0] != self._steps:
            raise RuntimeError("ShardedOptimizer.state_dict() needs consolidate_state_dict() on every rank after the last step")
        return self._consolidated[1]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a full (unsharded-format) state: hyperparameters for all groups, state for owned params."""
        params = [p for g in self.param_groups for p in g["params"]]
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("loaded state has a different number of parameter groups")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        local = self.local_optimizer.state_dict()
        local_index = self._local_index()
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        local["state"] = {local_index[id(p)]: saved_state[i] for i, p in enumerate(params) if id(p) in local_index and i in saved_state}
        for lg, g in zip(local["param_groups"], self.param_groups):
            lg.update({k: v for k, v in g.items() if k != "params"})
        self.local_optimizer.load_state_dict(local)
