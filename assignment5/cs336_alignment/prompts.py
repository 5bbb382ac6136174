"""Prompt templates (``prompts/<name>.prompt``) and the model's own chat template.

- ``r1_zero``: the DeepSeek-R1-Zero prompt; the model continues after ``Assistant: <think>`` and is
  graded by :func:`cs336_alignment.grading.r1_zero_reward_fn`.
- ``question_only``: the bare question.
- ``alpaca``: the Alpaca instruction template (SFT and instruction following); ``{response}``
  is empty when prompting.

Templates use ``{question}`` (and ``{response}``) placeholders; literal braces in them are doubled.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

PROMPT_DIR = Path(__file__).parent / "prompts"
PROMPTS = ("r1_zero", "question_only", "alpaca")
# Appended to the question for chat-template math evaluation, so that the answer is gradable.
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@cache
def load_prompt(name: str) -> str:
    """The raw template text of ``prompts/<name>.prompt``."""
    path = PROMPT_DIR / f"{name}.prompt"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROMPT_DIR.glob("*.prompt")))
        raise ValueError(f"unknown prompt {name!r}; known: {known}")
    return path.read_text(encoding="utf-8")


def format_prompt(name: str, question: str, response: str = "") -> str:
    """Fill a template. ``str.format`` parses only the template: braces in the question (LaTeX) stay."""
    return load_prompt(name).format(question=question, response=response)


def apply_chat_template(tokenizer: Any, question: str, system: str | None = None) -> str:
    """The model's own chat template around one user turn, ending where the assistant starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; use a prompt file (r1_zero, question_only, alpaca)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
