"""Loaders on the real shared data, and clear errors for malformed rows."""

import json

import pytest
from cs336_alignment import datasets
from cs336_alignment.prompts import apply_chat_template, format_prompt, load_prompt


def test_real_datasets_load_with_expected_sizes():
    gsm = datasets.load_gsm8k("test")
    assert len(gsm) == 1319 and gsm[0].answer == "18" and "####" not in gsm[0].solution
    math500 = datasets.load_math500()
    assert len(math500) == 500 and math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    math = datasets.load_math("test")
    assert len(math) == 5000 and all(ex.answer for ex in math)
    assert math[0]["problem"] == math[0].question  # dict-style access, "problem" alias
    mmlu = datasets.load_mmlu("dev")
    assert len(mmlu) == 57 * 5 and all(ex.answer in "ABCD" and len(ex.options) == 4 for ex in mmlu)
    assert len(datasets.load_alpaca_eval()) == 805
    sst = datasets.load_simple_safety_tests()
    assert len(sst) == 100 and sst[0].id == "sst_001"


def test_math_train_has_two_empty_boxed_rows_reported_by_line(caplog):
    with pytest.raises(datasets.DatasetError, match=r"number_theory_train\.json:662: field 'solution'"):
        datasets.load_math("train", subjects=("number_theory",))
    rows = datasets.load_math("train", subjects=("number_theory",), errors="skip")
    assert len(rows) == 867 and "664" in caplog.text


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "q"}', r":2: missing or empty field 'answer'"),
        ('{"question": "q", "answer": "no final"}', r":2: field 'answer' has no '#### <number>'"),
        ("{not json", r":2: not valid JSON"),
        ("[1, 2]", r":2: expected a JSON object"),
    ],
)
def test_malformed_gsm8k_rows_name_line_and_field(tmp_path, line, message):
    (tmp_path / "gsm8k").mkdir()
    good = json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"})
    (tmp_path / "gsm8k" / "test.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(datasets.DatasetError, match=message):
        datasets.load_gsm8k("test", data_dir=tmp_path)
    assert [ex.answer for ex in datasets.load_gsm8k("test", data_dir=tmp_path, errors="skip")] == ["2"]


def test_malformed_mmlu_rows(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text('q,a,b,c,d,A\n"q2",a,b,c,d,E\n')
    with pytest.raises(datasets.DatasetError, match=r"x_test\.csv:2: field 'answer' must be one of A-D"):
        datasets.load_mmlu("test", data_dir=tmp_path)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("q,a,b,c\n")
    with pytest.raises(datasets.DatasetError, match=r":1: expected 6 columns"):
        datasets.load_mmlu("test", data_dir=tmp_path)


def test_missing_file_and_unknown_names(tmp_path):
    with pytest.raises(datasets.DatasetError, match="not found"):
        datasets.load_gsm8k("test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load_dataset("nope")
    with pytest.raises(ValueError, match="unknown prompt"):
        load_prompt("nope")


def test_prompts_keep_latex_braces_and_end_where_the_model_continues():
    r1 = format_prompt("r1_zero", "What is $\\frac{1}{2}$ of {x}?")
    assert "User: What is $\\frac{1}{2}$ of {x}?\n" in r1 and r1.endswith("Assistant: <think>")
    assert format_prompt("question_only", "2+2?") == "2+2?"
    alpaca = format_prompt("alpaca", "Say hi.")
    assert "### Instruction:\nSay hi.\n" in alpaca and alpaca.endswith("### Response:\n")
    assert format_prompt("alpaca", "Say hi.", "Hi!").endswith("### Response:\nHi!")


def test_chat_template_needs_one():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(NoTemplate(), "hi")
