"""Distributed data parallel containers, from naive to overlapped-and-bucketed (CS336 assignment 2, §2.2).

Each wraps an unchanged ``nn.Module``: parameters and buffers are broadcast from rank 0 at
construction, ``forward`` is the module's, and after ``loss.backward()`` the caller runs
``finish_gradient_synchronization()``; afterwards every rank holds the gradient of the mean loss
over the global batch (the mean of the per-rank gradients), so ``optimizer.step()`` keeps the
replicas identical.

- `DDPNaive`: after backward, one blocking all-reduce per parameter.
- `DDPFlat`: after backward, one all-reduce of all gradients flattened into a single buffer.
- `DDPIndividualParameters`: overlapped; an async all-reduce is launched from each parameter's
  post-accumulate-grad hook as soon as its gradient is ready, so communication runs while backward
  computes earlier layers.
- `DDPBucketed`: overlapped and batched; parameters are grouped, in reverse registration order (the
  order backward produces their gradients), into buckets of at most ``bucket_size_mb``; a bucket's
  flat buffer is all-reduced as soon as all its gradients are in.

Frozen parameters (``requires_grad=False``) are broadcast but never communicated. Tied parameters
appear once in ``module.parameters()`` and their hook fires once, after autograd has summed all uses.
Parameters unused in a step: the naive, flat and bucketed variants append one "used" flag per
parameter to what they all-reduce, so a gradient that no rank produced stays ``None`` (exactly as in
single-process training) while one produced by only some ranks is averaged with zeros; buckets are
launched strictly in index order, so ranks whose autograd graphs differ still issue the same
collectives in the same order. The per-parameter variant issues collectives in hook order and so
assumes every rank uses the same parameters (true for a fixed architecture).

Gradients are divided by the world size before the sum-all-reduce (exact for powers of two and
safe from fp16/bf16 overflow). ``comm_wait_s`` records the time the last
``finish_gradient_synchronization()`` spent blocked on communication.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def broadcast_module_(module: nn.Module, src: int = 0, group=None) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s (coalesced, per dtype)."""
    tensors = list(module.parameters()) + list(module.buffers())
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group_tensors in by_dtype.values():
            flat = _flatten_dense_tensors([t.data for t in group_tensors])
            dist.broadcast(flat, src=src, group=group)
            for t, synced in zip(group_tensors, _unflatten_dense_tensors(flat, group_tensors)):
                t.data.copy_(synced)


class _DDPBase(nn.Module):
    """Holds the module, broadcasts it, and forwards calls; subclasses add gradient communication."""

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__()
        self.module = module
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        broadcast_module_(module, group=process_group)
        # Deduplicated (tied weights appear once), trainable, in registration order.
        self._params = [p for p in module.parameters() if p.requires_grad]
        self.comm_wait_s = 0.0
        self._sync = True

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def on_train_batch_start(self) -> None:
        """Per-step reset hook of the adapter contract; state is reset in finish already."""

    @contextmanager
    def no_sync(self):
        """Skip communication for the backward passes inside (gradient accumulation); the next
        ``finish_gradient_synchronization()`` outside the block reduces the accumulated gradients.
        Without it, several backward passes before finish are still correct, each one communicating."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _all_reduce_with_flags(self, grads: list[torch.Tensor | None], like: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Average ``grads`` over ranks in one flat all-reduce; ``None`` entries contribute zeros and
        come back ``None`` only if no rank had a gradient (the appended used-flags say)."""
        flat = _flatten_dense_tensors(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, like)]
            + [torch.tensor([float(g is not None) for g in grads], dtype=like[0].dtype, device=like[0].device)]
        )
        flat[: flat.numel() - len(grads)].div_(self.world_size)
        dist.all_reduce(flat, group=self.process_group)
        used = flat[flat.numel() - len(grads) :].tolist()
        out, offset = [], 0
        for p, u in zip(like, used):
            n = p.numel()
            out.append(flat[offset : offset + n].view_as(p) if u > 0 else None)
            offset += n
        return out


class DDPNaive(_DDPBase):
    """After backward, a blocking all-reduce per parameter gradient (plus one flags all-reduce)."""

    def finish_gradient_synchronization(self) -> None:
        t0 = time.perf_counter()
        if self._params:
            used = torch.tensor([float(p.grad is not None) for p in self._params], device=self._params[0].device)
            for p in self._params:
                if p.grad is None:
                    zero = torch.zeros_like(p)
                    dist.all_reduce(zero, group=self.process_group)
                    p.grad = zero
                else:
                    p.grad.div_(self.world_size)
                    dist.all_reduce(p.grad, group=self.process_group)
            dist.all_reduce(used, group=self.process_group)
            for p, u in zip(self._params, used.tolist()):
                if u == 0:
                    p.grad = None
        self.comm_wait_s = time.perf_counter() - t0


class _Bucket:
    """Parameters whose gradients are all-reduced together through one flat buffer."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.index = {id(p): i for i, p in enumerate(params)}
        self.ready: list[torch.Tensor | None] = [None] * len(params)
        self.num_ready = 0
        self.work = None
        self.flat: torch.Tensor | None = None

    def reset(self) -> None:
        self.ready = [None] * len(self.params)
        self.num_ready = 0
        self.work = None
        self.flat = None


class DDPBucketed(_DDPBase):
    """Gradients grouped into reverse-order buckets of at most ``bucket_size_mb`` MB, each
    all-reduced asynchronously once complete (``bucket_size_mb=None``: a single bucket).

    ``overlap=False`` defers all communication to ``finish_gradient_synchronization`` (used by
    `DDPFlat`). Buckets are launched in index order so every rank issues identical collectives.
    """

    def __init__(self, module: nn.Module, bucket_size_mb: float | None = None, process_group=None, overlap: bool = True):
        super().__init__(module, process_group)
        self.bucket_size_mb = bucket_size_mb
        self.overlap = overlap
        limit = float("inf") if bucket_size_mb is None else bucket_size_mb * 1024 * 1024
        self.buckets: list[_Bucket] = []
        current: list[nn.Parameter] = []
        size = 0.0
        for p in reversed(self._params):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > limit or p.dtype != current[0].dtype or p.device != current[0].device):
                self.buckets.append(_Bucket(current))
                current, size = [], 0.0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._next_launch = 0
        self._stale_works: list = []
        if overlap:
            for p in self._params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._sync:
            return
        bucket = self._bucket_of[id(param)]
        i = bucket.index[id(param)]
        if bucket.ready[i] is not None or bucket.work is not None:
            self._new_generation()
        bucket.ready[i] = param.grad
        bucket.num_ready += 1
        self._launch_ready_buckets()

    def _new_generation(self) -> None:
        """Another backward pass before finish (gradient accumulation without ``no_sync``): complete
        this pass's launches so every rank has issued the same collectives, then start over; the last
        pass (whose gradients include all earlier micro-batches) is the one finish uses."""
        self._launch_remaining()
        self._stale_works.extend(b.work for b in self.buckets)
        for b in self.buckets:
            b.reset()

    def _launch(self, bucket: _Bucket) -> None:
        grads, like = bucket.ready, bucket.params[0]
        if all(g is not None for g in grads):  # the common case: no host-to-device copy
            flags = torch.ones(len(grads), dtype=like.dtype, device=like.device)
        else:
            flags = torch.tensor([float(g is not None) for g in grads], dtype=like.dtype, device=like.device)
        bucket.flat = _flatten_dense_tensors(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, bucket.params)] + [flags]
        )
        bucket.flat[: bucket.flat.numel() - len(grads)].div_(self.world_size)
        bucket.work = dist.all_reduce(bucket.flat, group=self.process_group, async_op=True)

    def _launch_ready_buckets(self) -> None:
        while self._next_launch < len(self.buckets):
            bucket = self.buckets[self._next_launch]
            if bucket.num_ready < len(bucket.params):
                break
            self._launch(bucket)
            self._next_launch += 1

    def _launch_remaining(self) -> None:
        """Launch, in order, the buckets backward did not complete (no hooks, no_sync, unused
        parameters): a missing gradient contributes zeros and a 0 flag."""
        for bucket in self.buckets[self._next_launch :]:
            for i, p in enumerate(bucket.params):
                if bucket.ready[i] is None and p.grad is not None:
                    bucket.ready[i] = p.grad
            self._launch(bucket)
        self._next_launch = 0

    def finish_gradient_synchronization(self) -> None:
        t0 = time.perf_counter()
        self._launch_remaining()
        for work in self._stale_works:
            work.wait()
        self._stale_works.clear()
        for bucket in self.buckets:
            bucket.work.wait()
        # All used-flags in one host transfer (one GPU sync, not one per bucket).
        flags = torch.cat([b.flat[b.flat.numel() - len(b.params) :] for b in self.buckets]).tolist() if self.buckets else []
        k = 0
        for bucket in self.buckets:
            offset = 0
            for p in bucket.params:
                if flags[k] > 0:
                    synced = bucket.flat[offset : offset + p.numel()].view_as(p)
                    if p.grad is None:
                        p.grad = synced.clone()
                    else:
                        p.grad.copy_(synced)
                else:
                    p.grad = None
                offset += p.numel()
                k += 1
            bucket.reset()
        self.comm_wait_s = time.perf_counter() - t0


class DDPFlat(DDPBucketed):
    """After backward, one all-reduce of every gradient flattened into a single buffer."""

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__(module, bucket_size_mb=None, process_group=process_group, overlap=False)


class DDPIndividualParameters(_DDPBase):
    """An async all-reduce per parameter, launched from its gradient hook during backward."""

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__(module, process_group)
        self._works: list = []
        self._reduced: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for p in self._params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        if self._sync:
            self._all_reduce(param)

    def _all_reduce(self, param: nn.Parameter) -> None:
        # Reduce a scaled copy, not .grad itself: a further micro-batch's backward (gradient
        # accumulation) may add into .grad while this is in flight. The copy costs no extra pass
        # (an out-of-place divide instead of an in-place one); the last one per parameter wins.
        buf = param.grad / self.world_size
        self._works.append(dist.all_reduce(buf, group=self.process_group, async_op=True))
        self._reduced[id(param)] = (param, buf)

    def finish_gradient_synchronization(self) -> None:
        t0 = time.perf_counter()
        if not self._works:  # e.g. after no_sync(): reduce the accumulated gradients now
            for p in self._params:
                if p.grad is not None:
                    self._all_reduce(p)
        for work in self._works:
            work.wait()
        for p, buf in self._reduced.values():
            p.grad = buf
        self._works.clear()
        self._reduced.clear()
        self.comm_wait_s = time.perf_counter() - t0
