"""GRPO end to end on CPU: a tiny random model learns the toy digit task (a real learning test)."""

from __future__ import annotations

import json

import pytest
import torch
from cs336_alignment import toy_task
from cs336_alignment.grpo import GRPOConfig, cli_main, train_grpo
from cs336_alignment.train_utils import parse_config, read_log


def _cfg(tmp_path, **kw) -> GRPOConfig:
    base = {"model": "unused", "out_dir": str(tmp_path / "grpo"), "n_grpo_steps": 18, "rollout_batch_size": 64, "group_size": 8,
                "train_batch_size": 64, "gradient_accumulation_steps": 2, "sampling_max_tokens": 1, "sampling_min_tokens": 1, "stop": (),
                "learning_rate": 1e-2, "eval_every": 0, "eval_max_tokens": 1, "loss_type": "grpo_clip", "device": "cpu", "seed": 0}
    return GRPOConfig(**{**base, **kw})


def test_grpo_learns_toy_task(tmp_path):
    """Reward starts near chance (~4 %) and rises above 70 % within 18 steps (seeded; ~0.95 observed)."""
    cfg = _cfg(tmp_path)
    final = train_grpo(cfg, policy=toy_task.toy_policy(seed=0), reward_fn=toy_task.digit_reward,
                       train_examples=toy_task.digit_examples(32), eval_examples=toy_task.digit_examples(16, offset=100),
                       quiet=True)
    train = read_log(tmp_path / "grpo" / "log.jsonl", "train")
    evals = read_log(tmp_path / "grpo" / "log.jsonl", "eval")
    first = sum(r["reward"] for r in train[:3]) / 3
    last = sum(r["reward"] for r in train[-3:]) / 3
    assert len(train) == 18 and [e["step"] for e in evals] == [0, 18]
    assert first < 0.2, first
    assert last > 0.7, last
    assert evals[0]["accuracy"] <= 0.25 and evals[-1]["accuracy"] >= 0.7, evals
    assert final["eval_accuracy"] == evals[-1]["accuracy"]
    for key in ("entropy", "clip_fraction", "grad_norm", "response_tokens", "rollout_s", "scoring_s", "training_s",
                "format_reward", "answer_reward"):
        assert key in train[-1], key
    assert train[-1]["entropy"] < train[0]["entropy"]  # the policy sharpened
    assert (tmp_path / "grpo" / "curves.png").exists()
    assert (tmp_path / "grpo" / "checkpoints").is_dir()


def test_grpo_off_policy_variant_runs_and_resumes(tmp_path):
    """Off-policy epochs with old log-probs, Dr. GRPO normalization, checkpoint and resume."""
    loss_type = "grpo_no_clip"
    kw = {"n_grpo_steps": 2, "epochs_per_rollout_batch": 2, "train_batch_size": 32, "gradient_accumulation_steps": 2,
              "loss_type": loss_type, "use_std_normalization": False, "length_normalization": "masked_normalize",
              "sampling_max_tokens": 3, "checkpoint_every": 1, "eval_examples": 0}
    args = {"reward_fn": toy_task.digit_reward, "train_examples": toy_task.digit_examples(8),
                "eval_examples": toy_task.digit_examples(4), "quiet": True}
    train_grpo(_cfg(tmp_path, **kw), policy=toy_task.toy_policy(), **args)
    steps = [r["step"] for r in read_log(tmp_path / "grpo" / "log.jsonl", "train")]
    assert steps == [1, 2]

    # resume: the latest checkpoint (step 2) is picked up and only step 3 runs
    train_grpo(_cfg(tmp_path, **{**kw, "n_grpo_steps": 3, "resume": True}), **args)
    steps = [r["step"] for r in read_log(tmp_path / "grpo" / "log.jsonl", "train")]
    assert steps == [1, 2, 3]
    saved = json.loads((tmp_path / "grpo" / "config.json").read_text())
    assert saved["config"]["loss_type"] == loss_type and saved["config"]["n_grpo_steps"] == 3


def test_grpo_wall_clock_budget_ends_with_eval_and_checkpoint(tmp_path):
    """Past --max_minutes the next step is the last: final evaluation and checkpoint, then --resume goes on."""
    kw = {"n_grpo_steps": 50, "max_minutes": 1e-9, "rollout_batch_size": 16, "train_batch_size": 16}
    args = {"reward_fn": toy_task.digit_reward, "train_examples": toy_task.digit_examples(8),
                "eval_examples": toy_task.digit_examples(4), "quiet": True}
    train_grpo(_cfg(tmp_path, **kw), policy=toy_task.toy_policy(), **args)
    log = tmp_path / "grpo" / "log.jsonl"
    assert [r["step"] for r in read_log(log, "train")] == [1]  # at least one step, then out of time
    assert [e["step"] for e in read_log(log, "eval")] == [0, 1]
    assert (tmp_path / "grpo" / "checkpoints" / "step_0000001").is_dir()
    train_grpo(_cfg(tmp_path, **{**kw, "resume": True}), **args)
    assert [r["step"] for r in read_log(log, "train")] == [1, 2]


def test_grpo_dynamic_sampling_trains_on_informative_groups(tmp_path):
    """DAPO dynamic sampling: more rollout rounds until the batch holds groups whose rewards differ.
    At the start ~72% of the toy task's groups of 8 are all-zero (chance ~4% per sample)."""
    args = {"reward_fn": toy_task.digit_reward, "train_examples": toy_task.digit_examples(32),
            "eval_examples": toy_task.digit_examples(4), "quiet": True}
    train_grpo(_cfg(tmp_path / "off", n_grpo_steps=2), policy=toy_task.toy_policy(seed=0), **args)
    train_grpo(_cfg(tmp_path / "on", n_grpo_steps=2, dynamic_sampling_rounds=6), policy=toy_task.toy_policy(seed=0), **args)
    off = read_log(tmp_path / "off" / "grpo" / "log.jsonl", "train")
    on = read_log(tmp_path / "on" / "grpo" / "log.jsonl", "train")
    for r in off:  # off: the trained batch is the one sampled batch
        assert r["sampling_rounds"] == 1
        assert r["frac_trained_groups_informative"] == pytest.approx(1 - r["frac_groups_all_equal"])
    # on: round 0 is the same sample as without (same seeds), later rounds add informative groups
    assert on[0]["reward"] == off[0]["reward"] and on[0]["frac_groups_all_equal"] == off[0]["frac_groups_all_equal"]
    for r in on:
        assert 1 <= r["sampling_rounds"] <= 6
        assert r["frac_trained_groups_informative"] >= 1 - r["frac_groups_all_equal"]
    assert on[0]["sampling_rounds"] > 1 and on[0]["frac_trained_groups_informative"] > 1 - on[0]["frac_groups_all_equal"]
    with pytest.raises(ValueError, match="dynamic_sampling_rounds"):
        _cfg(tmp_path, dynamic_sampling_rounds=0)


def test_grpo_cli_maps_onto_config():
    cfg = parse_config(GRPOConfig, ["--model", "m", "--loss_type", "grpo_clip", "--no-use_std_normalization",
                                    "--stop", "</answer>", "###", "--group_size", "4", "--rollout_batch_size", "16",
                                    "--train_batch_size", "16", "--gradient_accumulation_steps", "4"], "test")
    assert cfg.loss_type == "grpo_clip" and cfg.use_std_normalization is False
    assert cfg.stop == ("</answer>", "###") and cfg.group_size == 4
    with pytest.raises(ValueError, match="multiple of group_size"):
        GRPOConfig(model="m", rollout_batch_size=10, group_size=4)
    with pytest.raises(SystemExit):
        cli_main(["--loss_type", "grpo_clip"])  # --model is required


def test_programs_run_on_a_cs336_basics_model(tmp_path):
    """A from-scratch cs336_basics TransformerLM + our own byte-level Tokenizer, loaded from a checkpoint by
    ``load_policy``: GRPO trains, checkpoints and resumes it; SFT trains it."""
    from cs336_alignment.models import BasicsTokenizer, Policy
    from cs336_alignment.sft import SFTConfig, train_sft
    from cs336_basics.model import TransformerLM
    from cs336_basics.tokenizer import Tokenizer

    vocab = {i: bytes([i]) for i in range(256)} | {256: b"<|endoftext|>"}
    tokenizer = BasicsTokenizer(Tokenizer(vocab, [], special_tokens=["<|endoftext|>"]))
    torch.manual_seed(0)
    model = TransformerLM(257, context_length=128, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    Policy(model, tokenizer, "basics").save(tmp_path / "base")
    spec = str(tmp_path / "base" / "model.pt")

    args = {"reward_fn": toy_task.digit_reward, "train_examples": toy_task.digit_examples(8),
                "eval_examples": toy_task.digit_examples(4), "quiet": True}
    kw = {"model": spec, "n_grpo_steps": 2, "checkpoint_every": 1, "sampling_max_tokens": 3, "rollout_batch_size": 16,
              "group_size": 4, "train_batch_size": 16, "loss_type": "no_baseline"}
    train_grpo(_cfg(tmp_path, **kw), **args)
    train_grpo(_cfg(tmp_path, **{**kw, "n_grpo_steps": 3, "resume": True}), **args)
    assert [r["step"] for r in read_log(tmp_path / "grpo" / "log.jsonl", "train")] == [1, 2, 3]

    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}:", "response": " 7"}) + "\n" for i in range(8)))
    final = train_sft(SFTConfig(model=spec, out_dir=str(tmp_path / "sft"), train_data=str(rows), batch_size=4,
                                gradient_accumulation_steps=2, eval_data="none", device="cpu"), quiet=True)
    assert final["train_examples"] == 8 and final["loss"] > 0
