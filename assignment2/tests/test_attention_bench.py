"""The attention benchmark on the CPU: every implementation computes the same attention, rows
and table are well formed, OOM (forward or backward) is recorded, unknown names are refused."""

import json

import pytest
import torch
from cs336_systems import attention_bench as A


def test_implementations_agree_with_each_other():
    q, k, v = torch.randn(3, 2, 24, 16, dtype=torch.float64).unbind(0)
    reference = A.sdpa_attention(q, k, v)
    torch.testing.assert_close(A.naive_attention(q, k, v), reference)
    torch.testing.assert_close(A.make_impl("compiled", compile_backend="eager")(q, k, v), reference)
    if A.flash_available():
        qf, kf, vf = (t.float() for t in (q, k, v))
        torch.testing.assert_close(
            A.make_impl("flash")(qf, kf, vf), reference.float(), atol=1e-3, rtol=1e-3
        )
    else:
        with pytest.raises(ValueError, match="flash_attn_mha"):
            A.make_impl("flash")


def test_sweep_rows_table_and_cli(tmp_path, capsys):
    rows = A.run_sweep(
        ["naive", "sdpa"], [16, 32], [8], batch_size=2, device="cpu", warmup=1, steps=2
    )
    assert [(r["impl"], r["seq_len"]) for r in rows] == [
        ("naive", 16),
        ("naive", 32),
        ("sdpa", 16),
        ("sdpa", 32),
    ]
    for r in rows:
        assert (
            r["status"] == "ok"
            and r["forward_ms"] > 0
            and r["backward_ms"] > 0
            and r["head_dim"] == 8
        )
    table = A.results_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| impl | seq | d | fwd ms | bwd ms")
    assert (
        A.cli_main(
            [
                "--impl",
                "naive",
                "--seq-lens",
                "16",
                "--head-dims",
                "8",
                "--batch-size",
                "1",
                "--warmup",
                "0",
                "--steps",
                "1",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "attention_bench.json").read_text())["rows"][0]["status"] == "ok"
    assert (tmp_path / "attention_bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "| naive | 16 | 8 |" in capsys.readouterr().out


def test_oom_in_forward_or_backward_is_recorded():
    def oom_forward(q, k, v):
        raise torch.OutOfMemoryError("CUDA out of memory")

    class OOMBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch.OutOfMemoryError("CUDA out of memory")

    shape = A.AttnShape(batch_size=1, seq_len=8, head_dim=4)
    fwd = A.bench_attention(oom_forward, shape, torch.device("cpu"), warmup=0, steps=1)
    bwd = A.bench_attention(
        lambda q, k, v: OOMBackward.apply(q), shape, torch.device("cpu"), warmup=0, steps=1
    )
    assert fwd["status"] == "OOM" and "forward_ms" not in fwd
    assert bwd["status"] == "OOM (backward)" and bwd["forward_ms"] >= 0 and "backward_ms" not in bwd
    table = A.results_table([{"impl": "x", "seq_len": 8, "head_dim": 4, **fwd}])
    assert "| OOM | OOM |" in table
    with pytest.raises(TypeError):  # anything but OOM is a bug: raised here, an error row in a sweep
        A.bench_attention(lambda q, k, v: None + 1, shape, torch.device("cpu"), warmup=0, steps=1)


def test_unknown_names_are_refused(capsys):
    with pytest.raises(ValueError, match="unknown attention impl 'fast'"):
        A.run_sweep(["fast"], [16], [8], device="cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        A.run_sweep(["naive"], [16], [8], device="cpu", dtype="fp64")
    with pytest.raises(SystemExit):
        A.cli_main(["--impl", "fast", "--device", "cpu"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
