"""Encode a text file into a flat token-id array for training (``np.memmap``-ready).

``tokenize_file(tokenizer_dir, input_path, out_path)`` cuts the file at safe boundaries (special
tokens, or whitespace no pre-token spans; ``pretokenize.chunk_boundaries``) and encodes the chunks
in worker processes: uint16 ids when every id fits (vocab <= 65,536), else uint32. A JSON sidecar
``<out>.json`` records dtype, token count and bytes per token.

Workers are forked with the tokenizer loaded and its short-word table in shared memory
(``Tokenizer.share_short_words``): a word one worker has learned is a hit for the others. Each
worker owns a contiguous run of chunks and takes them front to back; one that runs out takes
chunks from the back of the run with the most left (so the work stays balanced and each worker
sees mostly one part of the file: fewer words to learn twice). Workers read their chunks from the
file themselves and append the ids to a part file of their own (``<out>.tmp.<worker>``); only
offsets travel back. The parent copies the parts in file order into ``<out>.tmp``
(``os.copy_file_range``: no copy through Python) and renames it at the end, so a failure never
leaves a half-written output.

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
from contextlib import ExitStack
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Job:
    """What every worker needs (inherited through fork, or pickled once per worker)."""

    tokenizer: Tokenizer
    path: str
    bounds: list[int]  # chunk i is the byte range [bounds[i], bounds[i + 1])
    encoding: str
    dtype: type
    part_prefix: str  # worker k writes ``part_prefix + str(k)``
    runs: object  # shared int array: [front_0, back_0, front_1, back_1, ...], see ``_next_chunk``
    bytes_done: object  # shared counter for the progress bar


_job: _Job | None = None


def _init_worker(job: _Job, in_pool: bool) -> None:
    global _job
    _job = job
    if in_pool:
        # The encode caches hold no reference cycles, so refcounting frees everything a worker
        # drops; the cyclic collector would only re-scan the caches (~10% of a worker's time).
        gc.disable()


def _next_chunk(runs, worker: int) -> int | None:
    """The next chunk for ``worker``: the front of its own run, else the back of the longest
    run left (``runs`` holds each run's [front, back) as two ints); None when all are taken."""
    with runs.get_lock():
        front, back = runs[2 * worker], runs[2 * worker + 1]
        if front < back:
            runs[2 * worker] = front + 1
            return front
        n = len(runs) // 2
        left = [runs[2 * k + 1] - runs[2 * k] for k in range(n)]
        k = max(range(n), key=left.__getitem__)
        if left[k] <= 0:
            return None
        runs[2 * k + 1] -= 1
        return runs[2 * k + 1]


def _work(worker: int) -> list[tuple[int, int, int]]:
    """Encode chunks until none is left; returns (chunk, offset in the part file, bytes)."""
    job = _job
    tok = job.tokenizer
    done = []
    offset = 0
    with open(job.part_prefix + str(worker), "wb") as part:
        while (i := _next_chunk(job.runs, worker)) is not None:
            start, end = job.bounds[i], job.bounds[i + 1]
            nbytes = 0
            for piece in iter_pieces(job.path, start, end, tok.special_tokens, job.encoding):
                ids = tok.encode_to_array(piece).astype(job.dtype, copy=False)
                part.write(ids.data)
                nbytes += ids.nbytes
            done.append((i, offset, nbytes))
            offset += nbytes
            with job.bytes_done.get_lock():
                job.bytes_done.value += end - start
    return done


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst`` (in the kernel where it can)."""
    if hasattr(os, "copy_file_range"):
        while count:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
            if n == 0:
                raise OSError("part file shorter than recorded")
            offset, count = offset + n, count - n
    else:
        src.seek(offset)
        dst.write(src.read(count))


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
        chunk_bytes = min(max(size // (64 * num_workers) + 1, 1 << 17), 1 << 24)
    bounds = chunk_boundaries(path, chunk_bytes, tok.special_tokens, encoding)
    num_chunks = len(bounds) - 1
    num_workers = min(num_workers, num_chunks)
    # worker k's own run of chunks: [k * num_chunks // num_workers, (k + 1) * ... )
    edges = [k * num_chunks // num_workers for k in range(num_workers + 1)]
    runs = mp.Array("q", [e for pair in itertools.pairwise(edges) for e in pair])
    tmp = out.with_name(out.name + ".tmp")
    job = _Job(tok, str(path), bounds, encoding, dtype, str(tmp) + ".", runs, mp.Value("q", 0))
    parts = [Path(job.part_prefix + str(k)) for k in range(num_workers)]

    t0 = time.perf_counter()
    pool = None
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    try:
        if num_workers == 1:
            _init_worker(job, False)
            done = [_work(0)]
        else:
            # fork: workers inherit the loaded tokenizer instead of re-reading the files, and
            # share its short-word table (each new short word is learned once for all)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            if ctx.get_start_method() == "fork":
                tok.share_short_words(ctx.Lock())
            pool = ctx.Pool(num_workers, _init_worker, (job, True))
            result = pool.map_async(_work, range(num_workers))
            while not result.ready():
                result.wait(0.1)
                bar.n = job.bytes_done.value
                bar.refresh()
            done = result.get()  # re-raises a worker's exception
        bar.n = job.bytes_done.value
        bar.refresh()
        # (chunk, worker, offset, bytes) in file order; a worker's consecutive chunks are one
        # range of its part file
        order = sorted((i, k, off, n) for k, chunks in enumerate(done) for i, off, n in chunks)
        assert [i for i, *_ in order] == list(range(num_chunks))
        ranges: list[list[int]] = []
        for _, k, off, n in order:
            if ranges and ranges[-1][0] == k and sum(ranges[-1][1:]) == off:
                ranges[-1][2] += n
            else:
                ranges.append([k, off, n])
        with ExitStack() as stack, open(tmp, "wb") as f:
            files = [stack.enter_context(open(p, "rb")) for p in parts]
            for k, off, n in ranges:
                _copy_range(files[k], f, off, n)
        num_tokens = os.path.getsize(tmp) // np.dtype(dtype).itemsize
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        for p in parts:
            p.unlink(missing_ok=True)
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
