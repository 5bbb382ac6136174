"""Evaluate a checkpoint on a whole token file: loss per token, perplexity, bits per byte.

Training evaluates a fixed sample of validation windows (`train.evaluate`, ``--eval-batches``);
this scores every token of the file once. The file is cut into consecutive windows of
``context_length + 1`` tokens that overlap by one (window k covers tokens ``kT … kT + T``), so every
token after the first is predicted from up to ``T`` tokens before it, in windows that start at position
0 as in training; a tail shorter than a window is left out. Bits per byte divide by the file's bytes
per token (its ``.json`` sidecar, written by ``cs336-basics tokenize``): a measure that does not depend
on the tokenizer.

    cs336-basics evaluate --checkpoint runs/ts17m/checkpoint.pt --data data/ts_valid.bin
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import numpy.typing as npt
import torch
from torch import nn

from cs336_basics.checkpoint import CheckpointError
from cs336_basics.data import (
    check_token_range,
    file_windows,
    load_tokens,
    num_windows,
    read_sidecar,
)


@torch.no_grad()
def evaluate_file(model: nn.Module, tokens: npt.NDArray, context_length: int, batch_size: int = 32,
                  device: str | torch.device = "cpu", max_tokens: int | None = None, bytes_per_token: float | None = None,
                  autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict:
    """Mean cross-entropy (nats) over every predicted token of `data.file_windows`, with its perplexity,
    and bits per byte when ``bytes_per_token`` is known. ``model(x, targets=y)`` returns the mean loss
    of a batch (a ``TransformerLM``)."""
    device = torch.device(device)
    n_windows = num_windows(len(tokens) if max_tokens is None else min(len(tokens), max_tokens), context_length)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync at the end
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_windows * context_length, unit="tok", unit_scale=True, desc="evaluate", file=sys.stderr)
    try:
        for x, y in file_windows(tokens, context_length, batch_size, device, max_tokens):
            with autocast:
                total += model(x, targets=y).double() * y.numel()
            if bar is not None:
                bar.update(y.numel())
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    n_predicted = n_windows * context_length
    loss = total.item() / n_predicted
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": n_predicted, "windows": n_windows}
    if bytes_per_token:
        result["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return result


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cs336-basics evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `cs336-basics train`")
    p.add_argument("--data", required=True, help="token file (from `cs336-basics tokenize`) to score")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the file")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype on a GPU (CPU: fp32)")
    p.add_argument("--out", default="", help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    from cs336_basics.generate import load_model_from_checkpoint
    from cs336_basics.train import pick_device

    try:
        if args.batch_size < 1 or (args.max_tokens is not None and args.max_tokens < 2):
            raise ValueError("--batch-size must be >= 1 and --max-tokens >= 2")
        device = pick_device(args.device)
        tokens = load_tokens(args.data)
        model = load_model_from_checkpoint(args.checkpoint, device)
        check_token_range(tokens if args.max_tokens is None else tokens[:args.max_tokens], model.vocab_size,
                          name=args.data)
        meta = read_sidecar(args.data)
        use_amp = device.type in ("cuda", "mps") and args.dtype == "bf16"
        result = evaluate_file(model, tokens, model.context_length, args.batch_size, device, args.max_tokens,
                               meta.get("bytes_per_token"), torch.bfloat16 if use_amp else None, progress=True)
    except (CheckpointError, ValueError, OSError) as e:  # DataError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"checkpoint": args.checkpoint, "data": args.data, **result}
    line = (f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.2f}"
            + (f" | {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else "")
            + f" | {result['tokens']:,} tokens in {result['windows']:,} windows of {model.context_length}")
    print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
