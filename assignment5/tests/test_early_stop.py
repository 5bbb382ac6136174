"""Ctrl-C / SIGTERM in the training programs (SFT, DPO, expert iteration, GRPO): the step in progress
finishes, then the run evaluates, checkpoints and returns as "interrupted"; --resume goes on."""

from __future__ import annotations

import json
import os
import signal

import pytest
from cs336_alignment import toy_task
from cs336_alignment.dpo import DPOConfig, load_pairs, train_dpo
from cs336_alignment.expert_iteration import EIConfig, train_expert_iteration
from cs336_alignment.grpo import GRPOConfig, train_grpo
from cs336_alignment.sft import SFTConfig, train_sft
from cs336_alignment.train_utils import EarlyStop, RunLog, read_log
from cs336_basics.train import exit_status

DIGITS = {"reward_fn": toy_task.digit_reward, "train_examples": toy_task.digit_examples(8),
          "eval_examples": toy_task.digit_examples(4), "quiet": True}


def _grpo_cfg(out, **kw):
    return GRPOConfig(**{"model": "unused", "out_dir": str(out), "n_grpo_steps": 3, "rollout_batch_size": 16,
                         "group_size": 4, "train_batch_size": 16, "gradient_accumulation_steps": 2,
                         "sampling_max_tokens": 2, "sampling_min_tokens": 1, "stop": (), "learning_rate": 1e-2,
                         "eval_every": 0, "eval_max_tokens": 1, "device": "cpu", **kw})


def _sft(tmp_path, out):
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}: a digit? A:", "response": " 7"}) + "\n" for i in range(16)))
    cfg = SFTConfig(model="unused", out_dir=str(out), train_data=str(rows), prompt="question_only", epochs=1,
                    batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2, eval_data="none", stop=(),
                    device="cpu")
    return train_sft(cfg, policy=toy_task.toy_policy(), quiet=True)


def _dpo(tmp_path, out):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}: a digit?", "chosen": f"{i % 10}", "rejected": "no"}) + "\n"
                            for i in range(20)))
    cfg = DPOConfig(model="unused", train_data=str(path), out_dir=str(out), val_examples=4, learning_rate=3e-3,
                    batch_size=4, gradient_accumulation_steps=1, eval_every=0, device="cpu")
    return train_dpo(cfg, policy=toy_task.toy_policy(), ref=toy_task.toy_policy(), pairs=load_pairs(str(path)), quiet=True)


def _ei(tmp_path, out):
    cfg = EIConfig(model="unused", out_dir=str(out), n_ei_steps=3, questions_per_step=4, rollouts_per_question=2,
                   sampling_max_tokens=1, sampling_min_tokens=1, stop=(), batch_size=4, gradient_accumulation_steps=1,
                   eval_every=0, eval_max_tokens=1, device="cpu")
    return train_expert_iteration(cfg, policy=toy_task.toy_policy(), **DIGITS)


def _grpo(tmp_path, out):
    return train_grpo(_grpo_cfg(out), policy=toy_task.toy_policy(), **DIGITS)


@pytest.mark.parametrize("program", [_sft, _dpo, _ei, _grpo], ids=["sft", "dpo", "ei", "grpo"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_step_1_makes_it_the_last(tmp_path, monkeypatch, program, signum):
    """The signal arrives as step 1 is logged: no step 2, an evaluation and a checkpoint at step 1,
    the result names the signal (exit status 128 + its number) and the handlers are put back."""
    log_record = RunLog.log

    def log_and_signal(self, kind, step, **metrics):
        log_record(self, kind, step, **metrics)
        if kind == "train" and step == 1:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(RunLog, "log", log_and_signal)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    final = program(tmp_path, tmp_path / "run")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert final["stopped"] == "interrupted" and final["signal"] == signum.name
    assert exit_status(final) == 128 + signum
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "train"] == [1]
    if program is not _sft:  # (this SFT run has no evaluation set)
        assert [r["step"] for r in log if r["kind"] == "eval"] == [0, 1]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_0000001"]


def test_programs_that_run_to_the_end_say_done(tmp_path):
    final = _dpo(tmp_path, tmp_path / "dpo")
    assert final["stopped"] == "done" and final["signal"] is None and exit_status(final) == 0


def test_grpo_interrupted_mid_rollout_and_resumed_matches_an_unbroken_run(tmp_path):
    """A SIGINT during step 2's rollouts (inside the reward function): step 2 still finishes and is
    checkpointed; --resume then runs step 3, and every logged loss and reward equals an unbroken run's."""
    log, sent = tmp_path / "broken" / "log.jsonl", []

    def reward_then_signal(response, truth):
        if not sent and log.exists() and len(read_log(log, "train")) == 1:  # the first reward of step 2
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return toy_task.digit_reward(response, truth)

    args = {**DIGITS, "reward_fn": reward_then_signal}
    final = train_grpo(_grpo_cfg(tmp_path / "broken"), policy=toy_task.toy_policy(seed=0), **args)
    assert final["stopped"] == "interrupted"
    assert [r["step"] for r in read_log(log, "train")] == [1, 2]
    assert (tmp_path / "broken" / "checkpoints" / "step_0000002").is_dir()
    final = train_grpo(_grpo_cfg(tmp_path / "broken", resume=True), **DIGITS)
    assert final["stopped"] == "done"

    train_grpo(_grpo_cfg(tmp_path / "whole"), policy=toy_task.toy_policy(seed=0), **DIGITS)
    keys = ("step", "loss", "reward", "grad_norm", "entropy")
    broken, whole = ([{k: r[k] for k in keys} for r in read_log(tmp_path / run / "log.jsonl", "train")]
                     for run in ("broken", "whole"))
    assert broken == whole and len(whole) == 3


def test_early_stop_budget_and_signal_precedence():
    with EarlyStop(max_minutes=0) as early:
        assert not early.now() and early.result() == {"stopped": "done", "signal": None}
    with EarlyStop(max_minutes=1e-9) as early:
        assert early.now() and early.result()["stopped"] == "max_minutes"
        os.kill(os.getpid(), signal.SIGTERM)  # a signal outranks the budget, and names itself
        assert early.now() and early.result() == {"stopped": "interrupted", "signal": "SIGTERM"}
