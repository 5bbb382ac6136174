"""Numpy open-addressing hash tables behind ``Tokenizer``'s fast encoding path: look-ups for whole
arrays of keys at once, so that a block of text needs no Python object per word or per pair.

- ``ShortWordTable``: the UTF-8 bytes of a short piece (1-15 bytes) -> its packed token ids,
  optionally in shared memory for the ``tokenize`` CLI's forked workers.
- ``PairRankTable``: (left id, right id) -> merge rank, for the batched numpy BPE of new pre-tokens.
"""

from __future__ import annotations

import mmap
from contextlib import nullcontext
from itertools import compress

import numpy as np


class ShortWordTable:
    """Exact numpy table for the short pieces of the fast path: the UTF-8 bytes of a piece of
    1-15 bytes as two little-endian uint64 (zero-padded; the length in the top byte of the
    second) -> its packed ids, so the pieces of a block are found without a Python object per
    piece (``Tokenizer._encode_block``; the cuts around a piece are exact, so its ids never
    depend on the neighbours). Open addressing with linear probing, load <= 1/2."""

    MAX_BYTES = 15
    _C1, _C2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
    _MASKS = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)
    _NEVER = np.uint64(31 << 56)  # the length field of a piece the table cannot hold

    def __init__(self, max_entries: int, dtype: np.dtype, lock=None):
        """With a ``lock`` (a ``multiprocessing`` lock) the table lives in shared memory: processes
        forked after this see each other's words (the ``tokenize`` CLI's workers learn each new
        word once). ``find`` and ``add`` then hold the lock, and the table is never cleared (an
        entry, once written, never changes); when it is full it stops taking words."""
        self.max_entries, self.lock = max_entries, lock
        bits = max(4, (2 * max_entries - 1).bit_length())  # load <= 1/2
        self.shift, self.mask = np.uint64(64 - bits), (1 << bits) - 1
        store_size = 1 << 16 if lock is None else 4 * max_entries
        itemsize = np.dtype(dtype).itemsize
        mem = mmap.mmap(-1, 8 * (5 << bits) + 16 + itemsize * store_size) if lock else None

        def array(n: int, dt, offset: int) -> np.ndarray:
            if mem is None:
                return np.zeros(n, dtype=dt)
            return np.frombuffer(mem, dtype=dt, count=n, offset=offset)  # MAP_SHARED, zeroed

        n = 1 << bits
        self.k1 = array(n, np.uint64, 0)
        self.k2 = array(n, np.uint64, 8 * n)  # 0: empty slot (a length is >= 1)
        self.off = array(n, np.int64, 16 * n)  # the ids: store[off : off + cnt]
        self.cnt = array(n, np.int64, 24 * n)
        self.owner = array(n, np.int64, 32 * n)  # scratch for ``add``
        self._counts = array(2, np.int64, 40 * n)  # entries, ids in the store
        self.store = array(store_size, dtype, 40 * n + 16)

    @property
    def size(self) -> int:
        return int(self._counts[0])

    def clear(self) -> None:
        assert self.lock is None, "a shared table is never cleared"
        self.k2[:] = 0
        self._counts[:] = 0

    def keys(self, buf: bytes, starts: np.ndarray, lens: np.ndarray):
        """Keys of the pieces ``buf[start : start + len]``; ``buf`` ends in 16 zero bytes.
        A piece of another length gets the key ``(k1, _NEVER)``, which no entry has."""
        win = np.ndarray((len(buf) - 7,), dtype=np.uint64, buffer=buf, strides=(1,))  # unaligned
        k1 = win[starts] & self._MASKS[np.minimum(lens, 8)]
        k2 = win[starts + 8] & self._MASKS[np.clip(lens - 8, 0, 7)]
        fits = (lens >= 1) & (lens <= self.MAX_BYTES)
        k2 = np.where(fits, k2 | (lens.astype(np.uint64) << np.uint64(56)), self._NEVER)
        return k1, k2

    def _home(self, k1, k2) -> np.ndarray:
        return ((((k1 * self._C1) ^ k2) * self._C2) >> self.shift).astype(np.int64)

    def find(self, k1, k2) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        with self.lock or nullcontext():
            return self._find(k1, k2)

    def _find(self, k1, k2) -> np.ndarray:
        slot = self._home(k1, k2)
        out = np.full(k1.size, -1, dtype=np.int64)
        todo = np.arange(k1.size)
        while todo.size:
            s2 = self.k2[slot]
            hit = (s2 == k2) & (self.k1[slot] == k1)
            out[todo[hit]] = slot[hit]
            go_on = ~hit & (s2 != 0)  # occupied by another key: probe the next slot
            todo, slot, k1, k2 = todo[go_on], (slot[go_on] + 1) & self.mask, k1[go_on], k2[go_on]
        return out

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """The ids stored at ``slots`` (all found), concatenated in order."""
        cnt = self.cnt[slots]
        at = np.repeat(self.off[slots] - (np.cumsum(cnt) - cnt), cnt)  # store index - output index
        at += np.arange(at.size)
        return self.store[at]

    def add(self, pieces: list[bytes], ids: list[bytes]) -> bool:
        """Store distinct pieces (1-15 bytes) with their packed ids; False (and nothing stored)
        if that would pass ``max_entries``. Pieces already in the table (put there by another
        process) are skipped."""
        lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        k1, k2 = self.keys(b"".join(pieces) + bytes(16), np.cumsum(lens) - lens, lens)
        cnt = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) // self.store.itemsize
        with self.lock or nullcontext():
            if self.lock is not None:
                new = self._find(k1, k2) < 0
                if not new.all():
                    k1, k2, cnt = k1[new], k2[new], cnt[new]
                    ids = list(compress(ids, new.tolist()))
            return self._add(k1, k2, cnt, np.frombuffer(b"".join(ids), dtype=self.store.dtype))

    def _add(self, k1, k2, cnt, flat) -> bool:
        size, used = self._counts.tolist()
        if size + k1.size > self.max_entries:
            return False
        if used + flat.size > self.store.size:
            if self.lock is not None:
                return False
            grown = np.zeros(2 * (used + flat.size), dtype=self.store.dtype)
            grown[:used] = self.store[:used]
            self.store = grown
        self.store[used : used + flat.size] = flat
        off = used + np.cumsum(cnt) - cnt
        self._counts[:] = size + k1.size, used + flat.size
        slot = self._home(k1, k2)
        while slot.size:  # each free slot takes one of the keys that want it (the one whose
            # index a single scatter left there), the others move one slot on
            free = np.flatnonzero(self.k2[slot] == 0)
            self.owner[slot[free]] = free
            won = free[self.owner[slot[free]] == free]
            at = slot[won]
            self.k1[at], self.off[at], self.cnt[at] = k1[won], off[won], cnt[won]
            self.k2[at] = k2[won]  # last: a set k2 marks the slot as taken
            left = np.ones(slot.size, dtype=bool)
            left[won] = False
            slot, k1, k2 = (slot[left] + 1) & self.mask, k1[left], k2[left]
            off, cnt = off[left], cnt[left]
        return True


class PairRankTable:
    """(left id, right id) -> merge rank for numpy arrays of pairs: an open-addressing hash
    table (linear probing, load <= 1/4, so most look-ups take one probe)."""

    _MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing

    def __init__(self, ranks: dict[tuple[int, int], int], n_ids: int, none: int):
        self.n_ids, self.none = n_ids, none
        bits = max(4, (4 * len(ranks)).bit_length())
        self.shift, self.mask = np.uint64(64 - bits), (1 << bits) - 1
        self.keys = np.full(1 << bits, -1, dtype=np.int64)  # -1: empty slot
        self.ranks = np.full(1 << bits, none, dtype=np.int32)
        pairs = np.array(list(ranks), dtype=np.int64).reshape(-1, 2)
        keys = pairs[:, 0] * n_ids + pairs[:, 1]
        vals = np.fromiter(ranks.values(), dtype=np.int64, count=len(ranks))
        slot = self._home(keys)
        while keys.size:  # place one key per free slot, move the rest one slot on
            free = np.flatnonzero(self.keys[slot] == -1)
            placed = free[np.unique(slot[free], return_index=True)[1]]
            self.keys[slot[placed]], self.ranks[slot[placed]] = keys[placed], vals[placed]
            left = np.ones(keys.size, dtype=bool)
            left[placed] = False
            keys, vals, slot = keys[left], vals[left], (slot[left] + 1) & self.mask
        # every key sits at most ``max_probe`` slots after its home: a look-up is one probe at
        # home plus, for the keys that met another key there, one window (no probing loop,
        # whose tail of tiny rounds cost more than the window)
        used = np.flatnonzero(self.keys != -1)
        max_probe = int(((used - self._home(self.keys[used])) & self.mask).max(initial=0))
        self._window = np.arange(1, max_probe + 1)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * self._MULT) >> self.shift).astype(np.int64)

    def lookup(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Ranks of the pairs (``none`` where there is no merge)."""
        keys = left.astype(np.int64) * self.n_ids + right
        slot = self._home(keys)
        found = self.keys[slot]
        out = self.ranks[slot]  # ``none`` in empty slots
        other = found != keys
        out[other] = self.none
        rest = np.flatnonzero(other & (found != -1))
        if rest.size and self._window.size:
            win = (slot[rest, None] + self._window) & self.mask
            hit = self.keys[win] == keys[rest, None]
            row = np.flatnonzero(hit.any(axis=1))
            out[rest[row]] = self.ranks[win[row, hit[row].argmax(axis=1)]]
        return out
