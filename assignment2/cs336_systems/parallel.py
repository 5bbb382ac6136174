"""Distributed training of the cs336_basics LM: the ``strategy`` that ``cs336_basics.train.train``
calls, one per ``--parallel`` mode, and the ``torchrun`` entry point.

    torchrun --nproc_per_node 2 -m cs336_systems.parallel --parallel ddp-bucketed --preset tiny \\
        --train-data data/tiny_train.bin --val-data data/tiny_valid.bin
    cs336-systems train --parallel fsdp ...          # the same (one process without torchrun)

Modes: ``none`` (plain single process), ``ddp-naive`` / ``ddp-flat`` / ``ddp-overlap`` (per-parameter
async all-reduce) / ``ddp-bucketed`` (`cs336_systems.ddp`), ``zero1`` (bucketed DDP + `ShardedOptimizer`),
``fsdp`` (`cs336_systems.fsdp`), and PyTorch's own ``torch-ddp`` (DistributedDataParallel) and
``torch-fsdp2`` (``fully_shard`` per Transformer block + root) as references. All other flags are
``cs336-basics train``'s (one per TrainConfig field).

Every rank samples the same global batch and trains on its slice (train.py does this); only rank 0
logs and writes files; checkpoints hold the full, unsharded model under the plain module's names
(and, for zero1 and fsdp, the consolidated optimizer state in the plain AdamW format), so
single-process runs load and resume them. torch-fsdp2 checkpoints hold the full model but rank 0's
sharded optimizer state: they load for evaluation / fine-tuning, not for an exact resume. The process
group's timeout (``--dist-timeout``, seconds) bounds every collective: a rank that crashed or hangs
makes the others fail with a timeout / connection error instead of waiting forever (under torchrun,
a crashed worker also makes torchrun stop the rest).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from cs336_systems import ddp, fsdp, sharded_optimizer
from cs336_systems.dist_utils import DEFAULT_TIMEOUT_S, find_free_port, init_distributed

MODES = ("none", "ddp-naive", "ddp-flat", "ddp-overlap", "ddp-bucketed", "zero1", "fsdp", "torch-ddp", "torch-fsdp2")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _full_state_adamw(fsdp_model: fsdp.FSDP, **adamw_kwargs) -> torch.optim.Optimizer:
    """Our AdamW over FSDP's shards whose ``state_dict`` / ``load_state_dict`` speak the unsharded
    format (consolidated by `ParallelStrategy.model_state_dict`), so fsdp checkpoints resume in any
    mode, single-process included."""
    from cs336_basics.optimizer import AdamW

    class FullStateAdamW(AdamW):
        consolidated: dict | None = None

        def consolidate_state_dict(self) -> None:
            self.consolidated = fsdp_model.full_optim_state_dict(self)

        def state_dict(self) -> dict:
            if self.consolidated is None:
                raise RuntimeError("call consolidate_state_dict() on every rank before state_dict()")
            return self.consolidated

        def load_state_dict(self, state_dict: dict) -> None:
            super().load_state_dict(fsdp_model.shard_optim_state_dict(self, state_dict))

    return FullStateAdamW(fsdp_model.parameters(), **adamw_kwargs)


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


@dataclass
class ParallelStrategy:
    """The ``strategy`` object of ``cs336_basics.train.train`` (see docs: INTERFACES.md)."""

    mode: str
    rank: int
    world_size: int
    device: torch.device
    bucket_size_mb: float = 25.0
    compute_dtype: torch.dtype | None = None  # fsdp / torch-fsdp2: gather + compute dtype
    grad_clip: float = 0.0  # sharded modes clip by the *global* norm in after_backward
    _optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in MODES or self.mode == "none":
            raise ValueError(f"--parallel must be one of {MODES[1:]} for a strategy, got {self.mode!r}")

    # -- model and optimizer -----------------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        m = self.mode
        if m == "ddp-naive":
            return ddp.DDPNaive(model)
        if m == "ddp-flat":
            return ddp.DDPFlat(model)
        if m == "ddp-overlap":
            return ddp.DDPIndividualParameters(model)
        if m in ("ddp-bucketed", "zero1"):
            return ddp.DDPBucketed(model, bucket_size_mb=self.bucket_size_mb)
        if m == "fsdp":
            return fsdp.FSDP(model, compute_dtype=self.compute_dtype)
        if m == "torch-ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.bucket_size_mb)
        if m == "torch-fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            ddp.broadcast_module_(model)  # fully_shard keeps each rank's local values: start from rank 0's
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=self.compute_dtype)
            for block in getattr(model, "layers", []):
                fully_shard(block, mesh=mesh, mp_policy=policy)
            return fully_shard(model, mesh=mesh, mp_policy=policy)
        raise AssertionError(m)

    def make_optimizer(self, model: nn.Module, **adamw_kwargs) -> torch.optim.Optimizer:
        from cs336_basics.optimizer import AdamW

        if self.mode == "zero1":
            self._optimizer = sharded_optimizer.ShardedOptimizer(model.parameters(), AdamW, **adamw_kwargs)
        elif self.mode == "fsdp":
            self._optimizer = _full_state_adamw(model, **adamw_kwargs)
        else:
            self._optimizer = AdamW(model.parameters(), **adamw_kwargs)
        return self._optimizer

    # -- per step ----------------------------------------------------------------------------------
    def after_backward(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wait for gradient communication. For the sharded modes also clip by the global gradient
        norm (each rank holds only part of the gradient, so train.py's clip sees a partial norm; after
        this, its clip finds a norm below the limit and changes nothing)."""
        if hasattr(model, "finish_gradient_synchronization"):
            model.finish_gradient_synchronization()
        if self.grad_clip and self.mode in ("fsdp", "torch-fsdp2"):
            self.clip_grad_norm(model, self.grad_clip)

    def clip_grad_norm(self, model: nn.Module, max_norm: float, eps: float = 1e-6) -> float:
        """Global-norm clipping with the formula of ``cs336_basics.nn_utils.clip_grad_norm``."""
        sharded, replicated = [], []
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad
            if hasattr(g, "to_local"):  # DTensor (torch-fsdp2): a shard
                sharded.append(g.to_local())
            elif self.mode == "fsdp" and any(p is s for s in getattr(model, "shards", [])):
                sharded.append(g)
            else:
                replicated.append(g)
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i, gs in enumerate((sharded, replicated)):
            for g in gs:
                sq[i] += g.double().pow(2).sum()
        dist.all_reduce(sq[:1])  # shards: sum over ranks; replicated: every rank has the whole
        total = float(sq.sum().sqrt())
        scale = min(1.0, max_norm / (total + eps))
        if scale < 1.0:
            for g in sharded + replicated:
                g.mul_(scale)
        return total

    # -- checkpoints and logging -------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> dict:
        """Full state dict under the plain TransformerLM's names. Collective: call on every rank.
        For zero1 / fsdp it also consolidates the optimizer state, so rank 0's
        ``optimizer.state_dict()`` (called next by train.py's checkpoint) returns the unsharded-format state."""
        if hasattr(self._optimizer, "consolidate_state_dict"):  # zero1, fsdp
            self._optimizer.consolidate_state_dict()
        if self.mode == "fsdp":
            return model.full_state_dict()
        if self.mode == "torch-fsdp2":
            return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in model.state_dict().items()}
        return _unwrap(model).state_dict()

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def all_reduce_mean_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a 0-dim tensor, as a 0-dim float64 tensor on the device: queued
        behind the work that produces it, nothing read back (the training loop reads it a step later)."""
        t = value.detach().to(device=self.device, dtype=torch.float64).reshape(1)
        dist.all_reduce(t)
        return t[0] / self.world_size


def make_strategy(mode: str, cfg=None, *, bucket_size_mb: float = 25.0, compute_dtype: str = "auto",
                  timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> ParallelStrategy | None:
    """Join the process group (torchrun's environment) and build the strategy; ``None`` for 'none'."""
    if mode == "none":
        return None
    rank, world_size, device = init_distributed(backend, timeout_s=timeout_s)
    if compute_dtype == "auto":  # bf16 where train.py autocasts to bf16 (GPU), else exact fp32
        dtype = torch.bfloat16 if device.type == "cuda" and cfg is not None and cfg.dtype == "bf16" else None
    else:
        dtype = DTYPES[compute_dtype]
    return ParallelStrategy(mode, rank, world_size, device, bucket_size_mb=bucket_size_mb, compute_dtype=dtype,
                            grad_clip=getattr(cfg, "grad_clip", 0.0) if cfg is not None else 0.0)


def cli_main(argv: list[str] | None = None) -> int:
    from cs336_basics.checkpoint import CheckpointError
    from cs336_basics.config import add_config_args, config_from_cli
    from cs336_basics.train import TrainingStopped, exit_status, train

    parser = argparse.ArgumentParser(prog="cs336-systems train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", choices=MODES, default="ddp-bucketed", help="data-parallel implementation")
    parser.add_argument("--bucket-size-mb", type=float, default=25.0, help="ddp-bucketed / zero1 / torch-ddp bucket size")
    parser.add_argument("--compute-dtype", choices=("auto", *DTYPES), default="auto",
                        help="fsdp / torch-fsdp2 gather+compute dtype (auto: bf16 on GPU with --dtype bf16, else fp32)")
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds any collective may wait before the job fails")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_cli(parser, args)
    if args.parallel != "none" and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1")  # a one-process group: same code path, no torchrun
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    strategy = make_strategy(args.parallel, cfg, bucket_size_mb=args.bucket_size_mb,
                             compute_dtype=args.compute_dtype, timeout_s=args.dist_timeout)
    try:
        result = train(cfg, strategy)
        if dist.is_initialized():
            # every rank leaves together: a rank that tears down its gloo pairs while a peer is
            # still finishing (rank 0 writes the last checkpoint) can abort the peer's exit
            dist.barrier()
    except (TrainingStopped, CheckpointError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(cli_main())
