"""Byte-level BPE ``Tokenizer``: encode / decode / encode_iterable, GPT-2 file format.

Encoding (GPT-2's ``encoder.py``, Radford et al. 2019): split on special tokens (longest first),
split the rest into pre-tokens with the GPT-2 regex, and turn each pre-token's UTF-8 bytes into
tokens by repeatedly merging the adjacent pair with the lowest merge rank. Results are cached per
pre-token (most text re-uses a small set of words); the cache is bounded, so memory stays flat on
any input.

Fast path (same ids, see ``_encode_pieces``): running the GPT-2 regex over all the text costs
more than tiktoken's whole encode, so the text is first cut (in numpy, on its UTF-8 bytes) before
every ASCII whitespace character that follows a non-whitespace one. No pre-token crosses such a
cut, so each piece (``" word"``, ``"\\nThe"``, ``" end."``) has ids of its own, cached by its bytes:
short pieces in a numpy table (``hash_tables.ShortWordTable``), the others in a dict. The regex
runs only on the pieces seen for the first time, all of them joined in one pass. The new
pre-tokens of a cold cache go through BPE together in numpy (``_bpe_batch``), and the caches hold
ids packed as bytes, so a text's ids are joins and numpy gathers (``encode_to_array``).

Files: ``vocab.json`` (token -> id, bytes written through GPT-2's byte <-> printable-unicode map),
``merges.txt`` (``#version: 0.2`` then one ``left right`` pair per line, same map) and
``tokenizer_config.json`` (the special tokens). Hugging Face ``tokenizers`` (``ByteLevelBPE``) and
tiktoken load them; ``Tokenizer.from_dir`` reads them back exactly.
"""

from __future__ import annotations

import heapq
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import pairwise, repeat
from pathlib import Path

import numpy as np
import regex

from cs336_basics.hash_tables import PairRankTable, ShortWordTable
from cs336_basics.pretokenize import (
    PAT,
    InputError,
    check_special_tokens,
    safe_cut_regex,
    special_pattern,
    split_on_special,
)

CONFIG_NAME = "tokenizer_config.json"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map byte -> printable unicode character (so files never hold raw
    control bytes or spaces): printable Latin-1 bytes map to themselves, the other 68 bytes to
    U+0100 onwards in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join([table[b] for b in token])


def str_to_token(s: str) -> bytes:
    inverse = unicode_to_bytes()
    try:
        return bytes([inverse[c] for c in s])
    except KeyError as e:
        raise InputError(
            f"token {s!r} has character {e.args[0]!r} outside GPT-2's byte map"
        ) from None


# Where the fast path cuts a block (``Tokenizer._encode_block``): before an ASCII whitespace byte
# (a whole character of the pattern's \s) whose preceding byte ends a character that is surely
# not \s: an ASCII byte other than \t\n\v\f\r and space, or the last byte of a multi-byte
# character unless it is one a \s character above ASCII ends with (U+0085, U+00A0, U+1680,
# U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000 end in 0x80-0x8a, 0x9f, 0xa0, 0xa8, 0xa9,
# 0xaf; a letter ending in one of them is simply not cut after: fewer cuts are still exact).
_WS_BYTES = b"\t\n\x0b\x0c\r "
_SOLID = np.ones(256, dtype=bool)
_SOLID[list(_WS_BYTES) + list(range(0x80, 0x8B)) + [0x9F, 0xA0, 0xA8, 0xA9, 0xAF]] = False
# Longer pieces (e.g. text without spaces) are encoded but not cached.
_MAX_WORD_BYTES = 64
# From this many new pre-tokens on, BPE runs batched in numpy (``Tokenizer._bpe_batch``).
_BATCH_MIN = 50
_ZERO, _TRUE = np.zeros(1, dtype=np.int64), np.ones(1, dtype=bool)


class Tokenizer:
    """Byte-level BPE tokenizer over a vocab (id -> bytes) and an ordered merge list."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
        *,
        cache_size: int = 1 << 19,
    ):
        self.vocab: dict[int, bytes] = dict(vocab)
        self.merges: list[tuple[bytes, bytes]] = [tuple(m) for m in merges]
        self.special_tokens: list[str] = check_special_tokens(special_tokens)

        # A special token takes the first id holding its bytes; regular tokens map bytes -> the
        # first other id (falling back to the special's id, e.g. for a 1-byte special "!").
        self._special_ids: dict[str, int] = {}
        id_of: dict[bytes, int] = {}
        special_of = {s.encode("utf-8"): s for s in self.special_tokens}
        for i, tok in sorted(self.vocab.items()):
            s = special_of.get(tok)
            if s is not None and s not in self._special_ids:
                self._special_ids[s] = i
            else:
                id_of.setdefault(tok, i)
        for s, i in self._special_ids.items():
            id_of.setdefault(s.encode("utf-8"), i)
        for s in self.special_tokens:  # specials missing from the vocab are appended
            if s not in self._special_ids:
                new = max(self.vocab, default=-1) + 1
                self.vocab[new] = s.encode("utf-8")
                self._special_ids[s] = new
        missing = [b for b in range(256) if bytes([b]) not in id_of]
        if missing:
            raise InputError(
                f"vocab lacks single-byte tokens for {len(missing)} byte values, e.g. {missing[:5]}"
            )
        self._byte_ids = [id_of[bytes([b])] for b in range(256)]

        # (left id, right id) -> merge rank; rank -> id of the merged token
        self._ranks: dict[tuple[int, int], int] = {}
        self._merged: list[int] = []
        for rank, (a, b) in enumerate(self.merges):
            ia, ib, iab = id_of.get(a), id_of.get(b), id_of.get(a + b)
            if ia is None or ib is None or iab is None:
                absent = [t for t, i in ((a, ia), (b, ib), (a + b, iab)) if i is None]
                raise InputError(
                    f"merges and vocab do not match: merge #{rank} {a!r} + {b!r} needs "
                    f"{', '.join(map(repr, absent))}, which the vocab lacks"
                )
            self._ranks.setdefault((ia, ib), rank)
            self._merged.append(iab)
        self._n_ids = max(self.vocab) + 1
        self._pair_table = PairRankTable(self._ranks, self._n_ids, len(self._merged))
        self._merged_np = np.array(self._merged, dtype=np.int32)
        self._byte_ids_np = np.array(self._byte_ids, dtype=np.int32)
        self._special_re = special_pattern(self.special_tokens)
        self._cut_re = safe_cut_regex(self.special_tokens)
        # The caches hold ids packed as bytes in the dtype of the ``tokenize`` CLI's arrays:
        # joining them is a memcpy, an array is ``np.frombuffer`` of the join, and bytes are
        # invisible to the cyclic garbage collector (tuples made it run hundreds of times).
        self._dtype = np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)
        self._special_bytes = {s: self._pack((i,)) for s, i in self._special_ids.items()}
        self._cache: dict[str, bytes] = {}  # pre-token -> packed ids (see ``_pretoken_ids``)
        self._cache_size = cache_size
        self._words: dict[bytes, bytes] = {}  # piece -> packed ids (see ``_encode_pieces``)
        self._words_max = cache_size // 2
        self._short = ShortWordTable(cache_size // 2, self._dtype)
        self.block_chars = 1 << 20  # text per fast-path call (see ``_blocks``)

    # ------------------------------------------------------------------ construction / files
    @classmethod
    def from_files(
        cls,
        vocab_filepath: str | os.PathLike,
        merges_filepath: str | os.PathLike,
        special_tokens: Sequence[str] | None = None,
    ) -> Tokenizer:
        """Load GPT-2 style ``vocab.json`` + ``merges.txt``."""
        specials = check_special_tokens(special_tokens)
        for p in (vocab_filepath, merges_filepath):
            if not Path(p).is_file():
                raise InputError(f"tokenizer file not found: {p}")
        try:
            raw_vocab = json.loads(Path(vocab_filepath).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{vocab_filepath}: not a JSON vocab file ({e})") from None
        if not isinstance(raw_vocab, dict):
            raise InputError(f"{vocab_filepath}: expected a JSON object token -> id")
        vocab: dict[int, bytes] = {}
        for s, i in raw_vocab.items():
            tok = s.encode("utf-8") if s in specials else str_to_token(s)
            if not isinstance(i, int) or i in vocab:
                raise InputError(f"{vocab_filepath}: bad or duplicate id {i!r} for token {s!r}")
            vocab[i] = tok
        merges = []
        lines = Path(merges_filepath).read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip() or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise InputError(f"{merges_filepath}:{n}: expected 'left right', got {line!r}")
            merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
        return cls(vocab, merges, specials)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load what ``save`` wrote (vocab.json, merges.txt, tokenizer_config.json)."""
        d = Path(directory)
        if not d.is_dir():
            raise InputError(f"tokenizer directory not found: {d}")
        config = json.loads((d / CONFIG_NAME).read_text()) if (d / CONFIG_NAME).is_file() else {}
        return cls.from_files(d / "vocab.json", d / "merges.txt", config.get("special_tokens", []))

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        special_ids = set(self._special_ids.values())
        vocab_json: dict[str, int] = {}
        for i, tok in sorted(self.vocab.items()):
            s = tok.decode("utf-8") if i in special_ids else token_to_str(tok)
            if s in vocab_json:
                raise InputError(f"cannot save: token {s!r} has two ids ({vocab_json[s]} and {i})")
            vocab_json[s] = i
        merges_txt = "#version: 0.2\n" + "".join(
            f"{token_to_str(a)} {token_to_str(b)}\n" for a, b in self.merges
        )
        config = {
            "tokenizer_class": "cs336_basics.tokenizer.Tokenizer",
            "special_tokens": self.special_tokens,
            "special_token_ids": {s: self._special_ids[s] for s in self.special_tokens},
            "vocab_size": self.vocab_size,
            "pattern": PAT.pattern,
        }
        _atomic_write(out / "vocab.json", json.dumps(vocab_json, ensure_ascii=False))
        _atomic_write(out / "merges.txt", merges_txt)
        _atomic_write(out / CONFIG_NAME, json.dumps(config, ensure_ascii=False, indent=2))

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    def token_id(self, token: str) -> int:
        """Id of a special token (or of any token given as its text)."""
        if token in self._special_ids:
            return self._special_ids[token]
        ids = self.encode(token)
        if len(ids) != 1:
            raise KeyError(f"{token!r} is not a single token")
        return ids[0]

    @property
    def eos_id(self) -> int | None:
        return self._special_ids.get("<|endoftext|>")

    # ------------------------------------------------------------------ BPE
    def _bpe(self, pretoken: str) -> tuple[int, ...]:
        ids = list(map(self._byte_ids.__getitem__, pretoken.encode("utf-8")))
        if len(ids) == 1:
            return (ids[0],)
        # short words (almost all): the list scan is faster; long ones: O(n log n)
        return tuple(self._bpe_heap(ids) if len(ids) > 64 else self._bpe_scan(ids))

    def _bpe_scan(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the leftmost lowest-rank adjacent pair; ``rs[i]`` is the rank of
        ``(ids[i], ids[i+1])`` and only the two neighbours change per merge, so each merge costs
        one C-level ``min`` over the word.

        Same result as GPT-2's loop (merge every occurrence of the best pair left to right, then
        look again): equal ranks are taken left to right, and a merge only creates pairs that
        contain the new token, whose ranks are larger."""
        get = self._ranks.get
        none = len(self._merged)  # "no merge": above every rank
        rs = list(map(get, pairwise(ids), repeat(none)))
        while rs:
            r = min(rs)
            if r == none:
                break
            i = rs.index(r)
            new = self._merged[r]
            ids[i : i + 2] = (new,)
            del rs[i]
            if i > 0:
                rs[i - 1] = get((ids[i - 1], new), none)
            if i < len(rs):
                rs[i] = get((new, ids[i + 1]), none)
        return ids

    def _bpe_heap(self, ids: list[int]) -> list[int]:
        """Same result as ``_bpe_scan`` in O(n log n): a heap of (rank, position) over a
        linked list of tokens. Equal ranks pop left to right, which is the loop's
        merge-all-occurrences-left-to-right; pairs created by a merge always rank later."""
        ranks = self._ranks
        merged = self._merged
        n = len(ids)
        tok = list(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            r = ranks.get((tok[i], tok[i + 1]))
            if r is not None:
                heap.append((r, i, tok[i], tok[i + 1]))
        heapq.heapify(heap)
        while heap:
            r, i, a, b = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or tok[i] != a or tok[j] != b:
                continue  # stale: a neighbour was merged away since this entry was pushed
            tok[i] = new = merged[r]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[i] < n:
                prv[nxt[i]] = i
            p = prv[i]
            if p >= 0:
                r = ranks.get((tok[p], new))
                if r is not None:
                    heapq.heappush(heap, (r, p, tok[p], new))
            q = nxt[i]
            if q < n:
                r = ranks.get((new, tok[q]))
                if r is not None:
                    heapq.heappush(heap, (r, i, new, tok[q]))
        return [tok[i] for i in range(n) if alive[i]]

    def _bpe_batch(self, pretokens: list[str]) -> list[bytes]:
        """``_bpe`` of many pre-tokens at once, packed (``_pack``), in numpy (for a cold cache: a few times faster
        than one ``_bpe`` call each once there are thousands).

        All words sit in one token array. One round is one step of GPT-2's loop in every word
        at once: find the word's lowest-rank adjacent pair and merge all its occurrences left
        to right (in a run of overlapping occurrences, ``x x x`` for the pair ``(x, x)``, every
        other one from the run's start). Only the pairs next to a merge get new ranks; words
        without a mergeable pair leave the array."""
        encoded = list(map(str.encode, pretokens))
        lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        # int32: half the memory traffic of int64 in every round
        tok = self._byte_ids_np[np.frombuffer(b"".join(encoded), dtype=np.uint8)]
        word = np.repeat(np.arange(len(encoded), dtype=np.int32), lens)  # sorted
        table, none = self._pair_table, len(self._merged)

        def pair_rank(i: np.ndarray) -> np.ndarray:
            """Rank of the pair (i, i + 1) for positions i < len(tok) - 1; none across words."""
            r = table.lookup(tok[i], tok[i + 1])
            r[word[i] != word[i + 1]] = none
            return r

        rank = np.full(tok.size, none, dtype=np.int32)  # rank of the pair starting at each position
        rank[:-1] = pair_rank(np.arange(tok.size - 1))
        done_word, done_tok = [], []
        while tok.size:
            # (np.concatenate, not np.r_: microseconds less per round, ~15 rounds per call)
            first = np.concatenate((_ZERO, np.flatnonzero(word[1:] != word[:-1]) + 1))
            best = np.minimum.reduceat(rank, first)
            sizes = np.empty_like(first)
            sizes[:-1] = first[1:] - first[:-1]
            sizes[-1] = tok.size - first[-1]
            best = np.repeat(best, sizes)
            finished = best == none
            if finished.any():
                done_word.append(word[finished])
                done_tok.append(tok[finished])
                keep = ~finished
                tok, word, rank, best = tok[keep], word[keep], rank[keep], best[keep]
                if not tok.size:
                    break
            pos = np.flatnonzero(rank == best)
            run_start = np.concatenate((_TRUE, pos[1:] - pos[:-1] != 1))
            if not run_start.all():  # overlapping occurrences: every other one of each run
                start_of = pos[run_start][np.cumsum(run_start) - 1]
                pos = pos[(pos - start_of) % 2 == 0]
            tok[pos] = self._merged_np[rank[pos]]
            keep = np.ones(tok.size, dtype=bool)
            keep[pos + 1] = False
            tok, word, rank = tok[keep], word[keep], rank[keep]
            new = pos - np.arange(pos.size)  # where the merged tokens are now
            stale = np.concatenate([new - 1, new])
            stale = stale[(stale >= 0) & (stale < tok.size - 1)]
            rank[stale] = pair_rank(stale)
            rank[-1] = none
        out_word = np.concatenate(done_word)
        order = np.argsort(out_word, kind="stable")  # by word, each word's tokens in order
        flat = np.concatenate(done_tok)[order].astype(self._dtype).tobytes()
        ends = np.cumsum(np.bincount(out_word, minlength=len(encoded))) * self._dtype.itemsize
        starts = np.concatenate((_ZERO, ends[:-1]))
        return list(map(flat.__getitem__, map(slice, starts.tolist(), ends.tolist())))

    def _pack(self, ids: Sequence[int]) -> bytes:
        return np.array(ids, dtype=self._dtype).tobytes()

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self.encode_to_array(text).tolist()

    def encode_to_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a read-only numpy array (uint16, or uint32 when the vocab
        exceeds 65,536): the ``tokenize`` CLI's format, made without a Python int per token."""
        parts: list[bytes] = []
        for piece, is_special in split_on_special(text, self._special_re):
            if is_special:
                parts.append(self._special_bytes[piece])
            else:
                for block in _blocks(piece, self.block_chars):
                    parts.append(self._encode_block(block))
        return np.frombuffer(b"".join(parts), dtype=self._dtype)

    def _encode_block(self, text: str) -> bytes:
        """Packed ids of ``text`` (no special tokens). The text is cut before every ASCII
        whitespace character that follows a character surely not whitespace (``_SOLID``: numpy
        over the UTF-8 bytes); each piece pre-tokenizes on its own exactly as in the text (see
        ``_encode_pieces``), so its ids depend on nothing around it. The pieces that the
        short-word table holds are looked up in numpy; the others go through the word cache, and
        the new ones that fit join the table."""
        raw = text.encode("utf-8", "surrogatepass")
        bounds = piece_bounds(raw)  # piece i is raw[bounds[i]:bounds[i + 1]]
        short = self._short
        k1, k2 = short.keys(raw + bytes(16), bounds[:-1], np.diff(bounds))
        slot = short.find(k1, k2)
        other = np.flatnonzero(slot < 0)  # pieces for the word cache, in order
        if not other.size:
            return short.gather(slot).tobytes()
        slices = map(slice, bounds[other].tolist(), bounds[other + 1].tolist())
        pieces = list(map(raw.__getitem__, slices))
        if other.size == slot.size:
            return b"".join(self._encode_pieces(pieces, True, True))
        # the table pieces' ids, taken before ``_encode_pieces`` may clear a private table
        found = slot >= 0
        cnt = np.empty(slot.size, dtype=np.int64)
        cnt[found] = short.cnt[slot[found]]
        stored = short.gather(slot[found])
        res = self._encode_pieces(pieces, other[0] == 0, other[-1] == slot.size - 1)
        # interleave: the table pieces' ids and the others' from ``res``
        cnt[other] = np.fromiter(map(len, res), dtype=np.int64, count=len(res)) // self._dtype.itemsize
        out = np.empty(int(cnt.sum()), dtype=self._dtype)
        from_store = np.repeat(found, cnt)
        out[from_store] = stored
        out[~from_store] = np.frombuffer(b"".join(res), dtype=self._dtype)
        return out.tobytes()

    def _encode_pieces(self, pieces: list[bytes], head: bool, tail: bool) -> list[bytes]:
        """Packed ids of each piece (UTF-8) of a cut block (``_encode_block``), through the word
        cache (hits in C); the new pieces are encoded together and learned by both caches.
        ``head`` / ``tail``: ``pieces`` holds the block's first / last piece.

        Why the cuts are exact: a cut sits just before a whitespace character W (of the
        pattern's \\s) that follows a character X outside \\s. No pre-token holds both X and W
        (only ``\\s+`` and the optional leading space of `` ?\\p{L}+`` and its siblings hold
        whitespace, and never after another character), the pattern has no lookbehind, and
        its one lookahead, ``(?!\\S)`` after ``\\s+``, only looks past a whitespace character,
        which X is not. So the matches before the cut end exactly at it, and the scan restarts
        there as on a text that starts with W: the text's pre-tokens are the pieces'
        pre-tokens in order. The same holds where two pieces meet in any other order, as long as
        the first ends in such an X and the second starts with such a W: every piece but the
        block's first starts with W, and every piece but its last ends in X. So the new pieces
        joined, the first piece first and the last one last, pre-tokenize as one text, in one
        regex pass."""
        words = self._words
        new = set(pieces).difference(words)  # C-level membership tests
        if not new:
            return list(map(words.__getitem__, pieces))
        lead = [pieces[0]] if head and pieces[0] in new else []
        trail = [pieces[-1]] if tail and pieces[-1] in new and pieces[-1] not in lead else []
        if lead or trail:
            new.difference_update(lead + trail)
        new = lead + list(new) + trail
        ids = self._encode_words(new)
        # only now stored: an exception (e.g. KeyboardInterrupt) in BPE leaves the cache as it was
        words.update(zip(new, ids))
        res = list(map(words.__getitem__, pieces))
        cleared = len(words) > self._words_max
        if cleared:  # bound memory; may pass the bound by this call's new pieces only
            words.clear()
            words.update(zip(new, ids))
        if max(map(len, new)) > _MAX_WORD_BYTES:
            for piece in new:
                if len(piece) > _MAX_WORD_BYTES:
                    del words[piece]
        self._learn_short(new, ids, cleared)
        return res

    def _encode_words(self, pieces: list[bytes]) -> list[bytes]:
        """Packed ids of each piece (UTF-8), through one regex pass over all of them joined (in
        an order that keeps each piece's pre-tokens: see ``_encode_pieces``)."""
        joined = b"".join(pieces)
        text = joined.decode("utf-8", "surrogatepass")
        toks = PAT.findall(text)
        tok_ids = self._pretoken_ids(toks)
        if len(toks) == len(pieces):  # one pre-token each (a piece has at least one)
            return tok_ids
        # the first pre-token of each piece: the one that starts where the piece starts (in
        # characters: bytes minus UTF-8 continuation bytes)
        lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        starts = np.cumsum(lens) - lens
        if len(text) != len(joined):
            b = np.frombuffer(joined, dtype=np.uint8)
            cont = np.zeros(len(joined) + 1, dtype=np.int64)
            np.cumsum((b & 0xC0) == 0x80, out=cont[1:])
            starts -= cont[starts]
        tok_ends = np.cumsum(np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)))
        first = np.searchsorted(tok_ends, starts, "right")
        vals = list(map(tok_ids.__getitem__, first.tolist()))  # right for pieces of one pre-token
        ends = np.append(first[1:], len(toks))
        multi = np.flatnonzero(ends - first > 1)  # pieces of several pre-tokens: join their ids
        spans = map(slice, first[multi].tolist(), ends[multi].tolist())
        joined_ids = map(b"".join, map(tok_ids.__getitem__, spans))
        deque(map(vals.__setitem__, multi.tolist(), joined_ids), 0)  # all in C
        return vals

    def _learn_short(self, new: list[bytes], ids: list[bytes], cleared: bool) -> None:
        """Put the new pieces that fit into the short-word table (a private table is cleared
        together with the word cache, so the two hold the same pieces)."""
        short = self._short
        shared = short.lock is not None
        if cleared and not shared:
            short.clear()
        lens = np.fromiter(map(len, new), dtype=np.int64, count=len(new))
        keep = np.flatnonzero(lens <= short.MAX_BYTES)
        if not keep.size:
            return
        if keep.size < len(new):
            new = list(map(new.__getitem__, keep.tolist()))
            ids = list(map(ids.__getitem__, keep.tolist()))
        if not short.add(new, ids) and not shared:
            short.clear()
            self._words.clear()

    def share_short_words(self, lock) -> None:
        """Move the short-word table into shared memory (empty), so that processes forked
        after this call learn each short word once for all of them (``tokenize_corpus``)."""
        self._short = ShortWordTable(self._short.max_entries, self._dtype, lock)

    def _pretoken_ids(self, toks: list[str]) -> list[bytes]:
        """Packed ids of each pre-token, through the cache (hits in C); the new ones go through
        BPE together (batched in numpy when there are many)."""
        cache = self._cache
        new = set(toks).difference(cache)  # a plain dict: C-level membership tests
        if new:
            if len(cache) + len(new) > self._cache_size:
                cache.clear()  # bound memory; cheaper than LRU bookkeeping on every hit
                new = set(toks)
            new = list(new)
            if len(new) >= _BATCH_MIN:  # long ones (rare) would take many rounds: heap instead
                long = [t for t in new if len(t) > 32] if max(map(len, new)) > 32 else []
                if long:
                    new = [t for t in new if len(t) <= 32]
                cache.update(zip(new, self._bpe_batch(new)))
                new = long
            cache.update(zip(new, map(self._pack, map(self._bpe, new))))
        return list(map(cache.__getitem__, toks))

    def encode_iterable(
        self, iterable: Iterable[str], buffer_chars: int = 1 << 16
    ) -> Iterator[int]:
        """Lazily yield the ids of ``"".join(iterable)`` (e.g. an open file, line by line).

        Text is buffered up to a safe cut (in whitespace, outside any special token; see
        ``pretokenize.safe_cut_regex``), so the ids are exactly those of encoding the whole text at once,
        while memory stays bounded by the buffer, not the input length.
        """
        buf: list[str] = []
        size = 0
        limit = buffer_chars
        for chunk in iterable:
            buf.append(chunk)
            size += len(chunk)
            if size < limit:
                continue
            text = "".join(buf)
            cut = self._last_safe_cut(text)
            if cut <= 0:  # no safe cut yet (e.g. one huge line): wait for twice as much text
                buf, size, limit = [text], len(text), 2 * len(text)
                continue
            yield from self.encode(text[:cut])
            rest = text[cut:]
            buf, size, limit = [rest], len(rest), buffer_chars
        if buf:
            yield from self.encode("".join(buf))

    def _last_safe_cut(self, text: str) -> int:
        """Largest safe cut position in ``text`` (0 if none)."""
        maxlen = max((len(s) for s in self.special_tokens), default=0)
        start = max(0, len(text) - 4096)
        while True:
            cuts = [m.start() for m in self._cut_re.finditer(text, start)]
            for p in reversed(cuts):
                if maxlen == 0 or not self._special_straddles(text, p, maxlen):
                    return p
            if start == 0:
                return 0
            start = max(0, start - 65536)

    def _special_straddles(self, text: str, p: int, maxlen: int) -> bool:
        lo = max(0, p - maxlen + 1)
        window = text[lo : p + maxlen - 1]
        return any(
            m.start() + lo < p < m.end() + lo
            for s in self.special_tokens
            for m in regex.finditer(regex.escape(s), window, overlapped=True)
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (e.g. half a character) becomes U+FFFD."""
        vocab = self.vocab
        try:
            data = b"".join([vocab[i] for i in ids])
        except KeyError as e:
            raise ValueError(
                f"token id {e.args[0]} is not in the vocab (size {self.vocab_size})"
            ) from None
        return data.decode("utf-8", errors="replace")


def piece_bounds(raw: bytes) -> np.ndarray:
    """Byte offsets ``[0, cut, ..., len(raw)]`` of the fast path's pieces of UTF-8 text: a cut
    before every ASCII whitespace byte whose preceding byte is ``_SOLID``."""
    b = np.frombuffer(raw, dtype=np.uint8)
    ws = b == 32
    ws |= (b - np.uint8(9)) < 5  # \t \n \v \f \r (uint8 wraps below 9)
    cuts = np.flatnonzero(ws[1:]) + 1
    cuts = cuts[_SOLID[b[cuts - 1]]]
    bounds = np.empty(cuts.size + 2, dtype=np.int64)
    bounds[0], bounds[1:-1], bounds[-1] = 0, cuts, len(raw)
    return bounds


def _blocks(text: str, size: int) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, each cut just before a " " that follows
    a non-space character (exact: see ``Tokenizer._encode_pieces``). Bounded pieces keep the
    per-call lists small (memory, and young lists the garbage collector re-scans)."""
    start = 0
    pos = size
    while pos < len(text):
        pos = text.find(" ", pos)
        if pos < 0:
            break
        if text[pos - 1].isspace():
            pos += 1
            continue
        yield text[start:pos]
        start, pos = pos, pos + size
    yield text[start:]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
