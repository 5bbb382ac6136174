"""Expert iteration end to end on the toy digit task: keeping correct samples and SFT-ing on them works."""

from __future__ import annotations

from cs336_alignment import toy_task
from cs336_alignment.expert_iteration import EIConfig, train_expert_iteration
from cs336_alignment.train_utils import read_log


def test_expert_iteration_learns_toy_task(tmp_path):
    cfg = EIConfig(model="unused", out_dir=str(tmp_path / "ei"), n_ei_steps=4, questions_per_step=32,
                   rollouts_per_question=8, sampling_max_tokens=1, sampling_min_tokens=1, stop=(), sft_epochs=2,
                   batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-2, eval_every=0,
                   eval_max_tokens=1, device="cpu")
    final = train_expert_iteration(cfg, policy=toy_task.toy_policy(), reward_fn=toy_task.digit_reward,
                                   train_examples=toy_task.digit_examples(32),
                                   eval_examples=toy_task.digit_examples(16, offset=100), quiet=True)
    train = read_log(tmp_path / "ei" / "log.jsonl", "train")
    evals = read_log(tmp_path / "ei" / "log.jsonl", "eval")
    assert train[0]["frac_correct"] < 0.15 and train[0]["n_kept"] > 0
    assert train[-1]["frac_correct"] > 0.5, [r["frac_correct"] for r in train]
    assert evals[-1]["accuracy"] > evals[0]["accuracy"] + 0.4, evals
    assert final["optimizer_steps"] >= 1
