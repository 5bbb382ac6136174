"""Evaluation and training data: MATH, MATH500, GSM8K, MMLU, AlpacaEval, SimpleSafetyTests.

Every loader returns a list of :class:`Example` (``question``/``problem``, ``answer`` and the
extras of its dataset) read from local files: by default the shared data folder
(``$CS336_SHARED_DATA`` or ``../shared/data``; layout in its README), or ``data_dir=``. With
``source="hub"`` the same loader pulls the original dataset through `datasets` (online; the
``datasets`` extra) and validates its rows the same way. A malformed row raises
:class:`DatasetError` naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cs336_alignment.grading import MMLU_LETTERS, extract_boxed

log = logging.getLogger(__name__)

MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


class DatasetError(ValueError):
    """A dataset file that is missing or has a malformed row."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # the gold final answer (LaTeX for MATH, a number for GSM8K, a letter for MMLU)
    solution: str = ""  # worked solution, when the dataset has one
    subject: str = ""
    level: str = ""
    options: tuple[str, ...] = ()  # MMLU choices A..D
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def problem(self) -> str:
        return self.question

    def __getitem__(self, key: str) -> Any:  # dict-style access, as the course's adapters use
        return self.problem if key == "problem" else getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    from cs336_basics.paths import shared_data_dir

    return shared_data_dir()


def _need(path: Path) -> Path:
    if not path.exists():
        raise DatasetError(f"{path} not found (set CS336_SHARED_DATA, pass data_dir=, or source='hub')")
    return path


def _jsonl(path: Path) -> Iterator[tuple[str, str]]:
    """(location, raw line) for each non-empty line; location is ``file:line`` for error messages."""
    with open(_need(path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", line


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: missing or empty field {name!r}")
    return value


def _build(make, rows, errors: str, *args: Any) -> list[Example]:
    """``make(row, where, *args)`` for each row; a malformed row raises, or with ``errors="skip"``
    is logged and left out."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    out = []
    for where, row in rows:
        try:
            out.append(make(_json_object(row, where) if isinstance(row, str) else row, where, *args))
        except DatasetError as e:
            if errors == "raise":
                raise
            log.warning("skipping %s", e)
    return out


def _hub(name: str, config: str | None, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("source='hub' needs the `datasets` package: pip install 'cs336-alignment[datasets]'") from e
    for n, row in enumerate(datasets.load_dataset(name, config, split=split), 1):
        yield f"{name}[{split}] row {n}", dict(row)


# ----------------------------------------------------------------------------- GSM8K


def gsm8k_example(row: dict[str, Any], where: str) -> Example:
    solution = _field(row, "answer", where)
    if "####" not in solution:
        raise DatasetError(f"{where}: field 'answer' has no '#### <number>' final answer")
    reasoning, _, final = solution.rpartition("####")
    return Example(_field(row, "question", where), final.strip().replace(",", ""), reasoning.strip())


def load_gsm8k(split: str = "test", data_dir: str | os.PathLike | None = None, source: str = "local",
               errors: str = "raise") -> list[Example]:
    """GSM8K (``train``: 7473, ``test``: 1319); ``answer`` is the number after ``####``."""
    rows = _hub("openai/gsm8k", "main", split) if source == "hub" else _jsonl(_root(data_dir) / "gsm8k" / f"{split}.jsonl")
    return _build(gsm8k_example, rows, errors)


# ----------------------------------------------------------------------------- MATH


def math_example(row: dict[str, Any], where: str, subject: str = "") -> Example:
    problem, solution = _field(row, "problem", where), _field(row, "solution", where)
    answer = row.get("answer") or extract_boxed(solution)
    if not answer:
        raise DatasetError(f"{where}: field 'solution' has no \\boxed{{}} answer")
    level = str(row.get("level", ""))
    return Example(problem, answer.strip(), solution, str(row.get("subject") or row.get("type") or subject),
                   level, id=str(row.get("unique_id", "")))


def load_math(split: str = "test", data_dir: str | os.PathLike | None = None, source: str = "local",
              subjects: tuple[str, ...] = MATH_SUBJECTS, errors: str = "raise") -> list[Example]:
    """MATH (Hendrycks et al. 2021): ``train`` 7500 / ``test`` 5000; ``answer`` from the solution's ``\\boxed{}``.

    Two original train rows (number_theory lines 662 and 664) have an empty ``\\boxed{}``:
    load the train split with ``errors="skip"``.
    """
    out = []
    for subject in subjects:
        rows = (_hub("EleutherAI/hendrycks_math", subject, split) if source == "hub"
                else _jsonl(_root(data_dir) / "math" / f"hendrycks_math_{subject}_{split}.json"))
        out += _build(math_example, rows, errors, subject)
    return out


def load_math500(data_dir: str | os.PathLike | None = None, source: str = "local", errors: str = "raise",
                 ) -> list[Example]:
    """The 500-problem MATH test subset of Lightman et al. (2023), "Let's verify step by step"."""
    rows = _hub("HuggingFaceH4/MATH-500", None, "test") if source == "hub" else _jsonl(
        _root(data_dir) / "math" / "math500_test.jsonl")
    return _build(math_example, rows, errors)


# ----------------------------------------------------------------------------- MMLU


def mmlu_example(row: list[str], where: str, subject: str) -> Example:
    if len(row) != 6:
        raise DatasetError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
    answer = row[5].strip()
    if answer not in MMLU_LETTERS:
        raise DatasetError(f"{where}: field 'answer' must be one of A-D, got {answer!r}")
    return Example(row[0], answer, subject=subject, options=tuple(row[1:5]))


def load_mmlu(split: str = "test", data_dir: str | os.PathLike | None = None, source: str = "local",
              errors: str = "raise") -> list[Example]:
    """MMLU (57 subjects; splits ``dev``, ``val``, ``test``); ``answer`` is a letter A-D."""
    if source == "hub":
        hub = _hub("cais/mmlu", "all", {"val": "validation"}.get(split, split))
        rows = [(w, [r["question"], *r["choices"], MMLU_LETTERS[int(r["answer"])], r["subject"]]) for w, r in hub]
        return _build(lambda row, where: mmlu_example(row[:6], where, row[6]), rows, errors)
    out = []
    for path in sorted(_need(_root(data_dir) / "mmlu" / split).glob(f"*_{split}.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = [(f"{path}:{n}", row) for n, row in enumerate(csv.reader(f), 1)]
        out += _build(mmlu_example, rows, errors, path.name.removesuffix(f"_{split}.csv"))
    return out


# ----------------------------------------------------------------------------- instruction following, safety


def alpaca_example(row: dict[str, Any], where: str) -> Example:
    return Example(_field(row, "instruction", where), row.get("output", ""),
                   meta={"generator": row.get("generator", ""), "dataset": row.get("dataset", "")})


def load_alpaca_eval(data_dir: str | os.PathLike | None = None, source: str = "local", errors: str = "raise",
                     ) -> list[Example]:
    """AlpacaEval's 805 instructions; ``answer`` is the reference output (``meta``: generator, dataset)."""
    rows = _hub("tatsu-lab/alpaca_eval", "alpaca_eval", "eval") if source == "hub" else _jsonl(
        _root(data_dir) / "alpaca_eval" / "alpaca_eval.jsonl")
    return _build(alpaca_example, rows, errors)


def sst_example(row: dict[str, Any], where: str) -> Example:
    question = _field(row, "prompts_final" if "prompts_final" in row else "prompt", where)
    return Example(question, "", id=str(row.get("id", "")), subject=str(row.get("harm_area", "")),
                   meta={"category": row.get("category", "")})


def load_simple_safety_tests(data_dir: str | os.PathLike | None = None, source: str = "local",
                             errors: str = "raise") -> list[Example]:
    """SimpleSafetyTests (Vidgen et al. 2023): 100 harmful prompts; no reference answer."""
    if source == "hub":
        return _build(sst_example, _hub("Bertievidgen/SimpleSafetyTests", None, "test"), errors)
    path = _need(_root(data_dir) / "simple_safety_tests" / "simple_safety_tests.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = [(f"{path}:{n}", r) for n, r in enumerate(csv.DictReader(f), 2)]
    return _build(sst_example, rows, errors)


LOADERS = {
    "gsm8k": lambda split, **kw: load_gsm8k(split or "test", **kw),
    "math": lambda split, **kw: load_math(split or "test", **kw),
    "math500": lambda split, **kw: load_math500(**kw),
    "mmlu": lambda split, **kw: load_mmlu(split or "test", **kw),
    "alpaca_eval": lambda split, **kw: load_alpaca_eval(**kw),
    "simple_safety_tests": lambda split, **kw: load_simple_safety_tests(**kw),
}


def load_dataset(name: str, split: str | None = None, **kw: Any) -> list[Example]:
    """Load one of :data:`LOADERS` by name (what the ``evaluate`` command uses)."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(LOADERS)}")
    return LOADERS[name](split, **kw)
