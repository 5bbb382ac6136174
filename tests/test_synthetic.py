"""The embedded corpus: deterministic, correct answers (recomputed independently), held-out split."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from cs336.synthetic import EOT, CorpusSpec, check_equations, generate, make_problem, write_corpus


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = write_corpus(tmp_path / "a", scale=0.05, seed=3)
    b = write_corpus(tmp_path / "b", scale=0.05, seed=3)
    write_corpus(tmp_path / "c", scale=0.05, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["corpus.txt"] != _digest(tmp_path / "c")["corpus.txt"]
    assert a["corpus_bytes"] == b["corpus_bytes"] > 10_000


def test_default_scale_is_a_few_megabytes():
    spec = CorpusSpec()
    data = generate(spec.scaled(0.1), seed=0)
    approx = sum(map(len, data["stories"])) + sum(len(p.pretraining_text()) for p in data["pretrain_problems"])
    # 10 % of the default scale -> 0.2..0.6 MB, so the default is 2..6 MB.
    assert 200_000 < approx < 600_000


def _recompute(question: str, kind: str) -> int:
    """Answer from the question text alone: numbers in order and the kind's operation."""
    nums = [int(x) for x in re.findall(r"\d+", question)]
    if kind == "add":
        assert len(nums) == 2
        return nums[0] + nums[1]
    if kind == "sub":
        assert len(nums) == 2
        return nums[0] - nums[1]
    assert kind == "two_step" and len(nums) == 3
    return nums[0] + nums[1] - nums[2]


@pytest.mark.parametrize("kinds", [("add",), ("sub",), ("two_step",), ("add", "sub", "two_step")])
def test_answers_are_correct(kinds):
    rng = random.Random(0)
    for _ in range(2000):
        p = make_problem(rng, max_operand=12, kinds=kinds)
        assert int(p.answer) == _recompute(p.question, p.kind) >= 0
        assert check_equations(p.reasoning)
        assert f"= {p.answer}" in p.reasoning  # the worked solution ends at the answer


def test_check_equations_catches_a_wrong_sum():
    assert check_equations("so 3 + 4 = 7.")
    assert not check_equations("so 3 + 4 = 8.")
    assert not check_equations("no equation here")


def test_files_and_r1_zero_rendering(tmp_path):
    info = write_corpus(tmp_path, scale=0.05, seed=0)
    corpus = Path(info["corpus"]).read_text(encoding="utf-8")
    valid = Path(info["corpus_valid"]).read_text(encoding="utf-8")
    docs, vdocs = corpus.split(EOT), valid.split(EOT)
    assert docs[-1] == vdocs[-1] == ""
    assert len(docs) + len(vdocs) - 2 == info["num_stories"] + info["num_pretrain_problems"]
    corpus += valid
    train = [json.loads(x) for x in Path(info["sft_train"]).read_text(encoding="utf-8").splitlines()]
    test = [json.loads(x) for x in Path(info["test"]).read_text(encoding="utf-8").splitlines()]
    assert len(test) == info["num_test_problems"] and len(train) == info["num_sft_problems"]
    # Held out: no test question appears among SFT questions or in the pretraining corpus.
    assert not {t["question"] for t in test} & {t["question"] for t in train}
    assert not any(f"Question: {t['question']}\n" in corpus for t in test)
    for row in train + test:
        resp = row["response"]
        assert re.fullmatch(r"[^<>]+ </think> <answer>\d+</answer>", resp), resp
        assert resp.endswith(f"<answer>{row['answer']}</answer>")
        assert int(row["answer"]) == _recompute(row["question"], row["kind"])
