"""The benchmark harness on the CPU: well-formed rows/table/JSON/plot, warm-up excluded, OOM
reported, clear errors, the FLOP formula against torch's FLOP counter, checkpointing unchanged."""

import json
import time

import pytest
import torch
from cs336_basics.model import TransformerLM
from cs336_systems import benchmark as B
from cs336_systems.nvtx import annotate_modules, annotated_attention
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core CI machine one thread is steadier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> B.BenchConfig:
    base = {
        "size": "tiny",
        "context_length": 16,
        "batch_size": 2,
        "warmup": 1,
        "steps": 2,
        "device": "cpu",
    }
    return B.BenchConfig(**{**base, **kw})


class SlowStart(nn.Module):
    """A stand-in LM whose first ``slow_calls`` forwards sleep: only warm-up may absorb them."""

    def __init__(self, slow_calls: int, sleep_s: float = 0.25):
        super().__init__()
        self.emb, self.head = nn.Embedding(B.VOCAB_SIZE, 8), nn.Linear(8, B.VOCAB_SIZE)
        self.calls, self.slow_calls, self.sleep_s = 0, slow_calls, sleep_s

    def forward(self, ids):
        self.calls += 1
        if self.calls <= self.slow_calls:
            time.sleep(self.sleep_s)
        return self.head(self.emb(ids))


def test_tiny_train_row_table_json_plot(tmp_path, capsys):
    assert (
        B.cli_main(
            [
                "--size",
                "tiny",
                "--context-length",
                "16",
                "--batch-size",
                "2",
                "--warmup",
                "1",
                "--steps",
                "2",
                "--dtype",
                "fp32",
                "bf16",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "benchmark.json").read_text())
    assert (tmp_path / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    rows = payload["rows"]
    assert [(r["mode"], r["dtype"]) for r in rows] == [("train", "fp32"), ("train", "bf16")]
    for r in rows:
        assert r["status"] == "ok" and r["params"] > 0 and r["tflops"] > 0 and r["mfu"] is None
        assert r["flops_per_step"] == B.step_flops(
            B.BenchConfig(
                **{
                    k: r[k]
                    for k in ("size", "context_length", "batch_size", "mode", "dtype", "device")
                }
            )
        )
        for phase in ("forward", "backward", "optimizer"):
            assert r[f"{phase}_ms"] > 0 and r[f"{phase}_std_ms"] >= 0
        assert r["total_ms"] == pytest.approx(
            r["forward_ms"] + r["backward_ms"] + r["optimizer_ms"], rel=0.05
        )
    assert "flop_formula" in payload["meta"] and payload["meta"]["device"] == "cpu"
    # the markdown table: header, separator, one line per row
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert (
        len(table) == 2 + len(rows)
        and "MFU" in table[0]
        and "| tiny | 16 | train | bf16 |" in table[3]
    )


def test_warmup_is_excluded_from_timing():
    slow = B.run_benchmark(
        tiny(mode="forward", warmup=0, steps=3), model_factory=lambda cfg: SlowStart(1)
    )
    fast = B.run_benchmark(
        tiny(mode="forward", warmup=2, steps=3), model_factory=lambda cfg: SlowStart(2)
    )
    assert slow["status"] == fast["status"] == "ok"
    assert slow["forward_ms"] > 250 / 3  # the sleeping call was measured
    assert fast["forward_ms"] < 100  # both sleeping calls were warm-up
    assert (
        "backward_ms" not in fast and fast["total_ms"] == fast["forward_ms"]
    )  # forward = inference only


def test_oom_is_a_row_not_a_crash(tmp_path):
    def oom_at_build(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    class OOMForward(SlowStart):
        def forward(self, ids):
            raise RuntimeError("CUDA error: out of memory")

    rows = [
        B.run_benchmark(tiny(), model_factory=oom_at_build),
        B.run_benchmark(tiny(), model_factory=lambda cfg: OOMForward(0)),
        B.run_benchmark(tiny(mode="forward"), model_factory=lambda cfg: SlowStart(0)),
    ]
    assert [r["status"] for r in rows] == ["OOM", "OOM", "ok"]
    table = B.results_table(rows)
    assert table.count("| OOM | OOM | OOM | OOM |") == 2
    B.plot_results(rows, tmp_path / "oom.png")


def test_other_errors_are_reported_with_their_message():
    def broken(cfg):
        raise KeyError("no such layer")

    row = B.run_benchmark(tiny(), model_factory=broken)
    assert row["status"].startswith("error: KeyError") and "no such layer" in row["status"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"size": "huge"}, "unknown model size 'huge'"),
        ({"mode": "sideways"}, "unknown mode"),
        ({"dtype": "fp8"}, "unknown dtype"),
        ({"compile": "always"}, "unknown compile mode"),
        ({"attn_backend": "magic"}, "unknown attention backend"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"mode": "forward", "checkpoint": True}, "checkpointing needs a backward"),
    ],
)
def test_bad_config_gives_a_clear_error(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_cli_rejects_unknown_size_and_option(capsys):
    for argv in (["--size", "huge"], ["--dtype", "fp64"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as exc:
            B.cli_main(argv + ["--device", "cpu"])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model size 'huge'; choose from tiny, small, medium, large, xl, 2.7B" in err
    assert "invalid choice: 'fp64'" in err and "unrecognized arguments: --no-such-flag" in err
    assert B.canonical_size("2.7b") == "2.7B"
    if not torch.cuda.is_available():
        assert B.cli_main(["--size", "tiny", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_flop_formula_matches_torch_flop_counter(size):
    s = B.MODEL_SIZES[size]
    cfg = B.BenchConfig(size=size, context_length=32, batch_size=2, device="cpu")
    # on the meta device: shapes only, no memory, no arithmetic
    model = TransformerLM(
        B.VOCAB_SIZE, 32, s.d_model, s.num_layers, s.num_heads, s.d_ff, device="meta"
    )
    ids = torch.zeros(2, 32, dtype=torch.long, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids).sum().backward()
    forward = B.forward_flops(s, 2, 32)
    assert counter.get_total_flops() == 3 * forward  # forward + backward = 3F for matmuls
    assert B.step_flops(cfg) == 3 * forward


def test_activation_checkpointing_and_compile_keep_the_gradients():
    torch.manual_seed(0)
    cfg = tiny(checkpoint=True, compile="blocks", compile_backend="eager")
    reference = B.build_model(cfg)
    wrapped = B.build_model(cfg)
    wrapped.load_state_dict(reference.state_dict())
    wrapped_fn = B.prepare_model(wrapped, cfg)
    ids = torch.randint(0, B.VOCAB_SIZE, (2, 16))
    reference(ids).square().mean().backward()
    wrapped_fn(ids).square().mean().backward()
    for (name, p), q in zip(reference.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert [n for n, _ in reference.named_parameters()] == [
        n for n, _ in wrapped.named_parameters()
    ]
    row = B.run_benchmark(cfg)
    assert row["status"] == "ok" and row["checkpoint"] and row["compile"] == "blocks"
    torch.compiler.reset()


def test_nvtx_hooks_and_annotated_attention_change_nothing():
    from cs336_basics.model import math_attention

    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    torch.testing.assert_close(annotated_attention(q, k, v, True), math_attention(q, k, v, True))
    torch.testing.assert_close(annotated_attention(q, k, v, False), math_attention(q, k, v, False))
    model = B.build_model(tiny(nvtx=True))
    ids = torch.randint(0, B.VOCAB_SIZE, (2, 16))
    before = model(ids)
    handles = annotate_modules(model)
    assert len(handles) == 2 * sum(1 for n, _ in model.named_modules() if n and n.count(".") < 3)
    torch.testing.assert_close(model(ids), before)
    assert B.run_benchmark(tiny(nvtx=True))["status"] == "ok"


def test_profile_writes_trace_and_top_kernels(tmp_path):
    cfg = tiny(mode="forward", steps=1, warmup=0)
    row = B.run_benchmark(cfg, out_dir=tmp_path, profile=True, profile_steps=1)
    assert row["status"] == "ok" and row["top_kernels"]
    assert {"name", "calls", "self_ms", "share"} <= set(row["top_kernels"][0])
    assert json.loads((tmp_path / f"trace_{cfg.tag}.json").read_text())["traceEvents"]
    assert (
        "| self ms | share | calls | kernel |" in (tmp_path / f"kernels_{cfg.tag}.md").read_text()
    )


def test_memory_timeline_replays_the_allocator_trace(tmp_path):
    events = [
        ("alloc", 100, 10),
        ("alloc", 50, 20),
        ("free_requested", 100, 25),
        ("free_completed", 100, 30),
        ("segment_alloc", 4096, 31),
        ("alloc", 10, 40),
    ]
    snapshot = {
        "segments": [],
        "device_traces": [
            [{"action": a, "size": s, "time_us": t, "addr": 0} for a, s, t in events]
        ],
    }
    xs, ys = B.memory_timeline(snapshot, baseline_bytes=1000)
    assert xs == [10, 20, 30, 40] and ys == [1100, 1150, 1050, 1060]
    path = tmp_path / "timeline.png"
    B.plot_memory_timeline(
        snapshot, path, baseline_bytes=1000, marks=[("step 0", 15)], title="test"
    )
    assert path.read_bytes()[:4] == b"\x89PNG"
