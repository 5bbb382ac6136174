"""Checkpoints: model + optimizer + iteration (+ config, RNG states, data position), written atomically.

A checkpoint is written to a temporary file in the destination folder and renamed over the
target, so a crash mid-write never leaves a truncated file where the last good one was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, BinaryIO

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit the model it is loaded into."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` (``_orig_mod``) and DDP-style (``module``) wrappers,
    so state-dict keys never carry wrapper prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def save_checkpoint(
    model: nn.Module | dict,
    optimizer: torch.optim.Optimizer | dict | None,
    iteration: int,
    out: str | os.PathLike | BinaryIO | IO[bytes],
    **extra: Any,
) -> None:
    """Save ``{"model", "optimizer", "iteration", **extra}``. ``model``/``optimizer`` may also be
    state dicts already (a sharded run passes the gathered full state)."""
    payload = {
        "model": model if isinstance(model, dict) else unwrap(model).state_dict(),
        "optimizer": optimizer if isinstance(optimizer, dict) or optimizer is None else optimizer.state_dict(),
        "iteration": int(iteration),
        **extra,
    }
    if not isinstance(out, (str, os.PathLike)):
        torch.save(payload, out)
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(src: str | os.PathLike | BinaryIO | IO[bytes], map_location="cpu") -> dict:
    """Load a checkpoint's payload, with a clear error for a missing, truncated or foreign file."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise CheckpointError(f"checkpoint not found: {src}")
    try:
        payload = torch.load(src, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip / pickle
        raise CheckpointError(f"checkpoint {src} is corrupted or not a checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or "model" not in payload or "iteration" not in payload:
        raise CheckpointError(f"checkpoint {src} lacks the 'model'/'iteration' entries of a cs336 checkpoint")
    return payload


def load_model_state(model: nn.Module, state: dict, name: str = "checkpoint") -> None:
    """``load_state_dict`` with every key/shape mismatch listed before anything is modified."""
    model = unwrap(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = ([f"missing keys: {missing[:8]}"] if missing else []) + \
                ([f"unexpected keys: {unexpected[:8]}"] if unexpected else []) + shapes[:8]
        raise CheckpointError(f"{name} does not match the model (different config?):\n  " + "\n  ".join(lines))
    model.load_state_dict(state)


def load_checkpoint(
    src: str | os.PathLike | BinaryIO | IO[bytes],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Restore model (and optimizer) state in place; return the saved iteration."""
    payload = read_checkpoint(src)
    load_model_state(model, payload["model"], name=f"checkpoint {src}")
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return payload["iteration"]
