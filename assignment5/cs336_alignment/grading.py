"""Grading model outputs: the R1-Zero reward, GSM8K and MMLU answer parsing.

All functions are pure (text in, verdict out). Mathematical equivalence is decided by
`math-verify` (https://github.com/huggingface/Math-Verify), which parses LaTeX and plain
expressions into sympy and compares them (fractions vs decimals, ``\\boxed{}``, intervals,
sets, units and ``\\text{}`` answers), instead of a hand-written normalizer.

math-verify guards each parse/compare with ``signal.alarm``, which only works in the main
thread; in any other thread (a data-loader or rollout worker) we call it without the alarm
rather than letting it raise.

The R1-Zero format (DeepSeek-R1, arXiv:2501.12948): the prompt ends with ``<think>``, and a
well-formed response is ``reasoning </think> <answer> final answer </answer>``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

from math_verify import parse, verify

MMLU_LETTERS = ("A", "B", "C", "D")
_TIMEOUT_S = 5

_R1_ZERO_ANSWER = re.compile(r"</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_MMLU_STATED = re.compile(r"(?i:answer)(?:\s+is)?\s*:?\s*\(?([ABCD])\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _timeout() -> int | None:
    # signal.alarm raises outside the main thread: grade without it there.
    return _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _normalize_text(s: str) -> str:
    """Cheap canonical form for exact matches: no ``$``, ``\\boxed``/``\\text`` wrappers, spaces, case."""
    s = s.strip().strip("$").strip()
    for wrapper in ("\\boxed{", "\\text{", "\\textbf{", "\\mathrm{"):
        if s.startswith(wrapper) and s.endswith("}"):
            s = s[len(wrapper):-1]
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _parse(text: str) -> list:
    try:
        return parse(text, parsing_timeout=_timeout())
    except Exception:  # noqa: BLE001  (math-verify raises many types on exotic LaTeX and timeouts)
        return []


def _verify(gold: list, pred: list) -> bool:
    if not gold or not pred:
        return False
    try:
        return bool(verify(gold, pred, timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001  (a failed comparison is a wrong answer)
        return False


def answers_equivalent(prediction: str, ground_truth: str) -> bool:
    """Whether ``prediction`` states the same answer as ``ground_truth`` (a MATH/GSM8K answer string).

    ``ground_truth`` is LaTeX without delimiters (``\\frac{1}{2}``, ``\\text{(C)}``, ``10``).
    ``prediction`` may be LaTeX, plain text with the answer in it, or ``\\boxed{...}``.
    """
    if not prediction.strip() or not ground_truth.strip():
        return False
    if _normalize_text(prediction) == _normalize_text(ground_truth):
        return True
    gold = _parse(f"${ground_truth}$") or _parse(ground_truth)
    if _verify(gold, _parse(prediction)):
        return True
    # Bare LaTeX such as "x^2+1" or "(1, 2)" only parses whole when delimited.
    if "$" not in prediction and "\\boxed" not in prediction:
        return _verify(gold, _parse(f"${prediction}$"))
    return False


def extract_r1_zero_answer(response: str) -> str | None:
    """The text inside ``<answer>…</answer>`` after ``</think>``, or None if the format is broken."""
    match = _R1_ZERO_ANSWER.search(response)
    return match.group(1).strip() if match else None


def r1_zero_reward_fn(response: str, ground_truth: str) -> dict[str, float]:
    """R1-Zero reward: format 1 if ``</think> <answer>…</answer>`` is present; answer 1 if it is right.

    ``reward`` is the answer reward gated by the format (a right answer in a broken format
    earns nothing), as in the CS336 assignment 5 handout.
    """
    answer = extract_r1_zero_answer(response)
    if answer is None:
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    correct = float(answers_equivalent(answer, ground_truth))
    return {"format_reward": 1.0, "answer_reward": correct, "reward": correct}


def question_only_reward_fn(response: str, ground_truth: str) -> dict[str, float]:
    """Reward for free-form outputs (question_only / chat prompts): the last ``\\boxed{}`` or number.

    There is no required format, so ``format_reward`` is 1 when an answer could be extracted.
    """
    answer = extract_final_answer(response)
    if answer is None:
        return {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    correct = float(answers_equivalent(answer, ground_truth))
    return {"format_reward": 1.0, "answer_reward": correct, "reward": correct}


def extract_final_answer(text: str) -> str | None:
    """The answer of a free-form solution: the last non-empty ``\\boxed{}``, else the last number."""
    return extract_boxed(text) or parse_gsm8k_response(text)


def extract_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 2``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):  # "\\boxed 2": a brace-less argument, up to a space or "$"
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


def parse_gsm8k_response(model_output: str) -> str | None:
    """The last number in the text, thousands separators removed (``"1,234.5"`` -> ``"1234.5"``)."""
    numbers = _NUMBER.findall(model_output)
    if not numbers:
        return None
    return numbers[-1].replace(",", "")


def _options(example: Any) -> list[str]:
    return list(example["options"] if isinstance(example, Mapping) else example.options)


def parse_mmlu_response(mmlu_example: Any, model_output: str) -> str | None:
    """The option letter ``"A"``..``"D"`` the output commits to, or None.

    Looked for, in order: "answer is (B)" / "Answer: B"; an output that starts with the letter
    ("B", "(B)", "B."); an output that quotes exactly one option's text.
    """
    text = model_output.strip()
    stated = _MMLU_STATED.findall(text)
    if stated:
        return stated[-1]
    match = re.match(r"\(?([ABCD])(?:[).:]|$)", text)
    if match:
        return match.group(1)
    quoted = [letter for letter, option in zip(MMLU_LETTERS, _options(mmlu_example))
              if option.strip() and option.strip().lower() in text.lower()]
    return quoted[0] if len(quoted) == 1 else None
