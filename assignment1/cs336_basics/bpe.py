"""Byte-level BPE training (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al. 2019).

``train_bpe(path, vocab_size, special_tokens)`` returns ``(vocab, merges)``:

1. Pre-tokenization, in parallel: the file is cut at safe boundaries (special tokens, or newlines
   that no pre-token spans; see ``pretokenize.chunk_boundaries``); worker processes count the
   pre-tokens of each chunk with the GPT-2 regex and the parent sums the counts. Memory grows with
   the number of distinct pre-tokens, not with the file size (each worker reads pieces of a few MB).
2. Merges: every distinct pre-token is a list of token ids with a count. Pair counts are kept
   incrementally: merging ``(a, b)`` visits only the words that contain it (an index pair -> words)
   and adjusts the counts of the neighbouring pairs. The most frequent pair comes from a heap with
   lazy deletion: counts of existing pairs only ever go down, so a popped entry whose stored count
   is stale is pushed back with its current count; a popped entry whose count is current is the
   true maximum. Ties go to the lexicographically greater ``(bytes_a, bytes_b)``.

The vocabulary maps ids ``0..k-1`` to the ``k`` special tokens, then the 256 single bytes, then one
token per merge in creation order.

CLI: ``cs336-basics train-tokenizer --input F --vocab-size N --special-token S --out DIR``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence

from tqdm import tqdm

from cs336_basics.pretokenize import (
    PAT,
    InputError,
    check_encoding,
    check_input_file,
    check_special_tokens,
    chunk_boundaries,
    iter_pieces,
    special_pattern,
    split_on_special,
)


# ----------------------------------------------------------------------------- pre-tokenization
def _count_range(args: tuple) -> tuple[dict[str, int], int]:
    """Worker: pre-token counts of the byte range ``[start, end)`` of the file."""
    path, start, end, special_tokens, encoding = args
    special_re = special_pattern(special_tokens)
    counts: Counter[str] = Counter()
    for piece in iter_pieces(path, start, end, special_tokens, encoding):
        for text, is_special in split_on_special(piece, special_re):
            if not is_special:
                counts.update(PAT.findall(text))  # Counter.update(list) counts in C
    return dict(counts), end - start


def count_pretokens(
    path: str | os.PathLike,
    special_tokens: Sequence[str] = (),
    *,
    num_workers: int | None = None,
    encoding: str = "utf-8",
    chunk_bytes: int | None = None,
    progress: bool = True,
) -> Counter[str]:
    """Counts of every pre-token of the file (special tokens removed, never split across)."""
    size = os.path.getsize(path)
    num_workers = num_workers or os.cpu_count() or 1
    if chunk_bytes is None:  # ~4 chunks per worker for load balance, at most 64 MB each
        chunk_bytes = min(max(size // (4 * num_workers) + 1, 1 << 20), 1 << 26)
    bounds = chunk_boundaries(path, chunk_bytes, special_tokens, encoding)
    tasks = [
        (str(path), s, e, list(special_tokens), encoding) for s, e in itertools.pairwise(bounds)
    ]
    total: Counter[str] = Counter()
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="pre-tokenize", disable=not progress)
    if num_workers == 1 or len(tasks) == 1:
        results = map(_count_range, tasks)
        pool = None
    else:
        # fork: workers start in milliseconds and only import what the parent already has
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(min(num_workers, len(tasks)))
        results = pool.imap_unordered(_count_range, tasks)
    try:
        for counts, nbytes in results:
            if total:
                total.update(counts)
            else:
                total = Counter(counts)
            bar.update(nbytes)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return total


# ----------------------------------------------------------------------------- merges
def _desc_key(b: bytes) -> tuple[int, ...]:
    """Key whose ascending order is the *descending* lexicographic order of ``b``.

    Each byte x becomes 255 - x and a terminator 256 (above any byte) ends the key, so that a
    proper prefix (lexicographically smaller) gets the larger key. Lets ``heapq`` (a min-heap)
    pop the lexicographically greatest pair among equal counts.
    """
    return tuple(255 - x for x in b) + (256,)


def merge_words(
    words: list[list[int]],
    counts: list[int],
    vocab: list[bytes],
    num_merges: int,
    progress: bool = True,
) -> list[tuple[int, int]]:
    """Run up to ``num_merges`` BPE merges over ``words`` (lists of ids into ``vocab``, modified in
    place; ``vocab`` grows by one token per merge). Returns the merged id pairs in order."""
    K = len(vocab) + num_merges  # pair (a, b) is stored as the int a * K + b: cheaper than a tuple
    pair_count: dict[int, int] = {}
    where: dict[int, list[int]] = {}  # pair -> words that contain (or once contained) it
    for wi, w in enumerate(words):
        c = counts[wi]
        for x, y in itertools.pairwise(w):
            k = x * K + y
            pair_count[k] = pair_count.get(k, 0) + c
            lst = where.get(k)
            if lst is None:
                where[k] = [wi]
            else:
                lst.append(wi)
    desc = [_desc_key(b) for b in vocab]
    heap = [(-c, desc[k // K], desc[k % K], k) for k, c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=num_merges, unit="merge", desc="merges", disable=not progress)
    for _ in range(num_merges):
        while heap:  # pop until an entry's stored count is current (lazy deletion)
            negc, da, db, k = heapq.heappop(heap)
            c = pair_count.get(k, 0)
            if c == -negc:
                break
            if c > 0:
                heapq.heappush(heap, (-c, da, db, k))
        else:
            break  # no pair left: every word is a single token
        a, b = divmod(k, K)
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        desc.append(_desc_key(vocab[new]))
        merges.append((a, b))
        del pair_count[k]

        born: set[int] = set()  # pairs that involve ``new``
        for wi in set(where.pop(k)):
            w = words[wi]
            c = counts[wi]
            # Visit each occurrence of ``a`` once, left to right; counting them first means no
            # ValueError has to end the search (exceptions are slow). A merge eats one ``a``, or
            # two when a == b.
            remaining = w.count(a)
            eaten = 2 if a == b else 1
            i = -1
            while remaining > 0:
                i = w.index(a, i + 1)
                if i + 1 < len(w) and w[i + 1] == b:
                    remaining -= eaten
                    if i > 0:
                        left = w[i - 1]
                        old = left * K + a
                        if old != k:
                            pair_count[old] -= c
                        nk = left * K + new
                        pair_count[nk] = pair_count.get(nk, 0) + c
                        born.add(nk)
                        lst = where.get(nk)
                        if lst is None:
                            where[nk] = [wi]
                        else:
                            lst.append(wi)
                    if i + 2 < len(w):
                        right = w[i + 2]
                        old = b * K + right
                        if old != k:
                            pair_count[old] -= c
                        nk = new * K + right
                        pair_count[nk] = pair_count.get(nk, 0) + c
                        born.add(nk)
                        lst = where.get(nk)
                        if lst is None:
                            where[nk] = [wi]
                        else:
                            lst.append(wi)
                    w[i : i + 2] = (new,)
                else:
                    remaining -= 1
        for nk in born:
            c = pair_count[nk]
            if c > 0:
                heapq.heappush(heap, (-c, desc[nk // K], desc[nk % K], nk))
            else:
                del pair_count[nk]
        bar.update(1)
    bar.close()
    return merges


# ----------------------------------------------------------------------------- API
def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str] | None = None,
    *,
    num_workers: int | None = None,
    encoding: str = "utf-8",
    progress: bool = True,
    chunk_bytes: int | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a text file.

    Args:
        input_path: the training text.
        vocab_size: total vocabulary size (special tokens + 256 bytes + merges).
        special_tokens: strings kept whole (hard pre-token boundaries); they enter the vocab first.
        num_workers: pre-tokenization processes (default: all cores).
        encoding: text encoding of the file (``"latin-1"`` etc. for non-UTF-8 files).
        progress: tqdm bars for pre-tokenization (bytes) and merges.
        chunk_bytes: approximate size of the file pieces handed to workers (default: automatic).

    Returns ``(vocab, merges)``: ``vocab`` maps id -> token bytes; ``merges`` lists the merged
    pairs in creation order. Fewer merges are made if the corpus runs out of pairs.
    """
    specials = check_special_tokens(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise InputError(
            f"vocab_size={vocab_size} is too small: it must be at least 256 (bytes) + "
            f"{len(specials)} (special tokens) = {256 + len(specials)}"
        )
    path = check_input_file(input_path)
    check_encoding(encoding)
    t0 = time.perf_counter()
    pretokens = count_pretokens(
        path,
        specials,
        num_workers=num_workers,
        encoding=encoding,
        chunk_bytes=chunk_bytes,
        progress=progress,
    )
    t1 = time.perf_counter()
    words = [list(s.encode("utf-8")) for s in pretokens]
    counts = list(pretokens.values())
    del pretokens
    vocab_list = [bytes([i]) for i in range(256)]
    merged = merge_words(words, counts, vocab_list, vocab_size - 256 - len(specials), progress)
    t2 = time.perf_counter()
    if progress:
        print(
            f"train_bpe: {len(words):,} distinct pre-tokens, {len(merged):,} merges; "
            f"pre-tokenize {t1 - t0:.1f}s, merges {t2 - t1:.1f}s",
            file=sys.stderr,
        )
    n = len(specials)
    vocab = {i: s.encode("utf-8") for i, s in enumerate(specials)}
    vocab.update({n + i: tok for i, tok in enumerate(vocab_list)})
    merges = [(vocab_list[a], vocab_list[b]) for a, b in merged]
    return vocab, merges


def cli_main(argv: list[str] | None = None) -> int:
    """``cs336-basics train-tokenizer``: train and save GPT-2 style vocab.json + merges.txt."""
    parser = argparse.ArgumentParser(
        prog="cs336-basics train-tokenizer", description="Train a byte-level BPE tokenizer."
    )
    parser.add_argument("--input", required=True, help="training text file")
    parser.add_argument("--vocab-size", type=int, required=True, help="total vocab size")
    parser.add_argument(
        "--special-token",
        action="append",
        default=[],
        metavar="S",
        help="special token (repeatable), e.g. --special-token '<|endoftext|>'",
    )
    parser.add_argument("--out", required=True, help="output directory (vocab.json, merges.txt)")
    parser.add_argument("--num-workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--encoding", default="utf-8", help="text encoding of --input")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from cs336_basics.tokenizer import Tokenizer

    try:
        vocab, merges = train_bpe(
            args.input,
            args.vocab_size,
            args.special_token,
            num_workers=args.num_workers,
            encoding=args.encoding,
            progress=not args.no_progress,
        )
        Tokenizer(vocab, merges, args.special_token).save(args.out)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved {len(vocab)} tokens ({len(merges)} merges) to {args.out}")
    return 0
