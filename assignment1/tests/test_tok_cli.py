"""The tokenizer CLIs end to end, bad input (one clear message, non-zero exit, no half-written
output) and the memory bound of ``encode_iterable``."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cs336_basics.bpe import train_bpe
from cs336_basics.cli import main as cli
from cs336_basics.pretokenize import InputError
from cs336_basics.tokenize_corpus import _next_chunk, tokenize_file
from cs336_basics.tokenizer import Tokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def small_text(shared_data) -> Path:
    return shared_data / "text" / "tinystories_valid_head.txt"


@pytest.fixture(scope="module")
def latin1(shared_data) -> Path:
    return shared_data / "text" / "nltk" / "webtext_firefox.txt"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, small_text) -> Path:
    out = tmp_path_factory.mktemp("tok")
    assert (
        cli(
            [
                "train-tokenizer",
                "--input",
                str(small_text),
                "--vocab-size",
                "400",
                "--special-token",
                EOT,
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    return out


def test_train_and_tokenize_cli(tok_dir, small_text, tmp_path):
    assert sorted(p.name for p in tok_dir.iterdir()) == [
        "merges.txt",
        "tokenizer_config.json",
        "vocab.json",
    ]
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.vocab_size == 400 and tok.eos_id == 0
    # several workers over small chunks, written in file order
    text_path = tmp_path / "docs.txt"
    text = small_text.read_text(encoding="utf-8")[:300_000]
    docs = text.split("\n\n")
    text_path.write_text(EOT.join(docs), encoding="utf-8")
    out = tmp_path / "ids.bin"
    meta = tokenize_file(tok_dir, text_path, out, num_workers=2, chunk_bytes=20_000, progress=False)
    ids = np.memmap(out, dtype=np.uint16, mode="r")
    expected = tok.encode(text_path.read_text(encoding="utf-8"))
    assert ids.tolist() == expected
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == len(expected)
    assert json.loads((tmp_path / "ids.bin.json").read_text())["num_tokens"] == len(expected)
    assert not list(tmp_path.glob("*.tmp"))
    # the console script through the dispatcher
    out2 = tmp_path / "ids2.bin"
    rc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cs336_basics.cli",
            "tokenize",
            "--tokenizer",
            str(tok_dir),
            "--input",
            str(text_path),
            "--out",
            str(out2),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rc.returncode == 0, rc.stderr
    assert out2.read_bytes() == out.read_bytes()


def test_chunk_schedule_takes_own_run_then_steals_from_the_back():
    """Each worker takes its own run front to back, then the back of the longest run left; every
    chunk is handed out exactly once."""
    runs = mp.Array("q", [0, 4, 4, 10])  # worker 0: chunks 0-3, worker 1: chunks 4-9
    assert [_next_chunk(runs, 0) for _ in range(4)] == [0, 1, 2, 3]
    assert _next_chunk(runs, 1) == 4
    # worker 0 is out of chunks: it takes from the back of worker 1's run
    assert [_next_chunk(runs, 0) for _ in range(2)] == [9, 8]
    assert [_next_chunk(runs, 1) for _ in range(3)] == [5, 6, 7]
    assert _next_chunk(runs, 0) is None and _next_chunk(runs, 1) is None


@pytest.mark.parametrize("num_workers,chunk_bytes", [(1, 5_000), (3, 7_000), (4, 10**9)])
def test_tokenize_file_equals_encode_for_any_split(tok_dir, small_text, tmp_path, num_workers, chunk_bytes):
    """Any number of workers and chunks (including more workers than chunks) gives the ids of
    encoding the whole file, and leaves no part file behind."""
    text_path = tmp_path / "docs.txt"
    docs = small_text.read_text(encoding="utf-8")[:120_000].split("\n\n")
    text_path.write_text(EOT.join(docs), encoding="utf-8")
    out = tmp_path / "ids.bin"
    meta = tokenize_file(
        tok_dir, text_path, out, num_workers=num_workers, chunk_bytes=chunk_bytes, progress=False
    )
    expected = Tokenizer.from_dir(tok_dir).encode(text_path.read_text(encoding="utf-8"))
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    assert meta["num_tokens"] == len(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.txt", "ids.bin", "ids.bin.json"]


def test_uint32_when_vocab_exceeds_uint16(tmp_path, small_text):
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[70_000] = b"<|big|>"
    Tokenizer(vocab, [], ["<|big|>"]).save(tmp_path / "t")
    src = tmp_path / "in.txt"
    src.write_text("ab<|big|>c")
    meta = tokenize_file(tmp_path / "t", src, tmp_path / "o.bin", progress=False)
    assert meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "o.bin", dtype=np.uint32).tolist() == [97, 98, 70_000, 99]


# ------------------------------------------------------------------ bad input
def _train_cli(inp, out, *extra) -> int:
    return cli(
        [
            "train-tokenizer",
            "--input",
            str(inp),
            "--vocab-size",
            "300",
            "--special-token",
            EOT,
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def _tokenize_cli(tok_dir, inp, out, *extra) -> int:
    return cli(
        [
            "tokenize",
            "--tokenizer",
            str(tok_dir),
            "--input",
            str(inp),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def _bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "a_dir").mkdir()
    return {
        "missing": (tmp_path / "nope.txt", "not found"),
        "directory": (tmp_path / "a_dir", "directory"),
        "empty": (tmp_path / "empty.txt", "empty"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "empty"])
def test_bad_input_paths(tmp_path, tok_dir, capsys, case):
    path, message = _bad_paths(tmp_path)[case]
    with pytest.raises(InputError, match=message):
        train_bpe(path, 300, [EOT], progress=False)
    out_dir = tmp_path / "out_tok"
    assert _train_cli(path, out_dir) == 2
    assert message in capsys.readouterr().err
    assert not out_dir.exists()
    out_bin = tmp_path / "out.bin"
    assert _tokenize_cli(tok_dir, path, out_bin) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("out.bin*"))


def test_latin1_file_gives_clear_error_and_encoding_option_works(latin1, tok_dir, tmp_path, capsys):
    for kwargs in ({}, {"num_workers": 2, "chunk_bytes": 50_000}):  # in-process and in a worker
        with pytest.raises(InputError, match=r"not valid utf-8.*--encoding latin-1"):
            train_bpe(latin1, 300, [EOT], progress=False, **kwargs)
    out_dir = tmp_path / "tok"
    assert _train_cli(latin1, out_dir) == 2
    err = capsys.readouterr().err
    assert "webtext_firefox.txt" in err and "--encoding" in err and err.count("\n") == 1
    assert not out_dir.exists()
    out_bin = tmp_path / "ids.bin"
    assert _tokenize_cli(tok_dir, latin1, out_bin) == 2
    assert "--encoding" in capsys.readouterr().err
    assert not list(tmp_path.glob("ids.bin*"))
    with pytest.raises(InputError, match="--encoding latin-1"):  # raised inside a worker
        tokenize_file(tok_dir, latin1, out_bin, num_workers=2, chunk_bytes=50_000, progress=False)
    assert not list(tmp_path.glob("ids.bin*"))

    # the way out the message offers
    assert _train_cli(latin1, out_dir, "--encoding", "latin-1") == 0
    trained = Tokenizer.from_dir(out_dir)
    assert trained.vocab_size == 300
    assert _tokenize_cli(tok_dir, latin1, out_bin, "--encoding", "latin-1") == 0
    ids = np.fromfile(out_bin, dtype=np.uint16).tolist()
    text = latin1.read_bytes().decode("latin-1")
    assert Tokenizer.from_dir(tok_dir).decode(ids) == text
    assert "Fahrpläne" in text


def test_vocab_size_too_small(small_text, tmp_path, capsys):
    with pytest.raises(InputError, match="at least 256"):
        train_bpe(small_text, 256, [EOT], progress=False)
    train_bpe(small_text, 257, [EOT], progress=False)  # the smallest valid size
    assert (
        cli(
            [
                "train-tokenizer",
                "--input",
                str(small_text),
                "--vocab-size",
                "100",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_duplicate_special_tokens(small_text, tmp_path, capsys):
    with pytest.raises(InputError, match="duplicate special token"):
        train_bpe(small_text, 300, [EOT, EOT], progress=False)
    with pytest.raises(InputError, match="duplicate special token"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<a>", "<a>"])
    assert _train_cli(small_text, tmp_path / "o", "--special-token", EOT) == 2
    assert "duplicate" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mismatched_vocab_and_merges(tok_dir, shared_data, tmp_path, capsys, small_text):
    gpt2 = shared_data / "tokenizers" / "gpt2"
    with pytest.raises(InputError, match="merges and vocab do not match"):
        Tokenizer.from_files(tok_dir / "vocab.json", gpt2 / "merges.txt")
    bad = tmp_path / "bad_tok"
    bad.mkdir()
    (bad / "vocab.json").write_bytes((tok_dir / "vocab.json").read_bytes())
    (bad / "merges.txt").write_bytes((gpt2 / "merges.txt").read_bytes())
    assert _tokenize_cli(bad, small_text, tmp_path / "ids.bin") == 2
    assert "do not match" in capsys.readouterr().err
    assert not list(tmp_path.glob("ids.bin*"))
    (bad / "merges.txt").write_text("#version: 0.2\nonly_one_part\n")
    with pytest.raises(InputError, match="expected 'left right'"):
        Tokenizer.from_dir(bad)
    (bad / "vocab.json").write_text("not json")
    with pytest.raises(InputError, match="not a JSON vocab"):
        Tokenizer.from_dir(bad)


# ------------------------------------------------------------------ encode_iterable memory
def test_encode_iterable_memory_is_bounded(tmp_path, shared_data):
    """50 MB through ``encode_iterable``: RSS may not grow by more than a fixed 40 MB (holding
    the text would need 50 MB, the list of ids over 90 MB)."""
    gpt2 = shared_data / "tokenizers" / "gpt2"
    tok = Tokenizer.from_files(gpt2 / "vocab.json", gpt2 / "merges.txt", [EOT])
    seed = (shared_data / "text" / "tinystories_valid_head.txt").read_text(encoding="utf-8")
    path = tmp_path / "big.txt"
    with open(path, "w", encoding="utf-8") as f:
        written, i = 0, 0
        while written < 50_000_000:
            block = f"{seed}{EOT}story {i}\n"
            f.write(block)
            written += len(block.encode("utf-8"))
            i += 1
    tok.encode(seed)  # warm the cache so it is part of the baseline
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    n = 0
    with open(path, encoding="utf-8") as f:
        for _ in tok.encode_iterable(f):
            n += 1
    done.set()
    sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    assert n > 10_000_000
    growth_mb = (peak[0] - base) / 2**20
    assert growth_mb < 40, f"RSS grew by {growth_mb:.1f} MB"


def test_unknown_encoding(small_text, tok_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="unknown text encoding"):
        train_bpe(small_text, 300, [EOT], encoding="no-such-codec", progress=False)
    assert _train_cli(small_text, tmp_path / "o", "--encoding", "no-such-codec") == 2
    assert "unknown text encoding" in capsys.readouterr().err
    assert _tokenize_cli(tok_dir, small_text, tmp_path / "ids.bin", "--encoding", "nope") == 2
    assert "unknown text encoding" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("ids.bin*"))
