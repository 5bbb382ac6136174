"""Pre-tokenization shared by BPE training and encoding.

- ``GPT2_PATTERN``: the GPT-2 regex that splits text into pre-tokens (Radford et al. 2019,
  ``openai/gpt-2/src/encoder.py``); BPE merges never cross a pre-token boundary.
- ``split_on_special``: special tokens are hard boundaries; matched longest first, so
  ``<|endoftext|><|endoftext|>`` wins over ``<|endoftext|>`` when both are special.
- ``chunk_boundaries``: byte offsets that split a file into pieces which pre-tokenize exactly like
  the whole file, so worker processes can each take one piece (training and the ``tokenize`` CLI).
- ``check_input_file`` / ``check_encoding`` / ``decode_bytes`` / ``check_special_tokens``: the
  shared bad-input checks (missing, directory, empty, undecodable, unknown encoding, duplicate
  special tokens), one clear message each.
- ``safe_cut_regex``: where text may be cut without changing any pre-token (``encode_iterable``).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PAT = regex.compile(GPT2_PATTERN)

# Safe cuts: positions where splitting the text changes no pre-token, so pieces can be encoded
# (or counted) separately. With W a whitespace run followed by a non-space character X, the full
# scan always ends a pre-token just before W's last character: ``\s+(?!\S)`` takes W minus its last
# character (the lookahead sees whitespace), and a piece ending there gets the same token
# (the lookahead succeeds at the end of the string). So a cut is safe
#   (1) inside a whitespace run of length >= 2, before its last character ("x\n|\ny", "a |\tb");
#   (2) after a single whitespace character other than " " between non-space characters ("x\n|y")
#       (a lone " " would instead join the next word: " y").
# No pattern alternative spans a whitespace character followed by a non-space one except " ?X",
# excluded by (2). The byte version accepts only ASCII on both sides (never inside a multi-byte
# UTF-8 character, and unambiguous whitespace), requiring a printable character after the cut.
# One more condition: X must not start a special token (then W would end its text segment, and
# ``\s+(?!\S)`` would take all of W), so X's class excludes the specials' first characters.


def safe_cut_regex(special_tokens: Sequence[str] = ()) -> regex.Pattern:
    """Zero-width matches at the safe cuts of a str (see the comment above)."""
    firsts = "".join(regex.escape(c) for c in sorted({t[0] for t in special_tokens}))
    x = rf"[^\s{firsts}]"
    return regex.compile(rf"(?<=\s)(?=\s{x})|(?<=\S[^\S ])(?={x})")


def _safe_cut_bytes(special_tokens: Sequence[str], encoding: str) -> bytes:
    """Byte-regex version of ``safe_cut_regex``: ASCII only on both sides of the cut."""
    firsts = {t.encode(encoding)[0] for t in special_tokens}
    x = (
        b"["
        + b"".join(regex.escape(bytes([c])) for c in range(0x21, 0x7F) if c not in firsts)
        + b"]"
    )
    return rb"(?<=[\t\n\r ])(?=[\t\n\r ]" + x + rb")|(?<=[\x21-\x7e][\t\n\r])(?=" + x + b")"


class InputError(ValueError):
    """Bad user input (path, encoding, vocab size, special tokens, tokenizer files)."""


def special_pattern(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """Regex matching any special token, longest first; None when there are none."""
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return regex.compile("|".join(regex.escape(s) for s in ordered))


def split_on_special(text: str, special_re: regex.Pattern | None) -> Iterator[tuple[str, bool]]:
    """Yield ``(piece, is_special)`` in order; non-special pieces may be empty and are skipped."""
    if special_re is None:
        if text:
            yield text, False
        return
    pos = 0
    for m in special_re.finditer(text):
        if m.start() > pos:
            yield text[pos : m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


def check_special_tokens(special_tokens: Sequence[str] | None) -> list[str]:
    """Validate a special-token list: non-empty strings, no duplicates."""
    tokens = list(special_tokens or [])
    for s in tokens:
        if not isinstance(s, str) or not s:
            raise InputError(f"special tokens must be non-empty strings, got {s!r}")
    dupes = sorted({s for s in tokens if tokens.count(s) > 1})
    if dupes:
        raise InputError(
            f"duplicate special token(s): {', '.join(map(repr, dupes))}; list each once"
        )
    return tokens


def check_input_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path after checking it is an existing, non-empty regular file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"input file not found: {p}")
    if p.is_dir():
        raise InputError(f"input path is a directory, not a text file: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"input file is empty: {p}")
    return p


def check_encoding(encoding: str) -> str:
    """The codec's canonical name, or a clear error for an unknown encoding."""
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise InputError(f"unknown text encoding {encoding!r}") from None


def decode_bytes(data: bytes, encoding: str, path: str | os.PathLike, offset: int = 0) -> str:
    """Decode with a clear error (file, byte offset, the offending bytes, the ``--encoding`` hint)."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        where = offset + e.start
        bad = data[e.start : e.start + 4]
        raise InputError(
            f"{path}: not valid {encoding} text (byte {bad[:1]!r} at offset {where}, "
            f"context {data[max(0, e.start - 20) : e.start + 10]!r}). If the file uses another "
            f"encoding, say so, e.g. --encoding latin-1 (Python: encoding='latin-1')."
        ) from None


def _ascii_compatible(encoding: str) -> bool:
    # Cuts are found on raw bytes; that is only valid where ASCII bytes always mean ASCII
    # characters (UTF-8, Latin-1, cp1252, ...), not for e.g. UTF-16.
    probe = "\n<|>!~az09 "
    try:
        return probe.encode(encoding) == probe.encode("ascii")
    except (UnicodeEncodeError, LookupError):
        return False


def _overlap_free(tokens: Sequence[str]) -> bool:
    """True if no occurrence of one special token can overlap or sit inside another's.

    Then every occurrence found by a plain search is a real match of the left-to-right scan, so
    the start of any occurrence is a safe cut.
    """
    for s in tokens:
        for t in tokens:
            for k in range(1, len(s)):
                if t.startswith(s[k:]) or s[k:].startswith(t):
                    return False
    return True


def _cut_regex(special_tokens: Sequence[str], encoding: str) -> regex.Pattern | None:
    """Byte regex whose match starts are safe cuts; None when no safe cut exists."""
    if not _ascii_compatible(encoding):
        return None
    specials = list(special_tokens)
    alts = []
    if specials and _overlap_free(specials):
        alts += [regex.escape(s.encode(encoding)) for s in sorted(specials, key=len, reverse=True)]
    if not any(c in s for s in specials for c in "\t\n\r "):
        alts.append(_safe_cut_bytes(specials, encoding))
    return regex.compile(b"|".join(alts)) if alts else None


def chunk_boundaries(
    path: str | os.PathLike,
    target_chunk_bytes: int,
    special_tokens: Sequence[str] = (),
    encoding: str = "utf-8",
) -> list[int]:
    """Byte offsets ``[0, ..., size]`` cutting the file into pieces of about ``target_chunk_bytes``.

    A cut is placed at the start of a special token or at a safe cut in whitespace (see the comment
    on safe cuts),
    so that pre-tokenizing the pieces separately gives exactly the pre-tokens of the whole file.
    Where no safe cut is possible (special tokens that overlap each other and contain a newline,
    or an encoding that is not ASCII-compatible) the file is one piece.
    """
    size = os.path.getsize(path)
    cut_re = _cut_regex(special_tokens, encoding)
    if size <= target_chunk_bytes or cut_re is None:
        return [0, size]
    lookahead = max((len(s.encode(encoding)) for s in special_tokens), default=1) + 1
    window = 1 << 16
    bounds = [0]
    with open(path, "rb") as f:
        pos = target_chunk_bytes
        while pos < size:
            # The first cut at or after ``pos``; each read starts 2 bytes early (context for the
            # lookbehind) and reads ``lookahead`` extra bytes (a special token or the lookahead
            # straddling two reads).
            base = max(pos - 2, 0)
            f.seek(base)
            buf = f.read(window + 2 + lookahead)
            m = cut_re.search(buf, pos - base)
            if m is None or m.start() > window + 2:
                pos += window
                continue
            cut = base + m.start()
            if cut >= size:
                break
            bounds.append(cut)
            pos = cut + target_chunk_bytes
    bounds.append(size)
    return bounds


def iter_pieces(
    path: str | os.PathLike,
    start: int,
    end: int,
    special_tokens: Sequence[str] = (),
    encoding: str = "utf-8",
    piece_bytes: int = 1 << 22,
) -> Iterator[str]:
    """Decode the byte range ``[start, end)`` (whose ends are safe cuts) in pieces of about
    ``piece_bytes``, each ending at a safe cut, so a worker never holds more than one piece."""
    cut_re = _cut_regex(special_tokens, encoding)
    with open(path, "rb") as f:
        f.seek(start)
        offset = start  # file offset of the next byte to decode
        carry = b""
        remaining = end - start
        while remaining > 0 or carry:
            data = f.read(min(piece_bytes, remaining)) if remaining > 0 else b""
            remaining -= len(data)
            buf = carry + data
            carry = b""
            if remaining > 0:
                if cut_re is None:
                    carry = buf
                    continue
                # The last safe cut in the tail of the buffer (one that leaves the lookahead of a
                # newline cut, and all of a special token, inside this buffer).
                cut = None
                tail = max(1, len(buf) - (1 << 16))
                for m in cut_re.finditer(buf, tail):
                    if m.start() > 0 and m.end() < len(buf):
                        cut = m.start()
                if cut is None:
                    carry = buf
                    continue
                buf, carry = buf[:cut], buf[cut:]
            yield decode_bytes(buf, encoding, path, offset)
            offset += len(buf)
