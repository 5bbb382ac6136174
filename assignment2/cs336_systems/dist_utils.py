"""Process-group plumbing shared by the DDP / ZeRO-1 / FSDP code, its tests and benchmarks.

- `init_distributed()` joins a process group from torchrun's environment (or explicit arguments) with
  a finite timeout, so a hung collective raises instead of blocking forever.
- `run_distributed(fn, world_size)` runs `fn(rank, world_size, *args)` in `world_size` local processes
  (gloo by default), returns each rank's result, and turns a crashed rank, a hung collective or an
  overall timeout into one `RuntimeError` naming the rank and carrying its traceback. Tests use the
  ``fork`` start method: the children inherit the already-imported torch, so a 2-process job starts in
  well under a second instead of re-importing torch (3-5 s per process).
- `reduce_scatter_tensor()` / `all_gather_into_tensor()`: the collectives FSDP needs, with an
  all_reduce + slice (resp. list all_gather) fallback for backends that lack the fused ops (older
  gloo builds; gloo in torch >= 2.6 has both).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300.0

_AUTOGRAD_FORK_ERROR = "Unable to handle autograd's threading in combination with fork-based multiprocessing"


def _start_autograd_engine_on_cpu() -> None:
    """Run one tiny CPU backward so the autograd engine sizes its device-thread pool now.

    The engine starts its pool once, at the first backward of the process. If that first backward
    comes after ``torch.compile`` has run (even with ``backend="eager"``), the pool is started in a
    fork-unsafe way and every ``fork``-started child that calls ``backward`` fails with
    "Unable to handle autograd's threading ...". Started here, at import, on a CPU-only process
    the pool stays empty and ``fork`` stays safe. (Measured with torch 2.11: compile, backward,
    fork, backward fails; backward, compile, backward, fork, backward works.)
    """
    x = torch.zeros(1, requires_grad=True)
    x.sum().backward()


_start_autograd_engine_on_cpu()


def find_free_port() -> int:
    """A TCP port that is free right now (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    backend: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[int, int, torch.device]:
    """Join (or reuse) the default process group; returns (rank, world_size, device).

    Without explicit arguments it reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT. The backend defaults to NCCL when CUDA is available, else gloo. ``timeout_s`` bounds
    every collective: a rank that never arrives makes the others raise after this many seconds.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
        addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = master_port or int(os.environ.get("MASTER_PORT", "29500"))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(
            backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return rank, world_size, device


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (no orphaned ranks left
    waiting in a collective if the launcher is killed)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(fn, rank, world_size, port, backend, timeout_s, num_threads, args, results) -> None:
    _die_with_parent()
    try:
        if num_threads:
            torch.set_num_threads(num_threads)  # 2 ranks on 2 cores: no oversubscription
        init_distributed(backend, rank=rank, world_size=world_size, master_port=port, timeout_s=timeout_s)
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 — report everything (incl. KeyboardInterrupt) to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # best effort after a failure
                dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    collective_timeout_s: float = 60.0,
    start_method: str = "fork",
    num_threads: int | None = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the per-rank results.

    Raises ``RuntimeError`` as soon as any rank fails (its traceback in the message; the others are
    killed), or when the job exceeds ``timeout_s`` (naming the ranks that had not finished).
    ``collective_timeout_s`` is the process group's timeout: a collective that waits longer raises in
    that rank. Results travel through a queue, so they must be picklable (tensors are fine).
    """
    if start_method == "fork":
        # Constructing any torch.optim optimizer imports torch._dynamo (5-25 s); import it once here
        # so forked children inherit it instead of each paying for it.
        import torch._dynamo  # noqa: F401
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, backend, collective_timeout_s, num_threads, args, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise RuntimeError(f"distributed job timed out after {timeout_s:.0f}s; ranks {missing} did not finish")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} without reporting") from None
                continue
            if status == "error":
                hint = ""
                if start_method == "fork" and _AUTOGRAD_FORK_ERROR in value:
                    hint = ("\nThis process ran autograd in a fork-unsafe state before forking (e.g. its first "
                            "backward came after torch.compile and before cs336_systems.dist_utils was "
                            "imported): import cs336_systems.dist_utils earlier, or pass start_method='spawn'.")
                raise RuntimeError(f"rank {rank} failed:\n{value}{hint}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


def all_reduce_mean(value: float, device: torch.device | None = None) -> float:
    """Mean of a Python float over all ranks (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


_FUSED_SUPPORTED: dict[tuple[str, str], bool] = {}


def _fused_ok(name: str, group) -> bool:
    return _FUSED_SUPPORTED.get((name, dist.get_backend(group)), True)


def _mark_unsupported(name: str, group, err: Exception) -> None:
    msg = str(err).lower()
    if "support" not in msg and "implement" not in msg:
        raise err  # a real failure (timeout, dead peer), not a missing op
    _FUSED_SUPPORTED[(name, dist.get_backend(group))] = False


class _DoneWork:
    """Stand-in for a completed ``dist.Work`` (the fallbacks run synchronously)."""

    def wait(self) -> bool:
        return True


def reduce_scatter_tensor(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """Sum-reduce ``input`` (world_size * output.numel()) over ranks; rank r receives chunk r.

    Falls back to all_reduce on a copy + slice (2x the traffic, synchronous) when the backend has no
    reduce_scatter for this dtype.
    """
    if _fused_ok("reduce_scatter", group):
        try:
            return dist.reduce_scatter_tensor(output, input, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError) as err:
            _mark_unsupported("reduce_scatter", group, err)
    full = input.clone()
    dist.all_reduce(full, group=group)
    rank = dist.get_rank(group)
    output.copy_(full.view(-1)[rank * output.numel() : (rank + 1) * output.numel()].view_as(output))
    return _DoneWork() if async_op else None


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """``output`` (world_size * input.numel()) gets every rank's ``input``, in rank order."""
    if _fused_ok("all_gather", group):
        try:
            return dist.all_gather_into_tensor(output, input, group=group, async_op=async_op)
        except (RuntimeError, NotImplementedError) as err:
            _mark_unsupported("all_gather", group, err)
    dist.all_gather(list(output.view(-1).chunk(dist.get_world_size(group))), input.view(-1), group=group)
    return _DoneWork() if async_op else None
