"""A task small enough to watch RL learn on a CPU in seconds (tests, notebook, quickstart).

A tiny random Llama with a 257-token byte-level tokenizer (256 bytes + EOS, built offline with
``tokenizers``) answers prompts like ``"Q3: a digit? A:"``; the reward is 1 when the response
starts with a digit. A random policy does that ~4 % of the time (10 of 257 tokens), so a
learning algorithm has to find and reinforce the rare successes: GRPO does it in ~15 steps.
"""

from __future__ import annotations

from typing import Any

from cs336_alignment.models import Policy, tiny_llama


def byte_tokenizer() -> Any:
    """A ``transformers`` fast tokenizer over raw bytes (ids 0..255) plus ``<|endoftext|>`` (256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's printable stand-ins for the 256 bytes
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    hf.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    return hf


def toy_policy(seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> Policy:
    """A random tiny Llama over the byte tokenizer, float32, on CPU."""
    tokenizer = byte_tokenizer()
    model = tiny_llama(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                       intermediate_size=2 * hidden_size, seed=seed)
    return Policy(model, tokenizer, "hf")


def digit_examples(n: int, offset: int = 0) -> list[dict[str, str]]:
    """``n`` prompts of the digit task (``answer`` is unused by the reward)."""
    return [{"prompt": f"Q{offset + i}: a digit? A:", "answer": "digit"} for i in range(n)]


def digit_reward(response: str, ground_truth: str) -> dict[str, float]:
    """1 if the response starts with a digit (in the shape of ``r1_zero_reward_fn``'s result)."""
    r = float(response[:1].isdigit())
    return {"format_reward": r, "answer_reward": r, "reward": r}
