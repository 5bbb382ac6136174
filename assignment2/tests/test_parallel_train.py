"""`cs336_basics.train.train(cfg, strategy)` with every ``--parallel`` mode on 2 gloo processes
reaches the single-process run's losses and parameters; checkpoints load into a plain model; the
torchrun entry point works end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cs336_basics.checkpoint import read_checkpoint
from cs336_basics.config import PRESETS
from cs336_basics.train import build_model, train
from cs336_systems.dist_utils import run_distributed
from cs336_systems.parallel import MODES, ParallelStrategy

PARALLEL_MODES = [m for m in MODES if m != "none"]


def _write_tokens(path: Path, n: int, vocab: int, seed: int) -> str:
    # A learnable stream: mostly "next id = previous id + 1 (mod 50)", some noise.
    rng = np.random.default_rng(seed)
    ids = (np.arange(n) % 50 + rng.integers(0, 3, n) * (rng.random(n) < 0.2)).astype(np.uint16) % vocab
    ids.tofile(path)
    Path(str(path) + ".json").write_text(json.dumps({"dtype": "uint16", "num_tokens": n}))
    return str(path)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_data")
    return PRESETS["tiny"].replace(
        train_data=_write_tokens(d / "train.bin", 20_000, 512, 0),
        val_data=_write_tokens(d / "valid.bin", 5_000, 512, 1),
        max_steps=4, warmup_steps=2, eval_interval=4, eval_batches=1, checkpoint_interval=0,
        grad_clip=0.5,  # low enough to clip: exercises the global-norm clip of the sharded modes
        out_dir=str(d / "runs" / "none"),
    )


@pytest.fixture(scope="module")
def single_run(tiny_cfg):
    result = train(tiny_cfg)
    return result, read_checkpoint(Path(tiny_cfg.out_dir) / "checkpoint.pt")["model"]


def _train_all_modes(rank: int, world_size: int, cfg, modes) -> dict:
    out = {}
    for mode in modes:
        strategy = ParallelStrategy(mode, rank, world_size, torch.device("cpu"), bucket_size_mb=0.05, grad_clip=cfg.grad_clip)
        result = train(cfg.replace(out_dir=str(Path(cfg.out_dir).parent / mode)), strategy)
        out[mode] = (result["train_loss"], result["val_loss"])
    return out


def test_every_parallel_mode_matches_single_process(tiny_cfg, single_run):
    single, ref_state = single_run
    single_opt_state = read_checkpoint(Path(tiny_cfg.out_dir) / "checkpoint.pt")["optimizer"]
    results = run_distributed(_train_all_modes, 2, tiny_cfg, PARALLEL_MODES, timeout_s=300)
    assert results[0] == results[1]  # every rank reports the same global losses
    for mode, (train_loss, val_loss) in results[0].items():
        assert abs(train_loss - single["train_loss"]) < 1e-4, (mode, train_loss, single["train_loss"])
        assert abs(val_loss - single["val_loss"]) < 1e-4, (mode, val_loss, single["val_loss"])
        # The checkpoint holds the full model under the plain names and loads into a plain model.
        ckpt = read_checkpoint(Path(tiny_cfg.out_dir).parent / mode / "checkpoint.pt")
        model = build_model(tiny_cfg, torch.device("cpu"))
        model.load_state_dict(ckpt["model"])
        worst = max((ckpt["model"][k].float() - v.float()).abs().max().item() for k, v in ref_state.items())
        assert worst < 1e-4, (mode, worst)
        if mode in ("zero1", "fsdp"):  # consolidated optimizer state in the single-process AdamW format
            from cs336_basics.optimizer import AdamW

            opt = AdamW(model.parameters())
            opt.load_state_dict(ckpt["optimizer"])  # train.py's resume path
            ref_opt = single_opt_state["state"]
            assert set(ckpt["optimizer"]["state"]) == set(ref_opt), mode
            for i, entry in ckpt["optimizer"]["state"].items():
                assert entry["step"] == ref_opt[i]["step"]
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.allclose(entry[key], ref_opt[i][key], rtol=1e-3, atol=1e-7), (mode, i, key)


def test_torchrun_entry_point(tiny_cfg, single_run, tmp_path):
    out_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cs336_systems.parallel", "--parallel", "fsdp", "--preset", "tiny",
           "--train-data", tiny_cfg.train_data, "--val-data", tiny_cfg.val_data, "--max-steps", "4",
           "--warmup-steps", "2", "--eval-interval", "4", "--eval-batches", "1", "--checkpoint-interval", "0",
           "--grad-clip", str(tiny_cfg.grad_clip), "--out-dir", str(out_dir), "--dist-timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout  # rank 0 logged; rank 1 did not duplicate the lines
    assert proc.stdout.count("finished:") == 1
    single, ref_state = single_run
    last = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(last["val_loss"] - single["val_loss"]) < 1e-4
    ckpt = read_checkpoint(out_dir / "checkpoint.pt")
    build_model(tiny_cfg, torch.device("cpu")).load_state_dict(ckpt["model"])
    assert max((ckpt["model"][k] - v).abs().max().item() for k, v in ref_state.items()) < 1e-4


def _train_for_time(rank: int, world_size: int, cfg) -> dict:
    strategy = ParallelStrategy("ddp-bucketed", rank, world_size, torch.device("cpu"), bucket_size_mb=0.05,
                                grad_clip=cfg.grad_clip)
    return train(cfg, strategy)


def test_ranks_stop_for_time_together_at_a_vote(tiny_cfg, tmp_path):
    # --max-minutes with several ranks: they vote every STOP_CHECK_EVERY steps (not every step: each
    # vote waits for the GPU), and all stop at the same step, the one after the first vote
    from cs336_basics.train import STOP_CHECK_EVERY

    cfg = tiny_cfg.replace(max_steps=1000, max_minutes=1e-6, out_dir=str(tmp_path / "timed"))
    results = run_distributed(_train_for_time, 2, cfg, timeout_s=300)
    assert [r["stopped"] for r in results] == ["max_minutes", "max_minutes"]
    assert [r["step"] for r in results] == [STOP_CHECK_EVERY, STOP_CHECK_EVERY]
    assert read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["iteration"] == STOP_CHECK_EVERY


def _train_with_rank1_interrupted(rank: int, world_size: int, cfg) -> dict:
    import cs336_basics.train as T

    real_get_batch, calls = T.get_batch, {"n": 0}

    def get_batch(*a, **k):  # rank 1 alone gets a SIGINT during its step 3
        calls["n"] += 1
        if rank == 1 and calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_batch(*a, **k)

    T.get_batch = get_batch
    result = _train_for_time(rank, world_size, cfg)
    return {**result, "batches": calls["n"]}


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_vote(tiny_cfg, tmp_path):
    # Ctrl-C / SIGTERM reaching one rank only: the ranks learn of it at their next vote and all stop
    # there together (evaluation + checkpoint), not at the step the signal came, which would hang
    # the other ranks in their next collective
    from cs336_basics.train import STOP_CHECK_EVERY

    cfg = tiny_cfg.replace(max_steps=1000, out_dir=str(tmp_path / "interrupted"))
    results = run_distributed(_train_with_rank1_interrupted, 2, cfg, timeout_s=300)
    assert [(r["stopped"], r["signal"]) for r in results] == [("interrupted", None), ("interrupted", "SIGINT")]
    assert [r["step"] for r in results] == [STOP_CHECK_EVERY, STOP_CHECK_EVERY]
    assert [r["batches"] for r in results] == [STOP_CHECK_EVERY, STOP_CHECK_EVERY]
    assert read_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["iteration"] == STOP_CHECK_EVERY
