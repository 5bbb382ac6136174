"""Tokenizer against tiktoken (and HF tokenizers) built offline from the same GPT-2 files."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import random
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
from cs336_basics.bpe import train_bpe
from cs336_basics.hash_tables import PairRankTable, ShortWordTable
from cs336_basics.tokenizer import _SOLID, _WS_BYTES, Tokenizer, bytes_to_unicode, piece_bounds
from hypothesis import given, settings
from hypothesis import strategies as st

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"
# Encoding every shared text file in full (26 MB) with both tokenizers would take most of the CI
# budget; a prefix of each large file still compares every file for exact equality.
MAX_CHARS_PER_FILE = 400_000


def tiktoken_from_files(vocab_path: Path, merges_path: Path, special_tokens: dict[str, int]):
    """A tiktoken Encoding from GPT-2 style files: mergeable ranks = ids of the byte tokens."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    ranks = {bytes(decoder[c] for c in s): i for s, i in vocab.items() if s not in special_tokens}
    return tiktoken.Encoding(
        name="gpt2-offline", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens=special_tokens
    )


@pytest.fixture(scope="session")
def gpt2_dir(shared_data) -> Path:
    return shared_data / "tokenizers" / "gpt2"


@pytest.fixture(scope="session")
def ours(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT])


@pytest.fixture(scope="session")
def reference(gpt2_dir):
    return tiktoken_from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", {EOT: 50256})


def _text_files(shared_data: Path) -> list[Path]:
    return sorted(p for p in (shared_data / "text").rglob("*") if p.is_file())


def _read_any(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # the two documented Latin-1 files (and a few others)
        return data.decode("latin-1")


def test_matches_tiktoken_on_every_shared_text_file(shared_data, ours, reference):
    files = _text_files(shared_data)
    assert len(files) >= 40
    for path in files:
        text = _read_any(path)[:MAX_CHARS_PER_FILE]
        ids = ours.encode(text)
        assert ids == reference.encode(text, allowed_special="all"), path.name
        assert ours.decode(ids) == text, path.name
    # and once with documents joined by the special token
    docs = EOT.join(_read_any(p)[:2000] for p in files)
    assert ours.encode(docs) == reference.encode(docs, allowed_special="all")
    assert ours.encode(docs).count(50256) >= len(files) - 1


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # no lone surrogates


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, min_size=1, max_size=4), st.booleans())
def test_matches_tiktoken_on_hypothesis_text(ours, reference, parts, with_eot):
    text = (EOT if with_eot else "").join(parts)
    ids = ours.encode(text)
    assert ids == reference.encode(text, allowed_special="all", disallowed_special=())
    assert ours.decode(ids) == text


# ------------------------------------------------------------------ the fast path's cuts
# Characters that stress the cuts before whitespace (Tokenizer._encode_pieces): runs of spaces,
# every other kind of whitespace the pattern's \s knows (and \x1c-\x1f, which str.isspace adds),
# "\r\n", letters and digits outside ASCII (à and ŀ end in bytes that \s characters end in too),
# contraction pieces and punctuation.
_ADVERSARIAL = (
    list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u2028\u202f\u3000")
    + list("aZé中ß1٣²àŀ'sdmtlvre.,!-😀")
    + [" ", "  ", "\r\n", "\n ", " \n", "'s", "'ll", " '", EOT, " " + EOT, EOT + " ", "\n" + EOT]
)
adversarial = st.lists(st.sampled_from(_ADVERSARIAL), max_size=60).map("".join)


def plain_encode(tok: Tokenizer, text: str) -> list[int]:
    """The slow path: special tokens, then the GPT-2 regex over every character, then BPE per
    pre-token (no word cache, no cut at spaces)."""
    ids: list[int] = []
    for part in regex.split(f"({regex.escape(EOT)})", text):
        if part == EOT:
            ids.append(tok.token_id(EOT))
        else:
            for pretoken in regex.findall(GPT2_PAT, part):
                ids.extend(tok._bpe(pretoken))
    return ids


@pytest.fixture(scope="module")
def tiny_cache(gpt2_dir) -> Tokenizer:
    """Word cache of 8 entries (cleared in the middle of most calls) and blocks of 1 char (the
    text is cut at every space ``_blocks`` accepts, one fast-path call per block)."""
    tok = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT])
    tok = Tokenizer(tok.vocab, tok.merges, [EOT], cache_size=16)
    tok.block_chars = 1
    return tok


@pytest.fixture(scope="module")
def ws_tok(tmp_path_factory) -> Tokenizer:
    """Trained on whitespace-heavy text, so runs like "  ", "\\n " or " \\t" are tokens of
    their own: a pre-token boundary misplaced inside whitespace changes the ids (GPT-2 hides
    many such mistakes, having few whitespace merges)."""
    rng = random.Random(0)
    text = "".join(rng.choice(_ADVERSARIAL[:-4]) for _ in range(200_000))
    path = tmp_path_factory.mktemp("ws") / "ws.txt"
    path.write_text(text, encoding="utf-8")
    vocab, merges = train_bpe(path, 700, [EOT], progress=False)
    assert {b"  ", b"\n ", b" \n", b"   "} <= set(vocab.values())
    return Tokenizer(vocab, merges, [EOT])


def _fast_path_cases(ours, tiny_cache, ws_tok, reference, text):
    expected = plain_encode(ours, text)
    assert ours.encode(text) == expected, repr(text)
    array = ours.encode_to_array(text)
    assert array.dtype == np.uint16 and array.tolist() == expected
    assert tiny_cache.encode(text) == expected, repr(text)
    assert reference.encode(text, allowed_special="all") == expected, repr(text)
    assert ws_tok.encode(text) == plain_encode(ws_tok, text), repr(text)


@settings(max_examples=500, deadline=None)
@given(st.lists(adversarial, min_size=1, max_size=4))
def test_fast_path_equals_plain_regex_and_tiktoken(ours, tiny_cache, ws_tok, reference, texts):
    """Several texts through one tokenizer: later ones meet words cached by earlier ones."""
    for text in texts:
        _fast_path_cases(ours, tiny_cache, ws_tok, reference, text)


def test_fast_path_on_spacing_patterns(ours, tiny_cache, ws_tok, reference):
    words = ["the", "don't", "x1", "9", "—", "é", ".", "\t", "\n", "\r\n", "\xa0", "\u3000"]
    seps = [" ", "  ", "   ", "\n ", " \n", "\t ", " \t", "\r\n ", "\xa0 ", " \xa0", "\n\n  "]
    for a, sep, b in itertools.product(words, seps, words):
        for text in (a + sep + b, sep + a + sep + b + sep, f"{a}{sep}{EOT}{sep}{b}"):
            _fast_path_cases(ours, tiny_cache, ws_tok, reference, text)


def test_cut_bytes_match_the_patterns_whitespace():
    """The fast path cuts before the ASCII characters that the regex module's \\s matches, and
    trusts no byte that ends a \\s character as the end of a non-space one."""
    every_char = "".join(map(chr, range(0x110000)))
    ws = regex.findall(r"\s", every_char)
    assert {c for c in ws if c.isascii()} == set(_WS_BYTES.decode())
    for c in ws:
        assert not _SOLID[c.encode("utf-8")[-1]], hex(ord(c))


@settings(max_examples=300, deadline=None)
@given(adversarial, st.randoms())
def test_pieces_pretokenize_alone_and_in_any_order(text, rnd):
    """Each piece between the fast path's cuts has the pre-tokens it has in the text, and the
    pieces joined in another order (the first first, the last last) still keep theirs."""
    raw = text.encode("utf-8")
    bounds = piece_bounds(raw).tolist()
    pieces = [raw[i:j].decode("utf-8") for i, j in itertools.pairwise(bounds)]
    assert "".join(pieces) == text
    per_piece = [regex.findall(GPT2_PAT, p) for p in pieces]
    assert [w for ws in per_piece for w in ws] == regex.findall(GPT2_PAT, text)
    order = list(range(1, len(pieces) - 1))
    rnd.shuffle(order)
    order = [0, *order, len(pieces) - 1] if len(pieces) > 1 else [0]
    joined = "".join(pieces[i] for i in order)
    assert regex.findall(GPT2_PAT, joined) == [w for i in order for w in per_piece[i]]


def test_interrupted_encode_leaves_no_partial_cache_entry(gpt2_dir):
    """An exception while new words are encoded (here from BPE) leaves no partial entry in
    the caches: the next call gives the right ids."""
    tok = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT])
    text = "a few brand new words: zyxwvut qqqqj, and more"
    def failing(pretoken):
        raise KeyboardInterrupt

    tok._bpe = failing
    with pytest.raises(KeyboardInterrupt):
        tok.encode(text)
    assert all(isinstance(v, bytes) and v for v in tok._words.values())
    del tok._bpe
    assert tok.encode(text) == plain_encode(tok, text)


def test_new_words_repeated_in_one_call_share_their_slot(gpt2_dir):
    """A word new to the cache is encoded once per call and every occurrence gets its ids (the
    miss leaves a slot that later occurrences in the same call hit); afterwards the cache holds
    bytes, and long words (not cached) are encoded all the same."""
    tok = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT])
    long_word = "x" * 100
    text = " ".join(["zyxwvut, qqqqj", long_word] * 50) + " zyxwvut,"
    assert tok.encode(text) == plain_encode(tok, text)
    assert all(isinstance(v, bytes) for v in tok._words.values())
    assert b"zyxwvut," in tok._words and long_word.encode() not in tok._words
    assert tok._short.size > 0  # and the short-word table holds the short ones
    assert tok.encode(text) == plain_encode(tok, text)


@settings(max_examples=100, deadline=None)
@given(st.sets(st.binary(min_size=0, max_size=17), max_size=60), st.sets(st.binary(max_size=17)))
def test_short_word_table_is_exact(stored, probes):
    """The numpy short-word table finds exactly the pieces stored in it (1-15 bytes), with
    their ids; a prefix, a piece with trailing zero bytes, or a longer piece is not found."""
    table = ShortWordTable(max_entries=64, dtype=np.dtype(np.uint16))
    stored = sorted(b for b in stored if 1 <= len(b) <= 15)
    ids = [np.arange(i % 3 + 1, dtype=np.uint16).tobytes() + bytes([i, 0]) for i in range(len(stored))]
    if stored:
        table.add(stored, ids)
    pieces = stored + sorted(probes) + [b + b"\0" for b in stored] + [b[:-1] for b in stored]
    lens = np.array([len(b) for b in pieces], dtype=np.int64)
    k1, k2 = table.keys(b"".join(pieces) + bytes(16), np.cumsum(lens) - lens, lens)
    slot = table.find(k1, k2)
    for piece, s in zip(pieces, slot.tolist()):
        if piece in stored:
            want = np.frombuffer(ids[stored.index(piece)], dtype=np.uint16)
            assert s >= 0 and table.store[table.off[s] : table.off[s] + table.cnt[s]].tolist() == want.tolist()
        else:
            assert s == -1, piece


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.tuples(st.integers(0, 60), st.integers(0, 60)), st.integers(0, 999), max_size=300),
       st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=300))
def test_pair_rank_table_equals_dict(ranks, probes):
    """The numpy pair table (one probe, then a window as wide as the longest displacement) gives
    each pair's rank exactly as the dict does, and ``none`` for pairs it does not hold; also on
    crowded tables where keys sit far from home."""
    table = PairRankTable(ranks, 61, 1000)
    pairs = list(ranks) + probes
    left = np.array([a for a, _ in pairs], dtype=np.int32)
    right = np.array([b for _, b in pairs], dtype=np.int32)
    assert table.lookup(left, right).tolist() == [ranks.get(p, 1000) for p in pairs]


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_shared_short_word_table_across_fork(gpt2_dir):
    """After ``share_short_words``, a word learned in a forked child is a table hit in the parent
    (and encodes right); a word both learn is stored once."""
    tok = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT])
    ctx = mp.get_context("fork")
    tok.share_short_words(ctx.Lock())
    text = "xylophonist quokkas, wombats\nand zyzzyvas"
    child = ctx.Process(target=tok.encode, args=(text,))
    child.start()
    child.join()
    assert child.exitcode == 0
    learned = tok._short.size
    assert learned > 0 and not tok._words  # the parent has not seen the words itself
    assert tok.encode(text) == plain_encode(tok, text)
    assert tok._short.size == learned  # nothing added twice


def test_new_words_next_to_table_words(gpt2_dir):
    """In a block of mostly known words, new words go straight into the short-word table;
    pieces too long for it (here two that share their first 15 bytes) must not."""
    tok = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT])
    common = " ".join(["the cat sat on a mat and"] * 20)
    tok.encode(common)
    for text in [
        common + " representation\nTaxing " + common + " representation\nThis is",
        common + " qwertyuiopasdfghjk qwertyuiopasdfghjz zxcv zxcv\n  zxcv, " + common,
    ]:
        assert tok.encode(text) == plain_encode(tok, text)
        assert tok.encode(text) == plain_encode(tok, text)  # again, from the table


def gpt2_merge_loop(tok: Tokenizer, ids: list[int]) -> list[int]:
    """GPT-2's ``encoder.py`` loop, written from the paper's code: find the lowest-rank adjacent
    pair, merge all its occurrences left to right, repeat."""
    while len(ids) > 1:
        ranked = [(tok._ranks[p], p) for p in itertools.pairwise(ids) if p in tok._ranks]
        if not ranked:
            break
        rank, best = min(ranked)
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                out.append(tok._merged[rank])
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return ids


@settings(max_examples=200, deadline=None)
@given(st.text(st.sampled_from(list("ab é\n'sl😀")), min_size=1, max_size=300))
def test_scan_and_heap_merges_equal_gpt2_loop(ours, reference, text):
    """Both merge paths (list scan for short words, heap for long ones) give GPT-2's result."""
    ids = [ours._byte_ids[b] for b in text.encode("utf-8")]
    expected = gpt2_merge_loop(ours, list(ids))
    assert ours._bpe_scan(list(ids)) == expected
    assert ours._bpe_heap(list(ids)) == expected
    assert ours.encode(text) == reference.encode(text)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(st.sampled_from(list("ab é\n'sl😀 ")), min_size=1, max_size=40), max_size=30)
)
def test_batched_bpe_equals_gpt2_loop(ours, words):
    """The numpy BPE over many words at once (used for a cold cache) gives GPT-2's result per
    word, runs of equal tokens ("aaaa", spaces) included."""
    got = ours._bpe_batch(words) if words else []
    assert len(got) == len(words)
    for word, packed in zip(words, got):
        ids = np.frombuffer(packed, dtype=np.uint16).tolist()
        assert ids == gpt2_merge_loop(ours, [ours._byte_ids[b] for b in word.encode()])


def test_long_pretokens(ours, reference):
    for text in [
        " " * 5000,
        "a" * 3000,
        "x" + "\n" * 2000 + "y",
        "https://" + "ab/" * 1000,
        "😀" * 500,
    ]:
        assert ours.encode(text) == reference.encode(text)


def test_overlapping_special_tokens_longest_first(ours, gpt2_dir):
    double = EOT + EOT
    tok = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", [EOT, double])
    ids = tok.encode(f"a{double}b{EOT}c")
    assert ids[1] == tok.token_id(double) and tok.token_id(double) == 50257
    assert ids.count(50256) == 1
    assert tok.decode(ids) == f"a{double}b{EOT}c"
    # without the special token, the same text is plain text
    plain = Tokenizer.from_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt")
    assert 50256 not in plain.encode(EOT)


def test_decode_replaces_invalid_utf8(ours):
    snowman = ours.encode("☃")
    assert len(snowman) > 1  # three bytes, more than one token in GPT-2
    assert ours.decode(snowman[:1]) == "\ufffd"
    assert ours.eos_id == 50256 and ours.vocab_size == 50257


@settings(max_examples=100, deadline=None)
@given(st.lists(texts, max_size=12), st.booleans())
def test_encode_iterable_equals_encode(ours, parts, with_newlines):
    if with_newlines:
        parts = [p + "\n" for p in parts]
    text = "".join(parts)
    assert list(ours.encode_iterable(iter(parts), buffer_chars=8)) == ours.encode(text)


def test_encode_iterable_over_file(ours, shared_data):
    path = shared_data / "text" / "tinystories_valid_head.txt"
    text = path.read_text(encoding="utf-8")[:200_000]
    lines = text.splitlines(keepends=True)
    assert list(ours.encode_iterable(lines, buffer_chars=1000)) == ours.encode(text)


# ------------------------------------------------------------------ our files, HF and tiktoken
@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, shared_data) -> Path:
    out = tmp_path_factory.mktemp("tok")
    vocab, merges = train_bpe(
        shared_data / "text" / "tinystories_valid_head.txt", 600, [EOT], progress=False
    )
    Tokenizer(vocab, merges, [EOT]).save(out)
    return out


def test_save_load_roundtrip(trained_dir):
    tok = Tokenizer.from_dir(trained_dir)
    vocab, merges = tok.vocab, tok.merges
    again = Tokenizer.from_files(trained_dir / "vocab.json", trained_dir / "merges.txt", [EOT])
    assert again.vocab == vocab and again.merges == merges
    assert tok.token_id(EOT) == 0 == tok.eos_id
    assert len(vocab) == 600
    assert (trained_dir / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_gpt2_files_roundtrip(tmp_path, ours, gpt2_dir):
    ours.save(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads(
        (gpt2_dir / "vocab.json").read_text()
    )
    ref_merges = [
        line
        for line in (gpt2_dir / "merges.txt").read_text().splitlines()
        if line and not line.startswith("#version")
    ]
    assert (tmp_path / "merges.txt").read_text().splitlines()[1:] == ref_merges


def test_hf_tokenizers_and_tiktoken_load_what_we_train(trained_dir, shared_data):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    ours = Tokenizer.from_dir(trained_dir)
    bpe = models.BPE.from_file(str(trained_dir / "vocab.json"), str(trained_dir / "merges.txt"))
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT])
    tt = tiktoken_from_files(trained_dir / "vocab.json", trained_dir / "merges.txt", {EOT: 0})

    text = (shared_data / "text" / "tinystories_valid_head.txt").read_text(encoding="utf-8")[
        :50_000
    ]
    text += (
        EOT
        + (shared_data / "text" / "german.txt").read_text(encoding="utf-8")
        + EOT
        + " 123  x\n\n"
    )
    ids = ours.encode(text)
    assert hf.encode(text).ids == ids
    assert tt.encode(text, allowed_special="all") == ids
    assert hf.decode(ids, skip_special_tokens=False) == text == ours.decode(ids)
