"""Data for supervised fine-tuning: prompt/response tokenization with response masks, reasoning
traces in the R1-Zero format, and the packed instruction-tuning dataset of the supplement.

Two kinds of SFT live here:
- *reasoning SFT* (assignment 5, sec. 4): each example is a (prompt, response) pair; the loss
  covers the response tokens only (``tokenize_prompt_and_output`` makes the mask);
- *instruction tuning* (supplement): Alpaca-formatted documents joined with EOS and packed into
  fixed-length windows (``PackedSFTDataset``), the loss on every token.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# --------------------------------------------------------------------------- tokenization


def pad_id_of(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else EOS (GPT-2 has no pad), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def pack_prompt_and_output_ids(
    prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]], pad_id: int
) -> dict[str, Tensor]:
    """Concatenate token ids, right-pad, shift: ``input_ids``, ``labels``, ``response_mask`` ``(B, L-1)``.

    ``L`` is the longest prompt+output. ``labels[b, t] = ids[b, t+1]``; ``response_mask[b, t]`` is 1
    where ``labels[b, t]`` is an output token (never on a prompt or padding token).
    """
    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(output_ids)} outputs")
    max_len = max(len(p) + len(o) for p, o in zip(prompt_ids, output_ids))
    ids = torch.full((len(prompt_ids), max_len), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(prompt_ids), max_len), dtype=torch.bool)  # (B, L): output tokens of ids
    for b, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        ids[b, : len(p) + len(o)] = torch.tensor(list(p) + list(o), dtype=torch.long)
        mask[b, len(p) : len(p) + len(o)] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": mask[:, 1:]}


def tokenize_prompt_and_output(prompt_strs: list[str], output_strs: list[str], tokenizer: Any) -> dict[str, Tensor]:
    """Tokenize prompts and outputs separately, then ``pack_prompt_and_output_ids``.

    Separate tokenization keeps the prompt/response boundary exact (no BPE merge across it).
    Prompts get the tokenizer's usual special tokens (a BOS where the model has one); outputs
    get none, so no BOS lands in the middle of a sequence.
    """
    prompt_ids = tokenizer(list(prompt_strs))["input_ids"]
    output_ids = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    return pack_prompt_and_output_ids(prompt_ids, output_ids, pad_id_of(tokenizer))


def instruction_prompt(instruction: str) -> str:
    """The Alpaca instruction template up to (and including) ``### Response:`` + newline."""
    from cs336_alignment.prompts import format_prompt

    return format_prompt("alpaca", instruction)


def instruction_pair_batch(tokenizer: Any, instructions: list[str], responses: list[str]) -> dict[str, Tensor]:
    """Alpaca-formatted prompts with responses that end in EOS, as a ``pack_prompt_and_output_ids`` batch."""
    eos = tokenizer.eos_token_id
    prompt_ids = tokenizer([instruction_prompt(i) for i in instructions])["input_ids"]
    output_ids = [ids + [eos] for ids in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]
    return pack_prompt_and_output_ids(prompt_ids, output_ids, pad_id_of(tokenizer))


# --------------------------------------------------------------------------- reasoning traces (R1-Zero format)

_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def r1_zero_response(reasoning: str, answer: str) -> str:
    """The response the r1_zero prompt (which ends in ``<think>``) expects: ``reasoning</think> <answer>a</answer>``."""
    return f" {reasoning.strip()}\n</think> <answer>{answer.strip()}</answer>"


def gsm8k_trace(answer_field: str) -> tuple[str, str]:
    """GSM8K ``answer`` text -> (reasoning without ``<<calc>>`` annotations, final answer after ``####``)."""
    reasoning, _, final = answer_field.rpartition("####")
    return _GSM8K_CALC.sub("", reasoning).strip(), final.strip().replace(",", "")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line raises with its line number."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return rows


def qa_examples(source: str, split: str = "train", limit: int = 0, seed: int = 0) -> list[dict[str, str]]:
    """Question/answer pairs ``{"question", "answer", "solution"}`` for RL, expert iteration and evaluation.

    ``source``: ``"gsm8k"``, ``"math"`` (``split`` train/test), ``"math500"``, or a JSONL path with
    ``question`` (or ``problem``/``prompt``) and ``answer`` (or ``ground_truth``) fields.
    ``limit > 0`` keeps a random subset of that size (seeded), the course's dataset-size knob.
    """
    if source in ("gsm8k", "math", "math500"):
        from cs336_alignment import datasets

        # MATH train has two rows without a \boxed{} answer: skipped (and reported), not fatal

        raw = {"gsm8k": lambda: datasets.load_gsm8k(split), "math": lambda: datasets.load_math(split, errors="skip"),
               "math500": datasets.load_math500}[source]()
        rows = [{"question": ex_question(ex), "answer": ex_answer(ex), "solution": _solution(ex, source)} for ex in raw]
    else:
        rows = []
        for i, r in enumerate(read_jsonl(source), 1):
            try:
                rows.append({"question": str(_field(r, "question", "problem", "prompt")),
                             "answer": str(_field(r, "answer", "ground_truth")), "solution": str(r.get("solution", ""))})
            except KeyError as e:
                raise ValueError(f"{source}:{i}: {e.args[0]}") from None
    if 0 < limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    return rows


def _solution(ex: Any, source: str) -> str:
    """The worked solution of a dataset example, as reasoning text (GSM8K: without ``<<calc>>`` marks)."""
    text = str(_field(ex, "solution"))
    return _GSM8K_CALC.sub("", text).strip() if source == "gsm8k" else text


def sft_examples(source: str, prompt_name: str = "r1_zero", split: str = "train", limit: int = 0,
                 seed: int = 0) -> list[dict[str, str]]:
    """SFT examples ``{"prompt", "response", "answer"}`` from a named source or a JSONL file.

    ``source``: ``"gsm8k"`` (the answer field's reasoning), ``"math"`` (the solution as reasoning,
    the boxed answer as answer), rendered into the R1-Zero format with the ``prompt_name``
    template; or a path to a JSONL with ``prompt`` and ``response`` (optionally ``answer`` /
    ``ground_truth``) fields, used verbatim. ``limit > 0`` keeps a seeded random subset.
    """
    if source not in ("gsm8k", "math", "math500"):
        rows = read_jsonl(source)
        for i, row in enumerate(rows, 1):
            if "prompt" not in row or "response" not in row:
                raise ValueError(f"{source}:{i}: needs 'prompt' and 'response' fields")
        out = [{"prompt": r["prompt"], "response": r["response"], "answer": str(r.get("answer", r.get("ground_truth", "")))}
               for r in rows]
        return random.Random(seed).sample(out, limit) if 0 < limit < len(out) else out

    from cs336_alignment.prompts import format_prompt

    return [
        {"prompt": format_prompt(prompt_name, ex["question"]), "response": r1_zero_response(ex["solution"], ex["answer"]),
         "answer": ex["answer"]}
        for ex in qa_examples(source, split, limit, seed)
    ]


def _field(ex: Any, *names: str) -> Any:
    """First present field of a dataset example (dict or dataclass)."""
    for name in names:
        value = ex.get(name) if isinstance(ex, dict) else getattr(ex, name, None)
        if value is not None:
            return value
    raise KeyError(f"example has none of the fields {names}")


def ex_question(ex: Any) -> str:
    """The question text of a GSM8K / MATH example."""
    return str(_field(ex, "question", "problem"))


def ex_answer(ex: Any) -> str:
    """The ground-truth answer of a GSM8K / MATH example."""
    return str(_field(ex, "answer"))


# --------------------------------------------------------------------------- packed instruction tuning


class PackedSFTDataset(Dataset):
    """Instruction-tuning documents, Alpaca-formatted, joined with EOS and cut into windows.

    Each JSONL row has ``prompt`` and ``response``; the document is
    ``instruction_prompt(prompt) + response`` tokenized with the tokenizer's usual special tokens,
    followed by EOS. All documents (shuffled first if asked, with ``seed``) form one token stream
    ``s``; item ``i`` is ``input_ids = s[i*L : (i+1)*L]``, ``labels = s[i*L+1 : (i+1)*L+1]``
    (the trailing partial window is dropped).
    """

    def __init__(self, tokenizer: Any, dataset_path: str | Path, seq_length: int, shuffle: bool, seed: int = 0):
        rows = read_jsonl(dataset_path)
        if shuffle:
            random.Random(seed).shuffle(rows)
        eos = tokenizer.eos_token_id
        docs = [instruction_prompt(r["prompt"]) + r["response"] for r in rows]
        stream: list[int] = []
        for ids in tokenizer(docs)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        self.tokens = torch.tensor(stream, dtype=torch.long)
        self.seq_length = seq_length

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_length)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.seq_length
        return {
            "input_ids": self.tokens[start : start + self.seq_length],
            "labels": self.tokens[start + 1 : start + self.seq_length + 1],
        }


def iterate_batches(
    dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> DataLoader:
    """One epoch of batches (dicts of stacked tensors; ``len()`` = number of batches, the last may be smaller)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
