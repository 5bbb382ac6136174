"""get_batch / eval batches / token files: shapes, shifting, uniformity and bad inputs."""

import json

import numpy as np
import pytest
import torch
from cs336_basics.data import DataError, eval_batches, get_batch, load_tokens


def test_get_batch_shapes_shift_and_coverage():
    data = np.arange(100)
    g = torch.Generator().manual_seed(0)
    starts = []
    for _ in range(200):
        x, y = get_batch(data, 8, 7, "cpu", generator=g)
        assert x.shape == y.shape == (8, 7) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 6, dtype=torch.int64))
        starts += x[:, 0].tolist()
    assert min(starts) == 0 and max(starts) == 100 - 7 - 1  # every valid start reachable
    counts = np.bincount(starts, minlength=93)
    assert counts.min() > 0.4 * counts.mean()  # roughly uniform


def test_get_batch_reproducible_with_generator():
    data = np.arange(1000, dtype=np.uint16)
    a = get_batch(data, 4, 16, "cpu", generator=torch.Generator().manual_seed(3))
    b = get_batch(data, 4, 16, "cpu", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_data_shorter_than_one_example_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than context_length"):
        get_batch(np.arange(10), 2, 10, "cpu")
    with pytest.raises(DataError, match="fewer than context_length"):
        list(eval_batches(np.arange(5), 2, 8, 4, "cpu"))


def test_eval_batches_fixed_and_non_overlapping():
    data = np.arange(1001)
    batches = list(eval_batches(data, 4, 10, 3, "cpu"))
    assert len(batches) == 3
    again = list(eval_batches(data, 4, 10, 3, "cpu"))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == sorted(set(starts)) and all(s % 10 == 0 for s in starts)
    assert [len(x) for x, _ in eval_batches(data, 8, 10, 100, "cpu")] == [8] * 12  # 100 windows: no ragged tail
    assert [len(x) for x, _ in eval_batches(np.arange(31), 8, 10, 100, "cpu")] == [3]  # fewer than one batch


def _write(path, arr):
    arr.tofile(path)
    (path.parent / (path.name + ".json")).write_text(json.dumps({"dtype": str(arr.dtype), "num_tokens": len(arr)}))


def test_load_tokens_memmap_and_vocab_check(tmp_path):
    p = tmp_path / "train.bin"
    _write(p, np.array([1, 5, 9, 2], dtype=np.uint16))
    toks = load_tokens(p, vocab_size=10)
    assert isinstance(toks, np.memmap) and toks.tolist() == [1, 5, 9, 2]
    with pytest.raises(DataError, match=r"token id 9 at position 2 .*vocab_size=8"):
        load_tokens(p, vocab_size=8)
    with pytest.raises(DataError, match="not found"):
        load_tokens(tmp_path / "missing.bin")
    q = tmp_path / "nosidecar.bin"
    np.arange(4, dtype=np.uint16).tofile(q)
    with pytest.raises(DataError, match="sidecar"):
        load_tokens(q)
    (tmp_path / "nosidecar.bin.json").write_text('{"dtype": "float32"}')
    with pytest.raises(DataError, match="integer dtype"):
        load_tokens(q)
