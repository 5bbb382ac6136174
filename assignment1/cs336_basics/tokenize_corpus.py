"""Encode a text file into a flat token-id array for training (``np.memmap``-ready).

``tokenize_file(tokenizer_dir, input_path, out_path)`` cuts the file at safe boundaries (special
tokens, or whitespace no pre-token spans; ``pretokenize.chunk_boundaries``), encodes the chunks in
worker processes and writes their ids in file order: uint16 when every id fits (vocab <= 65,536),
else uint32. A JSON sidecar ``<out>.json`` records dtype, token count and bytes per token. The
array is written to ``<out>.tmp`` and renamed at the end, so a failure never leaves a half-written
output.

CLI: ``cs336-basics tokenize --tokenizer DIR --input F --out F.bin``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cs336_basics.pretokenize import (
    InputError,
    check_encoding,
    check_input_file,
    chunk_boundaries,
    iter_pieces,
)
from cs336_basics.tokenizer import Tokenizer

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer, in_pool: bool = False) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    if in_pool:
        # The encode caches hold no reference cycles, so refcounting frees everything a worker
        # drops; the cyclic collector would only re-scan the caches (~10% of a worker's time).
        gc.disable()


def _encode_range(args: tuple) -> tuple[np.ndarray, int]:
    """Worker: ids of the byte range ``[start, end)`` of the file."""
    path, start, end, encoding, dtype = args
    tok = _worker_tokenizer
    parts = [
        tok.encode_to_array(piece).astype(dtype, copy=False)
        for piece in iter_pieces(path, start, end, tok.special_tokens, encoding)
    ]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return ids, end - start


def tokenize_file(
    tokenizer_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    num_workers: int | None = None,
    encoding: str = "utf-8",
    *,
    chunk_bytes: int | None = None,
    progress: bool = True,
) -> dict:
    """Encode ``input_path`` with the tokenizer saved in ``tokenizer_dir``; write ``out_path``
    (flat uint16/uint32 ids) and ``<out_path>.json``. Returns the sidecar dict."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    path = check_input_file(input_path)
    check_encoding(encoding)
    out = Path(out_path)
    if out.is_dir():
        raise InputError(f"output path is a directory: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    size = path.stat().st_size
    num_workers = num_workers or os.cpu_count() or 1
    if chunk_bytes is None:  # many chunks: load balance, steady progress, small worker memory
        chunk_bytes = min(max(size // (8 * num_workers) + 1, 1 << 20), 1 << 24)
    bounds = chunk_boundaries(path, chunk_bytes, tok.special_tokens, encoding)
    tasks = [(str(path), s, e, encoding, dtype) for s, e in itertools.pairwise(bounds)]

    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    num_tokens = 0
    pool = None
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    try:
        if num_workers == 1 or len(tasks) == 1:
            _init_worker(tok)
            results = map(_encode_range, tasks)
        else:
            # fork: workers inherit the loaded tokenizer instead of re-reading the files
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(min(num_workers, len(tasks)), _init_worker, (tok, True))
            results = pool.imap(_encode_range, tasks)  # ordered: written in file order
        with open(tmp, "wb") as f:
            for ids, nbytes in results:
                f.write(ids.tobytes())
                num_tokens += len(ids)
                bar.update(nbytes)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - t0
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_tokens": num_tokens,
        "num_bytes": size,
        "bytes_per_token": size / max(num_tokens, 1),
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special_tokens,
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "input": str(path.resolve()),
        "encoding": encoding,
        "seconds": seconds,
        "mb_per_s": size / 1e6 / seconds if seconds > 0 else None,
    }
    sidecar = out.with_name(out.name + ".json")
    tmp_meta = sidecar.with_name(sidecar.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, sidecar)
    return meta


def cli_main(argv: list[str] | None = None) -> int:
    """``cs336-basics tokenize``: encode a text file into a flat token-id array."""
    parser = argparse.ArgumentParser(
        prog="cs336-basics tokenize", description="Encode a text file into a flat token-id array."
    )
    parser.add_argument("--tokenizer", required=True, help="directory written by train-tokenizer")
    parser.add_argument("--input", required=True, help="text file to encode")
    parser.add_argument("--out", required=True, help="output .bin (a <out>.json sidecar is added)")
    parser.add_argument("--num-workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--encoding", default="utf-8", help="text encoding of --input")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        meta = tokenize_file(
            args.tokenizer,
            args.input,
            args.out,
            args.num_workers,
            args.encoding,
            progress=not args.no_progress,
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['num_tokens']:,} tokens ({meta['dtype']}, "
        f"{meta['bytes_per_token']:.2f} bytes/token) to {args.out} "
        f"in {meta['seconds']:.1f}s ({meta['mb_per_s']:.1f} MB/s)"
    )
    return 0
