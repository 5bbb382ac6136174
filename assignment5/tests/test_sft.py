"""SFT: the optimizer step against a direct per-token NLL, and the program end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from cs336_alignment import toy_task
from cs336_alignment.sft import SFTConfig, sft_step, train_sft
from cs336_alignment.sft_data import tokenize_prompt_and_output
from cs336_alignment.train_utils import read_log


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_sft_step_equals_per_token_nll_gradient(accumulation):
    """Uneven micro-batches (5 rows / 3) still give the gradient of the batch's mean NLL per response token."""
    policy = toy_task.toy_policy(seed=1)
    prompts = ["Q: 1+1? A:", "Say hi:", "x", "Longer prompt here:", "Q"]
    outputs = [" 2", " hi there", " y z w", " ok", " a much longer response than the others"]
    batch = tokenize_prompt_and_output(prompts, outputs, policy.tokenizer)

    reference = toy_task.toy_policy(seed=1).model
    logits = reference(batch["input_ids"]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(batch["labels"].shape)
    expected_loss = nll[batch["response_mask"]].mean()
    expected_loss.backward()

    before = [p.detach().clone() for p in policy.model.parameters()]
    opt = torch.optim.SGD(policy.model.parameters(), lr=1.0)
    metrics = sft_step(policy, opt, batch, accumulation, max_grad_norm=0.0, device=torch.device("cpu"), precision="fp32")
    assert metrics["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert metrics["tokens"] == int(batch["response_mask"].sum())
    for b, p, r in zip(before, policy.model.parameters(), reference.parameters()):
        torch.testing.assert_close(b - p.detach(), r.grad, atol=1e-6, rtol=1e-4)  # SGD lr 1: delta = grad
    assert all(p.grad is None for p in policy.model.parameters())  # zero_grad(set_to_none=True)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_program_learns_and_resumes(tmp_path):
    """Reasoning-format SFT on a JSONL: the NLL falls, evaluation runs, a resumed run continues."""
    train = _write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Q{i}: a digit? A:", "response": " 7"} for i in range(32)])
    evals = _write_jsonl(tmp_path / "eval.jsonl", [{"question": f"Q{100 + i}: a digit? A:", "answer": "x"} for i in range(8)])
    kw = {"model": "unused", "out_dir": str(tmp_path / "sft"), "train_data": train, "prompt": "question_only", "epochs": 3,
              "batch_size": 8, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "eval_data": evals,
              "eval_max_tokens": 2, "stop": (), "device": "cpu", "checkpoint_every": 6}
    final = train_sft(SFTConfig(**kw), policy=toy_task.toy_policy(), quiet=True)
    log = tmp_path / "sft" / "log.jsonl"
    train_rows = read_log(log, "train")
    assert len(train_rows) == 12 and final["train_examples"] == 32
    assert train_rows[-1]["loss"] < 0.5 * train_rows[0]["loss"], (train_rows[0]["loss"], train_rows[-1]["loss"])
    assert [r["step"] for r in read_log(log, "eval")] == [0, 12]
    assert (tmp_path / "sft" / "curves.png").exists()

    # resume from the step-12 checkpoint with one more epoch: steps 13..16 only
    train_sft(SFTConfig(**{**kw, "epochs": 4, "resume": True}), quiet=True)
    assert [r["step"] for r in read_log(log, "train")][-5:] == [12, 13, 14, 15, 16]


def test_packed_instruction_tuning(tmp_path, shared_data):
    """The supplement's packed format: every token is a target; the loss falls on a repeated sample."""
    kw = {"model": "unused", "out_dir": str(tmp_path / "packed"), "data_format": "packed",
              "train_data": str(shared_data / "sft" / "sft_sample.jsonl"), "seq_length": 128, "epochs": 2, "batch_size": 16,
              "gradient_accumulation_steps": 2, "learning_rate": 3e-3, "eval_data": "none", "device": "cpu"}
    train_sft(SFTConfig(**kw), policy=toy_task.toy_policy(), quiet=True)
    rows = read_log(tmp_path / "packed" / "log.jsonl", "train")
    assert rows and all(r["tokens"] == 16 * 128 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
