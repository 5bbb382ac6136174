"""The training loop end to end on CPU: overfitting, exact resume, NaN stop, bad inputs, CLI."""

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cs336_basics import train as T
from cs336_basics.checkpoint import CheckpointError, read_checkpoint
from cs336_basics.config import PRESETS, TrainConfig
from cs336_basics.data import DataError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _tokens(path: Path, arr) -> str:
    arr = np.asarray(arr, dtype=np.uint16)
    arr.tofile(path)
    Path(str(path) + ".json").write_text(json.dumps({"dtype": "uint16", "num_tokens": len(arr)}))
    return str(path)


def _cfg(tmp_path, **kw) -> TrainConfig:
    rng = np.random.default_rng(0)
    if "train_data" not in kw:
        kw["train_data"] = _tokens(tmp_path / "train.bin", rng.integers(0, 32, 4000))
    if "val_data" not in kw:
        kw["val_data"] = _tokens(tmp_path / "val.bin", rng.integers(0, 32, 600))
    base = {"vocab_size": 32, "context_length": 16, "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64,
                "batch_size": 8, "max_steps": 12, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "eval_interval": 4, "eval_batches": 2,
                "checkpoint_interval": 4, "attn_backend": "math", "dtype": "fp32", "out_dir": str(tmp_path / "run"), "device": "cpu"}
    return TrainConfig(**(base | kw))


def _rows(cfg):
    return [json.loads(x) for x in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_overfits_one_batch(tmp_path):
    # a file of exactly context_length + 1 tokens has one window: every batch is the same batch
    data = _tokens(tmp_path / "one.bin", np.random.default_rng(1).integers(0, 32, 17))
    cfg = _cfg(tmp_path, train_data=data, val_data=data, max_steps=80, warmup_steps=5, lr=1e-2, min_lr=1e-2,
               eval_interval=1000, checkpoint_interval=0, batch_size=4)
    result = T.train(cfg)
    assert result["stopped"] == "done"
    assert result["train_loss"] < 0.05 and result["val_loss"] < 0.05
    assert next(r["loss"] for r in _rows(cfg) if "loss" in r) > 3.0  # started near ln(32) = 3.47


def test_resumed_run_gives_exactly_the_same_losses(tmp_path, monkeypatch):
    full = _cfg(tmp_path, out_dir=str(tmp_path / "full"), grad_accum_steps=2)
    T.train(full)
    cut = full.replace(out_dir=str(tmp_path / "cut"))
    calls = {"n": 0}
    real_get_batch = T.get_batch

    def crashing_get_batch(*a, **k):  # dies during step 9 (2 micro-batches per step)
        calls["n"] += 1
        if calls["n"] > 19:
            raise KeyboardInterrupt
        return real_get_batch(*a, **k)

    monkeypatch.setattr(T, "get_batch", crashing_get_batch)
    with pytest.raises(KeyboardInterrupt):
        T.train(cut)
    assert read_checkpoint(Path(cut.out_dir) / "checkpoint.pt")["iteration"] == 8
    monkeypatch.setattr(T, "get_batch", real_get_batch)
    result = T.train(cut.replace(resume="auto"))
    assert result["step"] == 12
    strip = lambda rows: [{k: v for k, v in r.items() if k in ("step", "loss", "val_loss", "lr")} for r in rows]
    assert strip(_rows(cut)) == strip(_rows(full))  # bit-identical losses, no duplicated steps
    a, b = read_checkpoint(Path(full.out_dir) / "checkpoint.pt"), read_checkpoint(Path(cut.out_dir) / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (Path(cut.out_dir) / "loss_curve.png").stat().st_size > 1000


def test_sigint_stops_with_eval_and_checkpoint_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    # Ctrl-C during step 6: that step finishes, step 7 evaluates and checkpoints, the run returns;
    # resumed, it gives the uninterrupted run's losses and weights exactly
    full = _cfg(tmp_path, out_dir=str(tmp_path / "full"))
    T.train(full)
    cut = full.replace(out_dir=str(tmp_path / "cut"))
    calls = {"n": 0}
    real_get_batch = T.get_batch

    def interrupting_get_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # step 6's batch: a real signal, handled at the next bytecode
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_batch(*a, **k)

    monkeypatch.setattr(T, "get_batch", interrupting_get_batch)
    result = T.train(cut)
    assert (result["stopped"], result["signal"], result["step"]) == ("interrupted", "SIGINT", 7)
    assert calls["n"] == 7  # no batch drawn after the signal's step
    assert read_checkpoint(Path(cut.out_dir) / "checkpoint.pt")["iteration"] == 7
    assert _rows(cut)[-1]["step"] == 7 and _rows(cut)[-1]["val_loss"] > 0
    assert "SIGINT received" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back when train returned
    monkeypatch.setattr(T, "get_batch", real_get_batch)
    assert T.train(cut.replace(resume="auto"))["stopped"] == "done"
    losses = lambda cfg: [(r["step"], r["loss"]) for r in _rows(cfg) if "loss" in r]
    assert losses(cut) == losses(full)
    a, b = read_checkpoint(Path(full.out_dir) / "checkpoint.pt"), read_checkpoint(Path(cut.out_dir) / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_nonfinite_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, max_steps=20)
    from cs336_basics import nn_utils

    real_ce, calls = nn_utils.cross_entropy, {"n": 0}  # what the model's loss calls on CPU

    def ce(logits, y):
        calls["n"] += 1
        loss = real_ce(logits, y)
        return loss * float("nan") if calls["n"] > 9 else loss  # eval at 0 (2 batches) + 4 steps + eval at 4

    monkeypatch.setattr(nn_utils, "cross_entropy", ce)
    result = T.train(cfg)
    assert result["stopped"] == "non-finite loss"
    assert "step 5" in result["message"] and "checkpoint.pt (step 4)" in result["message"]
    assert "non-finite training loss at step 5" in capsys.readouterr().err
    assert read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["iteration"] == 4


def test_nonfinite_loss_just_before_a_checkpoint_never_reaches_it(tmp_path, monkeypatch):
    # a logged loss is read back one step late; the eval/checkpoint at step 8 must read step 7's first
    cfg = _cfg(tmp_path, max_steps=20)
    from cs336_basics import nn_utils

    real_ce, calls = nn_utils.cross_entropy, {"n": 0}

    def ce(logits, y):
        calls["n"] += 1  # eval at 0: calls 1-2, steps 0-3: 3-6, eval at 4: 7-8, steps 4-7: 9-12
        loss = real_ce(logits, y)
        return loss * float("nan") if calls["n"] >= 12 else loss

    monkeypatch.setattr(nn_utils, "cross_entropy", ce)
    result = T.train(cfg)
    assert result["stopped"] == "non-finite loss" and "non-finite training loss at step 7" in result["message"]
    assert read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["iteration"] == 4
    assert [r["step"] for r in _rows(cfg) if "loss" in r] == [0, 1, 2, 3, 4, 5, 6]


def test_logged_losses_are_their_steps_and_read_one_step_late(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path, max_steps=6, eval_interval=1000, checkpoint_interval=0, grad_accum_steps=2)
    real_get_batch, batches = T.get_batch, []

    def marking_get_batch(*a, **k):
        batches.append(len(batches))
        print(f"BATCH {len(batches) - 1}")
        return real_get_batch(*a, **k)

    monkeypatch.setattr(T, "get_batch", marking_get_batch)
    T.train(cfg)
    out = [x for x in capsys.readouterr().out.splitlines() if x.startswith("BATCH") or "| loss " in x]
    for s in range(cfg.max_steps - 1):  # step s is logged once step s + 1's batches (2s + 2, 2s + 3) are in
        line = next(i for i, x in enumerate(out) if x.startswith(f"step {s:>6} | loss"))
        assert out.index(f"BATCH {2 * s + 3}") < line

    # the same steps by hand, independently of the loop: the logged losses are exactly theirs
    torch.manual_seed(cfg.seed)
    model = T.build_model(cfg, torch.device("cpu"))
    opt = T.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                  weight_decay=cfg.weight_decay)
    data, rng, want = T.load_tokens(cfg.train_data), torch.Generator().manual_seed(cfg.seed), []
    for step in range(cfg.max_steps):
        for group in opt.param_groups:
            group["lr"] = T.cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        total = 0.0
        for _ in range(cfg.grad_accum_steps):
            x, y = real_get_batch(data, cfg.batch_size // 2, cfg.context_length, "cpu", generator=rng)
            loss = model(x, targets=y) / cfg.grad_accum_steps
            loss.backward()
            total += loss.item()
        T.clip_grad_norm(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        want.append(total)
    got = [r["loss"] for r in _rows(cfg) if "loss" in r]
    assert got == pytest.approx(want, rel=1e-5)


def test_max_minutes_stops_with_eval_and_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, max_steps=100_000, max_minutes=1e-6)
    result = T.train(cfg)
    assert result["stopped"] == "max_minutes" and result["step"] == 1
    assert read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["iteration"] == 1
    assert _rows(cfg)[-1]["val_loss"] > 0


def test_eta_is_the_steps_left_at_the_averaged_logged_rate(tmp_path):
    cfg = _cfg(tmp_path, max_steps=30, eval_interval=7, checkpoint_interval=0)
    T.train(cfg)
    rows = [r for r in _rows(cfg) if "loss" in r]
    assert rows[0]["eta_s"] is None  # the first window holds the start-up
    rate = None
    for r in rows[1:]:  # replayed from the logged tokens/s (rounded there, hence the tolerance)
        steps_per_s = r["tok_s"] / (cfg.batch_size * cfg.context_length)
        rate = steps_per_s if rate is None else T.ETA_SMOOTHING * rate + (1 - T.ETA_SMOOTHING) * steps_per_s
        assert r["eta_s"] == pytest.approx((cfg.max_steps - r["step"] - 1) / rate, rel=1e-3, abs=0.05)
    assert rows[-1]["eta_s"] == 0
    capped = _cfg(tmp_path, max_steps=100_000, max_minutes=0.05, eval_interval=1000, checkpoint_interval=0,
                  out_dir=str(tmp_path / "capped"))
    T.train(capped)
    etas = [(r["wall_s"], r["eta_s"]) for r in _rows(capped) if r.get("eta_s") is not None]
    assert len(etas) > 3 and all(eta <= 3.0 - wall + 0.06 for wall, eta in etas)  # time left (rounded), not 100k steps
    assert [T.duration(s) for s in (4.4, 59.6, 65, 3599, 3600, 11_220)] == ["4s", "1m00s", "1m05s", "59m59s",
                                                                            "1h00m", "3h07m"]


def test_token_ids_beyond_vocab_rejected_before_writing(tmp_path):
    bad = _tokens(tmp_path / "bad.bin", [1, 2, 3] * 20 + [40])
    cfg = _cfg(tmp_path, train_data=bad)
    with pytest.raises(DataError, match="token id 40 at position 60 .*vocab_size=32"):
        T.train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_data_shorter_than_one_batch_rejected_before_writing(tmp_path):
    cfg = _cfg(tmp_path, val_data=_tokens(tmp_path / "short.bin", [1, 2, 3]))
    with pytest.raises(T.TrainingStopped, match="val_data .* 3 tokens: shorter than one training example"):
        T.train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_existing_checkpoint_not_overwritten_and_bad_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, max_steps=4)
    T.train(cfg)
    ck = Path(cfg.out_dir) / "checkpoint.pt"
    before = ck.read_bytes()
    with pytest.raises(T.TrainingStopped, match="exists from an earlier run"):
        T.train(cfg)
    with pytest.raises(CheckpointError, match=r"(?s)does not match the model.*d_model|checkpoint \(32, 32\)"):
        T.train(cfg.replace(d_model=64, resume="auto"))
    assert ck.read_bytes() == before
    broken = tmp_path / "broken.pt"
    broken.write_bytes(before[:100])
    with pytest.raises(CheckpointError, match="corrupted"):
        T.train(cfg.replace(resume=str(broken)))
    assert ck.read_bytes() == before


def test_tokenizer_vocab_mismatch_rejected(tmp_path):
    from cs336_basics.tokenizer import Tokenizer

    vocab = {i: bytes([i]) for i in range(256)} | {256: b"<|endoftext|>"}
    Tokenizer(vocab, [], ["<|endoftext|>"]).save(tmp_path / "tok")
    with pytest.raises(T.TrainingStopped, match="257 tokens but vocab_size=32"):
        T.train(_cfg(tmp_path, tokenizer_dir=str(tmp_path / "tok")))


def test_evaluate_is_the_mean_loss_over_every_validation_window(tmp_path):
    cfg = _cfg(tmp_path, eval_batches=3)
    torch.manual_seed(0)
    model = T.build_model(cfg, torch.device("cpu"))
    got = T.evaluate(model, T.load_tokens(cfg.val_data), cfg, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    losses = []
    with torch.no_grad():
        for x, y in T.eval_batches(T.load_tokens(cfg.val_data), cfg.batch_size, cfg.context_length, 3, "cpu"):
            logits = model(x)
            losses += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") \
                .view(len(x), -1).mean(1).tolist()
    assert len(losses) == 3 * cfg.batch_size
    assert got == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_profile_window_writes_a_trace_and_a_summary(tmp_path, capsys):
    cfg = _cfg(tmp_path, max_steps=16, profile_steps=3, eval_interval=1000, checkpoint_interval=0)
    T.train(cfg)
    rows = _rows(cfg)
    (prof,) = [r for r in rows if "profile" in r]
    summary = prof["profile"]
    assert prof["step"] == T.PROFILE_AFTER + 2 and summary["steps"] == 3
    assert summary["device_busy_ms_per_step"] is None  # CPU: no device kernels, the top CPU ops instead
    assert summary["top"] and all(t["ms_per_step"] >= 0 for t in summary["top"])
    step_ms = [cfg.batch_size * cfg.context_length / r["tok_s"] * 1e3 for r in rows if "tok_s" in r][5:]
    assert min(step_ms) / 3 < summary["wall_ms_per_step"] < 10 * max(step_ms)  # the profiler slows steps a little
    trace = json.loads(Path(summary["trace"]).read_text())
    assert Path(summary["trace"]) == Path(cfg.out_dir) / "trace.json" and trace["traceEvents"]
    assert "profile of steps 10-12:" in capsys.readouterr().out
    # a run that ends inside its window closes the profiler: a later window still works
    T.train(cfg.replace(max_steps=11, out_dir=str(tmp_path / "cut")))
    assert not (tmp_path / "cut" / "trace.json").exists()
    T.train(cfg.replace(out_dir=str(tmp_path / "again")))
    assert (tmp_path / "again" / "trace.json").is_file()
    with pytest.raises(ValueError, match="profile_steps must be >= 0"):
        cfg.replace(profile_steps=-1)


def test_logged_throughput_is_steady_across_evaluations_and_a_profile(tmp_path):
    # one step per window of the loop clock: no spike where an evaluation reads the pending step early,
    # no dip for the eval itself or the profiler's export
    cfg = _cfg(tmp_path, max_steps=24, eval_interval=3, profile_steps=2, checkpoint_interval=0)
    T.train(cfg)
    tok_s = [r["tok_s"] for r in _rows(cfg) if "tok_s" in r][2:]
    median = sorted(tok_s)[len(tok_s) // 2]
    assert all(t < 10 * median for t in tok_s), (median, tok_s)  # the old read-back spiked ~100x per eval
    assert sum(t < median / 3 for t in tok_s) <= 1, (median, tok_s)  # (one slow step of a busy machine is allowed)


def test_auto_attention_backend(tmp_path, monkeypatch):
    import importlib.util

    cfg = _cfg(tmp_path, attn_backend="auto")
    assert T.attn_backend(cfg, torch.device("cpu")) == "sdpa"
    has_flash = importlib.util.find_spec("cs336_systems") is not None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert T.attn_backend(cfg, torch.device("cuda")) == ("flash" if has_flash else "sdpa")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no bf16 MMA
    assert T.attn_backend(cfg, torch.device("cuda")) == "sdpa"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert T.attn_backend(cfg.replace(model_impl="hf-llama"), torch.device("cuda")) == "sdpa"
    assert T.attn_backend(cfg.replace(attn_backend="math"), torch.device("cuda")) == "math"
    assert TrainConfig().attn_backend == "auto"


def test_config_validation_and_presets():
    assert PRESETS["tinystories-17m"].d_model == 512 and PRESETS["tinystories-17m"].d_ff == 1344
    assert PRESETS["tinystories-17m"].num_heads == 16 and PRESETS["tinystories-17m"].vocab_size == 10_000
    for bad, msg in [({"d_model": 30, "num_heads": 4}, "divisible"), ({"batch_size": 10, "grad_accum_steps": 3}, "divisible"),
                     ({"norm": "mid"}, "norm must be one of"), ({"lr": -1.0}, "lr must be"),
                     ({"min_lr": 1.0, "lr": 0.1}, "exceeds")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["tiny"].lr = 1.0  # frozen


def test_cli_tiny_run_writes_everything(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tr, va = _tokens(tmp_path / "tr.bin", rng.integers(0, 512, 3000)), _tokens(tmp_path / "va.bin", rng.integers(0, 512, 500))
    out = tmp_path / "cli"
    rc = T.cli_main(["--preset", "tiny", "--train-data", tr, "--val-data", va, "--max-steps", "6", "--eval-interval",
                     "3", "--out-dir", str(out), "--no-use-rope", "--device", "cpu"])
    assert rc == 0
    assert {"checkpoint.pt", "metrics.jsonl", "config.json", "loss_curve.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["use_rope"] is False
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step") and "| loss " in x]
    assert len(lines) == 6 and all(" | lr " in x and "tok/s" in x and "mfu" in x and "mem" in x and "| eta " in x
                                   for x in lines)
    assert T.cli_main(["--preset", "tiny", "--train-data", tr, "--val-data", va, "--out-dir", str(out)]) == 2
    with pytest.raises(SystemExit):
        T.cli_main(["--preset", "tiny", "--train-data", tr, "--val-data", va, "--num-heads", "5"])


class _FakeWandb:
    """wandb's call surface (init → run.log / run.finish), recording every call."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, row, step):
        assert all(isinstance(v, (int, float)) for v in row.values()), row  # numbers only
        self.logged.append((step, row))

    def finish(self):
        self.finished += 1


def test_wandb_logs_every_row_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg(tmp_path, wandb=True, max_steps=12, profile_steps=1)  # profiles step 10
    T.train(cfg)
    first = fake.inits[0]
    assert first["mode"] == "offline" and first["project"] == "cs336-basics" and first["resume"] == "allow"
    rows = _rows(cfg)
    assert [step for step, _ in fake.logged] == [r["step"] for r in rows] and fake.finished == 1
    train_rows = [r for r in rows if "loss" in r]
    assert [row["loss"] for _, row in fake.logged if "loss" in row] == [r["loss"] for r in train_rows]
    assert all(row.keys() >= {"lr", "tok_s", "grad_norm", "wall_s"} for _, row in fake.logged if "loss" in row)
    assert any("profile/wall_ms_per_step" in row for _, row in fake.logged)  # nested rows flattened
    T.train(cfg.replace(max_steps=16, resume="auto"))
    assert fake.inits[1]["id"] == first["id"] and fake.finished == 2  # the same wandb run goes on
    T.train(cfg.replace(out_dir=str(tmp_path / "other")))
    assert fake.inits[2]["id"] != first["id"]  # a new run, a new id
    assert read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["wandb_id"] == first["id"]


def test_wandb_missing_is_a_clear_error_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = _cfg(tmp_path, wandb=True)
    with pytest.raises(T.TrainingStopped, match=r"pip install 'cs336-basics\[wandb\]'"):
        T.train(cfg)
    assert not Path(cfg.out_dir).exists()


def test_a_device_this_machine_lacks_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name, msg in (("cuda", "no CUDA GPU is available here"), ("cuda:1", "no CUDA GPU"), ("gpu", "unknown device"),
                      ("mps", "MPS backend is not available")):
        with pytest.raises(ValueError, match=msg):
            T.pick_device(name)
    assert T.pick_device("cpu") == torch.device("cpu") and T.pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert T.pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA GPU"):
        T.pick_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg(tmp_path)
    argv = ["--preset", "tiny", "--train-data", cfg.train_data, "--val-data", cfg.val_data, "--vocab-size", "32",
            "--out-dir", cfg.out_dir, "--device", "cuda"]
    assert T.cli_main(argv) == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert not Path(cfg.out_dir).exists()
