"""Grader tests: equivalent answer forms, wrong answers, broken formats, parsers on tricky outputs."""

import threading

import pytest
from cs336_alignment import grading


def r1(answer: str, reasoning: str = "Some reasoning.") -> str:
    return f"{reasoning} </think> <answer>{answer}</answer>"


@pytest.mark.parametrize(
    "prediction, truth",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "\\frac12"),
        ("$\\dfrac{3}{4}$", "0.75"),
        ("The answer is 10.", "10"),
        ("18.00", "18"),
        ("1,000", "1000"),
        ("18", "\\$18"),
        ("5", "5\\text{ cm}"),
        ("Evelyn", "\\text{Evelyn}"),
        ("(1, 2)", "(1,2)"),
        ("[0,1)", "[0,1)"),
        ("1+x^2", "x^2+1"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("\\infty", "\\infty"),
    ],
)
def test_equivalent_forms_are_rewarded(prediction, truth):
    assert grading.answers_equivalent(prediction, truth)
    assert grading.r1_zero_reward_fn(r1(prediction), truth) == {
        "format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0,
    }


@pytest.mark.parametrize(
    "prediction, truth",
    [("4", "3"), ("3.14159", "\\pi"), ("-5", "5"), ("(1,2]", "(1,2)"), ("\\frac{1}{3}", "0.5"), ("", "10"),
     ("Alice", "\\text{Evelyn}")],
)
def test_wrong_answers_get_format_but_no_answer_reward(prediction, truth):
    assert not grading.answers_equivalent(prediction, truth)
    assert grading.r1_zero_reward_fn(r1(prediction), truth) == {
        "format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0,
    }


@pytest.mark.parametrize(
    "response",
    [
        "",
        "The answer is 7.",
        "reasoning <answer>7</answer>",  # no </think>
        "reasoning </think> 7",  # no answer tags
        "reasoning </think> <answer>7",  # unclosed
        "reasoning </think> </answer>7<answer>",  # reversed
    ],
)
def test_malformed_format_gets_nothing(response):
    assert grading.r1_zero_reward_fn(response, "7") == {
        "format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0,
    }


def test_r1_zero_multiline_and_boxed_answer():
    response = "Let x = 2.\nThen 2x = 4.</think>\n<answer>\nSo $\\boxed{4}$.\n</answer>"
    assert grading.r1_zero_reward_fn(response, "4")["reward"] == 1.0


def test_grading_works_outside_the_main_thread():
    # math-verify's signal.alarm timeout raises in threads; our wrapper must grade there too.
    results = []
    thread = threading.Thread(target=lambda: results.append(grading.r1_zero_reward_fn(r1("0.5"), "\\frac{1}{2}")))
    thread.start()
    thread.join()
    assert results == [{"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}]


def test_extract_boxed_balances_braces():
    assert grading.extract_boxed("so \\boxed{\\frac{1}{2}} and finally \\boxed{\\sqrt{3}}.") == "\\sqrt{3}"
    assert grading.extract_boxed("\\boxed{unclosed") is None
    assert grading.extract_boxed("no box") is None


def test_question_only_reward_uses_boxed_then_last_number():
    assert grading.question_only_reward_fn("It is \\boxed{\\frac{1}{2}}.", "0.5")["reward"] == 1.0
    assert grading.question_only_reward_fn("We get 3 apples, then 12.", "12")["reward"] == 1.0
    assert grading.question_only_reward_fn("no idea", "12")["format_reward"] == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May. 48+24 = 72. The answer is 72", "72"),
        ("It costs $1,234.50 in total.", "1234.50"),
        ("The temperature fell to -3 degrees.", "-3"),
        ("So 5 apples. Final answer: 12.", "12"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_parse_gsm8k_response(text, expected):
    assert grading.parse_gsm8k_response(text) == expected


MMLU_EXAMPLE = {
    "subject": "virology",
    "question": "How many human polyomaviruses are known at present?",
    "options": ["100", "1", "10", "unknown"],
    "answer": "A",
}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The correct answer is B. Because...", "B"),
        ("Answer: (C)", "C"),
        ("D", "D"),
        ("(A) 100 is right", "A"),
        ("I think it is unknown.", "D"),  # quotes exactly one option
        ("A virus is a small thing.", None),  # "A" used as an article, no option quoted
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_parse_mmlu_response(text, expected):
    assert grading.parse_mmlu_response(MMLU_EXAMPLE, text) == expected


def test_adapters_route_to_the_parsers():
    from .adapters import run_parse_gsm8k_response, run_parse_mmlu_response  # the spec's test API

    assert run_parse_gsm8k_response("so 3 + 4 = 7") == "7"
    assert run_parse_mmlu_response(MMLU_EXAMPLE, "The answer is C") == "C"
