"""Language-model batches from a flat token-id file read through ``np.memmap``.

Token files are written by ``cs336-basics tokenize``: a flat uint16/uint32 array plus a JSON
sidecar ``<file>.json`` holding at least ``{"dtype": "uint16"}``. Memory-mapping means a 10 GB
corpus costs no RAM: each batch reads only its ``B × (T + 1)`` tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch


class DataError(ValueError):
    """A token file that cannot be used as asked (missing, too short, ids out of range)."""


def load_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a token file using the dtype of its ``<file>.json`` sidecar.

    With ``vocab_size``, check (one pass, chunked) that every id is ``< vocab_size``: an id out of
    range would otherwise surface as an opaque CUDA index assertion deep inside the embedding.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file not found: {path}")
    meta = read_sidecar(path)
    sidecar = Path(str(path) + ".json")
    try:
        dtype = np.dtype(meta["dtype"])
    except (KeyError, TypeError):
        dtype = None
    if dtype is None or dtype.kind not in "ui":
        raise DataError(f"{sidecar}: 'dtype' must be an integer dtype such as 'uint16', got {meta.get('dtype')!r}")
    if path.stat().st_size % dtype.itemsize:
        raise DataError(f"{path}: size {path.stat().st_size} bytes is not a multiple of {dtype} ({dtype.itemsize} bytes)")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if vocab_size is not None:
        check_token_range(tokens, vocab_size, name=str(path))
    return tokens


def read_sidecar(path: str | os.PathLike) -> dict:
    """The ``<file>.json`` sidecar of a token file (dtype, token count, bytes per token, ...)."""
    sidecar = Path(str(path) + ".json")
    if not sidecar.is_file():
        raise DataError(f"{path}: missing sidecar {sidecar.name} (written by `cs336-basics tokenize`) naming the dtype")
    return json.loads(sidecar.read_text())


def check_token_range(tokens: npt.NDArray, vocab_size: int, name: str = "dataset", chunk: int = 1 << 24) -> None:
    """Raise ``DataError`` naming the first offending position if any id is outside ``[0, vocab_size)``."""
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk])
        if len(part) and (int(part.max()) >= vocab_size or int(part.min()) < 0):
            bad = int(np.flatnonzero((part >= vocab_size) | (part < 0))[0])
            raise DataError(
                f"{name}: token id {int(part[bad])} at position {start + bad} is outside the model's "
                f"vocabulary (vocab_size={vocab_size}); was it tokenized with a different tokenizer?"
            )


def _check_length(dataset: npt.NDArray, context_length: int) -> None:
    if len(dataset) < context_length + 1:
        raise DataError(
            f"dataset has {len(dataset)} tokens, fewer than context_length + 1 = {context_length + 1} "
            "needed for one training example"
        )


def _to_device(x: np.ndarray, device: str | torch.device) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.int64))
    if torch.device(device).type == "cuda":  # pinned host memory lets the copy overlap compute
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def get_batch(
    dataset: npt.NDArray,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at uniformly random starts: ``x`` ``(B, T)`` and ``y = x`` shifted by one.

    ``generator`` (a CPU ``torch.Generator``) makes the sequence of batches reproducible and
    resumable: its state is the data position stored in checkpoints.
    """
    _check_length(dataset, context_length)
    starts = torch.randint(0, len(dataset) - context_length, (batch_size,), generator=generator).numpy()
    idx = starts[:, None] + np.arange(context_length + 1)  # (B, T + 1)
    window = np.asarray(dataset[idx])
    return _to_device(window[:, :-1], device), _to_device(window[:, 1:], device)


def eval_batches(
    dataset: npt.NDArray, batch_size: int, context_length: int, max_batches: int, device: str | torch.device
):
    """A fixed validation set: up to ``max_batches`` batches of non-overlapping windows spread evenly
    over the whole file (the same windows at every evaluation, so losses are comparable)."""
    _check_length(dataset, context_length)
    n_windows = (len(dataset) - 1) // context_length
    n_use = min(n_windows, max_batches * batch_size)
    if n_use >= batch_size:  # full batches only: one shape, so a compiled model never recompiles for the tail
        n_use -= n_use % batch_size
    starts = (np.linspace(0, n_windows - 1, n_use).astype(np.int64)) * context_length
    for i in range(0, n_use, batch_size):
        idx = starts[i:i + batch_size, None] + np.arange(context_length + 1)
        window = np.asarray(dataset[idx])
        yield _to_device(window[:, :-1], device), _to_device(window[:, 1:], device)


def num_windows(n_tokens: int, context_length: int) -> int:
    """How many windows of `file_windows` fit in ``n_tokens`` tokens."""
    return (n_tokens - 1) // context_length


def file_windows(tokens: npt.NDArray, context_length: int, batch_size: int, device: str | torch.device,
                 max_tokens: int | None = None):
    """``(x, y)`` batches ``(B, T)`` of consecutive windows over the first ``max_tokens`` tokens (all by
    default): window k is ``tokens[kT : kT + T + 1]``, overlapping the next by one token, so every token
    after the first is predicted once; the last batch may be smaller, a tail shorter than a window is
    left out."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    n_windows = num_windows(n, context_length)
    if n_windows == 0:
        raise DataError(f"{n} tokens are fewer than one window (context_length + 1 = {context_length + 1})")
    offsets = np.arange(context_length + 1)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * context_length
        window = np.asarray(tokens[starts[:, None] + offsets])
        yield _to_device(window[:, :-1], device), _to_device(window[:, 1:], device)
