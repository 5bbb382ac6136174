"""BPE training against a slow, obviously correct reference written here from the definition."""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from pathlib import Path

import regex
from cs336_basics.bpe import count_pretokens, train_bpe
from cs336_basics.pretokenize import chunk_boundaries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Written out again on purpose (not imported): the reference must not share code with the subject.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def reference_pretokens(text: str, special_tokens: list[str]) -> Counter:
    """Pre-token counts: split on special tokens (longest first), then the GPT-2 regex."""
    parts = [text]
    if special_tokens:
        alternation = "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
        parts = re.split(alternation, text)
    return Counter(tok for part in parts for tok in regex.findall(GPT2_PAT, part))


def merge_word(w: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    """Replace every occurrence of ``pair`` in ``w``, left to right."""
    out, i = [], 0
    while i < len(w):
        if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
            out.append(w[i] + w[i + 1])
            i += 2
        else:
            out.append(w[i])
            i += 1
    return tuple(out)


def reference_bpe(text: str, vocab_size: int, special_tokens: list[str]):
    """Textbook BPE: recount every pair each round, merge the most frequent (ties: the
    lexicographically greater pair of bytes) in every word, left to right."""
    words = Counter()
    for tok, c in reference_pretokens(text, special_tokens).items():
        words[tuple(bytes([b]) for b in tok.encode("utf-8"))] += c
    vocab = [s.encode("utf-8") for s in special_tokens] + [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        pairs = defaultdict(int)
        for w, c in words.items():
            for pair in itertools.pairwise(w):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged = Counter()
        for w, c in words.items():
            merged[merge_word(w, best) if best[0] in w else w] += c
        words = merged
    return dict(enumerate(vocab)), merges


SPECIALS = ["<|endoftext|>", "<|pad|>", "<|endoftext|><|endoftext|>"]
# A small alphabet makes repeated pairs, ties and every branch of the GPT-2 pattern likely.
ALPHABET = list("aab  \n\n\t'sdmtl1é😀.,") + ["ll", "ve", "  ", "\r\n", "\u00a0", "\u3000"]


@st.composite
def corpora(draw, with_specials: bool):
    fragment = st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)
    pieces = draw(st.lists(fragment, min_size=1, max_size=8))
    specials = draw(st.sets(st.sampled_from(SPECIALS), min_size=1)) if with_specials else set()
    specials = sorted(specials)
    seps = [draw(st.sampled_from(specials)) if specials else "" for _ in pieces]
    text = "".join(p + s for p, s in zip(pieces, seps))
    return text, specials


def _check_against_reference(tmp_path: Path, text: str, specials: list[str], extra: int, **kw):
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    vocab_size = 256 + len(specials) + extra
    vocab, merges = train_bpe(path, vocab_size, specials, progress=False, **kw)
    ref_vocab, ref_merges = reference_bpe(text, vocab_size, specials)
    assert merges == ref_merges
    assert vocab == ref_vocab


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(corpora(with_specials=False), st.integers(0, 40))
def test_train_bpe_matches_reference_no_specials(tmp_path, corpus, extra):
    text, specials = corpus
    if not text.strip():
        text += "x"
    _check_against_reference(tmp_path, text, specials, extra, num_workers=1)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(corpora(with_specials=True), st.integers(0, 40))
def test_train_bpe_matches_reference_with_specials(tmp_path, corpus, extra):
    text, specials = corpus
    _check_against_reference(tmp_path, text, specials, extra, num_workers=1)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(corpora(with_specials=True), st.integers(0, 30), st.booleans())
def test_train_bpe_parallel_chunks_match_reference(tmp_path, corpus, extra, drop_specials):
    """Tiny chunks in 2 worker processes: cuts at special tokens and safe newlines are exact."""
    text, specials = corpus
    if drop_specials:
        text, specials = text.replace("<|", "\n<"), []
    if not text:
        text = "x"
    _check_against_reference(tmp_path, text, specials, extra, num_workers=2, chunk_bytes=16)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(corpora(with_specials=True), st.integers(1, 64), st.booleans())
def test_chunked_pretoken_counts_are_exact(tmp_path, corpus, chunk, use_specials):
    text, specials = corpus
    if not use_specials:
        specials = []
    if not text:
        text = "x"
    path = tmp_path / "c.txt"
    path.write_bytes(text.encode("utf-8"))
    bounds = chunk_boundaries(path, chunk, specials)
    assert bounds[0] == 0 and bounds[-1] == len(text.encode("utf-8"))
    assert bounds == sorted(set(bounds))
    got = count_pretokens(path, specials, num_workers=1, chunk_bytes=chunk, progress=False)
    assert got == reference_pretokens(text, specials)


def test_chunk_boundaries_cut_at_special_tokens(tmp_path):
    doc = "Once upon a time there was a cat.\n" * 20
    text = "<|endoftext|>".join([doc] * 10)
    path = tmp_path / "c.txt"
    path.write_text(text)
    bounds = chunk_boundaries(path, 1000, ["<|endoftext|>"])
    assert len(bounds) > 3
    data = text.encode()
    for b in bounds[1:-1]:  # every cut is at a special token or between "x\ny"
        assert data[b:].startswith(b"<|endoftext|>") or (data[b - 1 : b] == b"\n")


def test_train_bpe_corpus_en_matches_reference(shared_data):
    path = shared_data / "text" / "corpus.en"
    from cs336_basics.adapters import run_train_bpe  # the spec's test API

    text = path.read_text(encoding="utf-8")
    vocab, merges = run_train_bpe(path, 500, ["<|endoftext|>"], num_workers=2, progress=False)
    ref_vocab, ref_merges = reference_bpe(text, 500, ["<|endoftext|>"])
    assert len(vocab) == 500
    assert merges == ref_merges
    assert vocab == ref_vocab


def test_train_bpe_vocab_layout(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("low lower lowest<|endoftext|>newer wider new" * 3)
    vocab, merges = train_bpe(path, 270, ["<|endoftext|>"], progress=False)
    assert vocab[0] == b"<|endoftext|>"
    assert [vocab[1 + i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert [vocab[257 + i] for i in range(len(merges))] == [a + b for a, b in merges]
    assert len(vocab) == 270
    # special tokens are hard boundaries: nothing merges across them
    assert all(b"<|" not in a + b for a, b in merges)
