"""The evaluate command: grading and summary on scripted outputs, and an end-to-end CLI run."""

import json

from cs336_alignment import evaluate
from cs336_alignment.datasets import Example
from cs336_alignment.models import Policy, gpt2_tokenizer, tiny_llama
from cs336_alignment.rollout import Completion, SamplingParams


class ScriptedEngine:
    """Answers each prompt with a fixed output (by position), like a rollout engine would."""

    def __init__(self, outputs):
        self.outputs = list(outputs)

    def generate(self, prompts, params):
        out, self.outputs = self.outputs[:len(prompts)], self.outputs[len(prompts):]
        return [[Completion(text, [0] * len(text.split()), [0.0] * len(text.split()), "stop")] for text in out]


def test_r1_zero_summary_counts_outcomes(tmp_path):
    examples = [Example("1+1?", "2"), Example("half?", "\\frac{1}{2}"), Example("3*3?", "9")]
    outputs = ["think </think> <answer>2</answer>", "think </think> <answer>0.7</answer>", "I think it is 9"]
    summary = evaluate.evaluate(ScriptedEngine(outputs), None, "math500", examples, "r1_zero",
                                SamplingParams(temperature=0.0), tmp_path)
    assert summary["accuracy"] == 1 / 3 and summary["format_rate"] == 2 / 3
    assert summary["counts"] == {"format1_answer1": 1, "format1_answer0": 1, "format0_answer0": 1}
    rows = [json.loads(line) for line in (tmp_path / "math500.r1_zero.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["correct", "wrong_answer", "bad_format"]
    assert rows[0]["prompt"].endswith("User: 1+1?\nAssistant: <think>") and rows[1]["parsed"] == "0.7"
    assert json.loads((tmp_path / "math500.r1_zero.summary.json").read_text())["examples"] == 3


def test_question_only_and_mmlu_grading_with_worker_processes(tmp_path):
    examples = [Example(f"{i}+0?", str(i)) for i in range(70)]
    outputs = [f"The answer is \\boxed{{{i}}}." if i % 2 else f"maybe {i + 1}" for i in range(70)]
    summary = evaluate.evaluate(ScriptedEngine(outputs), None, "gsm8k", examples, "question_only",
                                SamplingParams(temperature=0.0), tmp_path, batch=32, grade_workers=2)
    assert summary["accuracy"] == 0.5 and summary["format_rate"] == 1.0
    mmlu = [Example("Which?", "B", subject="virology", options=("1", "2", "3", "4"))]
    text = evaluate.question_text("mmlu", mmlu[0], "question_only")
    assert "A. 1\nB. 2\nC. 3\nD. 4" in text
    summary = evaluate.evaluate(ScriptedEngine(["The answer is B"]), None, "mmlu", mmlu, "question_only",
                                SamplingParams(temperature=0.0), tmp_path)
    assert summary["accuracy"] == 1.0


def test_judged_sets_are_written_for_the_judge(tmp_path):
    examples = [Example("Write a haiku.", "ref", meta={"dataset": "helpful_base"})]
    evaluate.evaluate(ScriptedEngine(["Leaves fall"]), None, "alpaca_eval", examples, "question_only",
                      SamplingParams(temperature=0.0), tmp_path)
    rows = json.loads((tmp_path / "alpaca_eval.question_only.json").read_text())
    assert rows == [{"instruction": "Write a haiku.", "output": "Leaves fall", "generator": "cs336",
                     "dataset": "helpful_base"}]


def test_cli_end_to_end_on_a_saved_tiny_model(tmp_path):
    tok = gpt2_tokenizer()
    Policy(tiny_llama(len(tok)), tok).save(tmp_path / "model")
    rc = evaluate.cli_main(["--model", str(tmp_path / "model"), "--dataset", "gsm8k", "--prompt", "r1_zero",
                            "question_only", "--limit", "3", "--max-new-tokens", "4", "--device", "cpu",
                            "--out", str(tmp_path / "eval")])
    assert rc == 0
    for prompt in ("r1_zero", "question_only"):
        summary = json.loads((tmp_path / "eval" / f"gsm8k.{prompt}.summary.json").read_text())
        assert summary["examples"] == 3 and summary["mean_output_tokens"] <= 4
