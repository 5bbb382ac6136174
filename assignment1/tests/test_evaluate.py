"""Whole-file evaluation: the loss over every window against a naive per-window loop, the derived
numbers, the CLI and its bad inputs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cs336_basics.checkpoint import save_checkpoint
from cs336_basics.config import TrainConfig
from cs336_basics.data import file_windows
from cs336_basics.evaluate import cli_main, evaluate_file
from cs336_basics.model import TransformerLM

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _lm():
    torch.manual_seed(0)
    return TransformerLM(64, 16, 32, 2, 4, 64)


def _naive(lm, tokens, t, n):
    """Cross-entropy in float64 of every token after the first of each window kT..kT+T, one window at a time."""
    total, count = 0.0, 0
    for k in range((n - 1) // t):
        w = torch.from_numpy(tokens[k * t:k * t + t + 1].astype(np.int64))
        with torch.no_grad():
            logits = lm(w[None, :-1])[0].double()
        total += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += t
    return total / count, count


def test_every_window_once_against_a_naive_loop():
    lm = _lm()
    tokens = np.random.default_rng(0).integers(0, 64, 16 * 10 + 5).astype(np.uint16)  # 10 windows and a tail
    ref, count = _naive(lm, tokens, 16, len(tokens))
    got = evaluate_file(lm, tokens, 16, batch_size=3, bytes_per_token=2.5)  # 3 + 3 + 3 + 1 windows
    assert got["tokens"] == count == 160 and got["windows"] == 10
    assert got["loss"] == pytest.approx(ref, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(ref / math.log(2) / 2.5, rel=1e-6)
    part = evaluate_file(lm, tokens, 16, batch_size=4, max_tokens=16 * 4 + 1)
    assert part["windows"] == 4 and part["loss"] == pytest.approx(_naive(lm, tokens, 16, 65)[0], rel=1e-6)
    assert "bits_per_byte" not in part and lm.training  # the model's mode is restored
    windows = list(file_windows(tokens, 16, 4, "cpu"))
    assert [len(x) for x, _ in windows] == [4, 4, 2]
    assert torch.equal(windows[0][0][1], torch.from_numpy(tokens[16:32].astype(np.int64)))


def _files(tmp_path, tokens, bytes_per_token=3.0):
    data = tmp_path / "val.bin"
    np.asarray(tokens, dtype=np.uint16).tofile(data)
    Path(f"{data}.json").write_text(json.dumps({"dtype": "uint16", "num_tokens": len(tokens),
                                                "bytes_per_token": bytes_per_token}))
    cfg = TrainConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    save_checkpoint(_lm(), None, 7, tmp_path / "ck.pt", config=cfg.to_dict())
    return str(data), str(tmp_path / "ck.pt")


def test_cli_prints_and_writes_the_result(tmp_path, capsys):
    tokens = np.random.default_rng(1).integers(0, 64, 200)
    data, ck = _files(tmp_path, tokens)
    rc = cli_main(["--checkpoint", ck, "--data", data, "--device", "cpu", "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    ref, count = _naive(_lm(), np.asarray(tokens), 16, 200)
    assert rc == 0 and result["loss"] == pytest.approx(ref, rel=1e-6) and result["tokens"] == count
    assert f"loss {result['loss']:.4f} nats/token" in out and "bits/byte" in out


def test_cli_bad_inputs_are_clear_errors(tmp_path, capsys):
    data, ck = _files(tmp_path, [1, 2, 70] * 20)
    for argv, msg in (([], "token id 70 at position 2"),
                      (["--max-tokens", "2"], "fewer than one window"),
                      (["--batch-size", "0"], "--batch-size must be >= 1"),
                      (["--device", "gpu"], "unknown device")):
        assert cli_main(["--checkpoint", ck, "--data", data, "--device", "cpu", *argv]) == 2
        assert msg in capsys.readouterr().err, msg
    assert cli_main(["--checkpoint", str(tmp_path / "none.pt"), "--data", data, "--device", "cpu"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
