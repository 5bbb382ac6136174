"""DPO: the per-instance loss against a direct computation from log-probs; the program on toy pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from cs336_alignment import toy_task
from cs336_alignment.adapters import run_compute_per_instance_dpo_loss
from cs336_alignment.dpo import DPOConfig, load_pairs, train_dpo
from cs336_alignment.models import tiny_llama
from cs336_alignment.prompts import format_prompt
from cs336_alignment.train_utils import read_log


@pytest.fixture(scope="module")
def gpt2(shared_data):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(shared_data / "tokenizers" / "gpt2"))


def _sequence_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log p(response + EOS | Alpaca(prompt)) from the full sequence's token log-probs, summed over the whole
    sequence minus the same sum over the prompt alone (the prompt's terms cancel)."""
    p_ids = tokenizer.encode(format_prompt("alpaca", prompt))
    r_ids = tokenizer.encode(response) + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + r_ids])
    logp = F.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    full = float(logp.sum())
    prompt_part = float(logp[: len(p_ids) - 1].sum())
    return full - prompt_part


def test_per_instance_dpo_loss_vs_direct(gpt2):
    lm = tiny_llama(len(gpt2), seed=1)
    ref = tiny_llama(len(gpt2), seed=2)
    beta, prompt = 0.5, "Name a color."
    chosen, rejected = "Blue is a color.", "I will not answer that."
    got = run_compute_per_instance_dpo_loss(lm, ref, gpt2, beta, prompt, chosen, rejected)
    with torch.no_grad():
        margin = (_sequence_logp(lm, gpt2, prompt, chosen) - _sequence_logp(ref, gpt2, prompt, chosen)) \
            - (_sequence_logp(lm, gpt2, prompt, rejected) - _sequence_logp(ref, gpt2, prompt, rejected))
    expected = -math.log(1 / (1 + math.exp(-beta * margin)))
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert got.requires_grad  # the policy side is differentiable
    # identical policy and reference: loss log 2, whatever the pair
    same = run_compute_per_instance_dpo_loss(lm, lm, gpt2, beta, prompt, chosen, rejected)
    assert same.item() == pytest.approx(math.log(2), rel=1e-5)


def test_dpo_program_learns_toy_preferences(tmp_path):
    rows = [{"prompt": f"Q{i}: a digit?", "chosen": f"{i % 10}", "rejected": "no"} for i in range(32)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DPOConfig(model="unused", train_data=str(path), out_dir=str(tmp_path / "dpo"), val_examples=8, beta=0.5,
                    optimizer="adamw", learning_rate=3e-3, epochs=2, batch_size=8, gradient_accumulation_steps=2,
                    eval_every=0, device="cpu")
    final = train_dpo(cfg, policy=toy_task.toy_policy(seed=0), ref=toy_task.toy_policy(seed=0), pairs=load_pairs(str(path)),
                      quiet=True)
    evals = read_log(tmp_path / "dpo" / "log.jsonl", "eval")
    assert evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert evals[-1]["loss"] < 0.3 and evals[-1]["accuracy"] == 1.0, evals[-1]
    assert final["val_accuracy"] == 1.0 and len(read_log(tmp_path / "dpo" / "log.jsonl", "train")) == 6


def test_load_pairs_reports_bad_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_pairs(str(path))
