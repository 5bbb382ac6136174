"""Zero-shot evaluation: any model x {MATH, MATH500, GSM8K, MMLU} x prompt, and generation for judges.

    cs336-alignment evaluate --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dataset gsm8k math500 --prompt r1_zero chat --out runs/eval
    cs336-alignment evaluate --model MODEL --dataset alpaca_eval simple_safety_tests --prompt chat --out runs/gen

For every (dataset, prompt) pair it writes ``<dataset>.<prompt>.jsonl`` (one line per example:
prompt, output, gold answer, parsed answer, rewards, outcome) and ``<dataset>.<prompt>.summary.json``:
accuracy, format rate, mean output length, wall time and the counts by outcome the CS336
handout asks for (format 1 & answer 1 / format 1 & answer 0 / format 0 & answer 0).

Prompts: ``r1_zero`` (graded by the R1-Zero reward: ``</think> <answer>…</answer>``),
``question_only`` and ``chat`` (the model's chat template, with a "put the answer in
\\boxed{}" instruction for math): graded on the last ``\\boxed{}`` or number. MMLU is graded on
the option letter. AlpacaEval and SimpleSafetyTests have no grader here: their outputs are
written in the formats the external judges read (AlpacaEval's annotator JSON; SST JSONL).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cs336_alignment import grading
from cs336_alignment.datasets import Example, load_dataset
from cs336_alignment.prompts import BOXED_INSTRUCTION, apply_chat_template, format_prompt

GRADED = ("gsm8k", "math", "math500", "mmlu")
JUDGED = ("alpaca_eval", "simple_safety_tests")


def question_text(dataset: str, ex: Example, prompt: str) -> str:
    """The question as the model sees it inside the template (MMLU lists its options)."""
    if dataset == "mmlu":
        options = "\n".join(f"{letter}. {opt}" for letter, opt in zip(grading.MMLU_LETTERS, ex.options))
        return (f"Answer the following multiple choice question about {ex.subject.replace('_', ' ')}. "
                f"Respond with the letter of the correct answer.\n\nQuestion: {ex.question}\n{options}")
    if prompt == "chat" and dataset in GRADED:
        return f"{ex.question}\n{BOXED_INSTRUCTION}"
    return ex.question


def build_prompt(tokenizer: Any, dataset: str, ex: Example, prompt: str) -> str:
    text = question_text(dataset, ex, prompt)
    return apply_chat_template(tokenizer, text) if prompt == "chat" else format_prompt(prompt, text)


def grader(dataset: str, prompt: str) -> Callable[[Example, str], dict[str, Any]]:
    """``(example, output) -> {"format_reward", "answer_reward", "reward", "parsed"}`` for this pair."""
    if dataset == "mmlu":
        def grade_mmlu(ex: Example, output: str) -> dict[str, Any]:
            text = grading.extract_r1_zero_answer(output) if prompt == "r1_zero" else output
            parsed = grading.parse_mmlu_response(ex, text) if text is not None else None
            ok = float(parsed == ex.answer)
            return {"format_reward": float(parsed is not None), "answer_reward": ok, "reward": ok, "parsed": parsed}
        return grade_mmlu
    if prompt == "r1_zero":
        def grade_r1(ex: Example, output: str) -> dict[str, Any]:
            return {**grading.r1_zero_reward_fn(output, ex.answer), "parsed": grading.extract_r1_zero_answer(output)}
        return grade_r1

    def grade_free(ex: Example, output: str) -> dict[str, Any]:
        return {**grading.question_only_reward_fn(output, ex.answer), "parsed": grading.extract_final_answer(output)}
    return grade_free


def _grade_one(job: tuple[str, str, Example, str]) -> dict[str, Any]:
    dataset, prompt, ex, output = job
    return grader(dataset, prompt)(ex, output)


def grade_all(dataset: str, prompt: str, examples: list[Example], outputs: list[str], workers: int = 1,
              ) -> list[dict[str, Any]]:
    """Grade in ``workers`` processes (math-verify is CPU-bound; its timeouts need a main thread)."""
    jobs = [(dataset, prompt, ex, out) for ex, out in zip(examples, outputs)]
    if workers <= 1 or len(jobs) < 64:
        return [_grade_one(j) for j in tqdm(jobs, desc="grading", unit="ex")]
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # children never touch CUDA
        return list(tqdm(pool.imap(_grade_one, jobs, chunksize=16), total=len(jobs), desc="grading", unit="ex"))


def outcome(rewards: dict[str, Any]) -> str:
    if rewards["format_reward"] and rewards["answer_reward"]:
        return "correct"
    return "wrong_answer" if rewards["format_reward"] else "bad_format"


def summarize(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    n = len(records)
    counts = Counter(r["outcome"] for r in records)
    return {
        "examples": n,
        "accuracy": sum(r["answer_reward"] for r in records) / n if n else 0.0,
        "format_rate": sum(r["format_reward"] for r in records) / n if n else 0.0,
        "mean_output_tokens": sum(r["output_tokens"] for r in records) / n if n else 0.0,
        "counts": {"format1_answer1": counts["correct"], "format1_answer0": counts["wrong_answer"],
                   "format0_answer0": counts["bad_format"]},
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
        "wall_s": round(seconds, 2),
    }


def evaluate(engine: Any, tokenizer: Any, dataset: str, examples: list[Example], prompt: str, params: Any,
             out_dir: Path, batch: int = 1024, grade_workers: int = 1) -> dict[str, Any]:
    """Generate for every example, grade (or just record, for judged sets), write JSONL + summary."""
    start = time.perf_counter()
    prompts = [build_prompt(tokenizer, dataset, ex, prompt) for ex in examples]
    outputs = []
    for s in tqdm(range(0, len(prompts), batch), desc=f"{dataset}/{prompt}", unit="batch"):
        outputs += [cs[0] for cs in engine.generate(prompts[s:s + batch], params)]
    gen_s = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{dataset}.{prompt}"
    if dataset in JUDGED:
        return write_for_judge(dataset, examples, prompts, outputs, stem, gen_s)
    graded = grade_all(dataset, prompt, examples, [c.text for c in outputs], grade_workers)
    records = []
    for ex, p, c, rewards in zip(examples, prompts, outputs, graded):
        records.append({"question": ex.question, "prompt": p, "output": c.text, "answer": ex.answer, **rewards,
                        "outcome": outcome(rewards), "output_tokens": len(c.token_ids),
                        "finish_reason": c.finish_reason})
    summary = {"dataset": dataset, "prompt": prompt, **summarize(records, time.perf_counter() - start),
               "generation_s": round(gen_s, 2)}
    with open(f"{stem}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    Path(f"{stem}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_for_judge(dataset: str, examples: list[Example], prompts: list[str], outputs: list[Any], stem: Path,
                    gen_s: float) -> dict[str, Any]:
    """AlpacaEval: a JSON list of {instruction, output, generator, dataset}; SST: JSONL {prompts_final, output}."""
    if dataset == "alpaca_eval":
        rows = [{"instruction": ex.question, "output": c.text, "generator": "cs336", "dataset": ex.meta.get("dataset", "")}
                for ex, c in zip(examples, outputs)]
        Path(f"{stem}.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        with open(f"{stem}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": ex.id, "prompts_final": ex.question, "output": c.text}, ensure_ascii=False) + "\n" for ex, c in zip(examples, outputs))
    summary = {"dataset": dataset, "examples": len(examples), "generation_s": round(gen_s, 2),
               "mean_output_tokens": sum(len(c.token_ids) for c in outputs) / max(1, len(outputs))}
    Path(f"{stem}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def cli_main(argv: list[str] | None = None) -> int:
    from cs336_alignment.models import load_policy
    from cs336_alignment.rollout import SamplingParams, make_engine

    ap = argparse.ArgumentParser(prog="cs336-alignment evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF directory, .gguf file or cs336_basics checkpoint")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory of a cs336_basics checkpoint")
    ap.add_argument("--dataset", nargs="+", default=["math500"], choices=GRADED + JUDGED)
    ap.add_argument("--split", default=None, help="split for gsm8k/math/mmlu (default: test)")
    ap.add_argument("--prompt", nargs="+", default=["r1_zero"], choices=["r1_zero", "question_only", "chat"])
    ap.add_argument("--limit", type=int, default=None, help="first N examples of each dataset")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch-size", type=int, default=1024)
    ap.add_argument("--backend", default="builtin", choices=["builtin", "vllm"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--grade-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=Path("runs/eval"))
    args = ap.parse_args(argv)

    policy = load_policy(args.model, device=args.device, tokenizer=args.tokenizer)
    kw = {"max_batch_size": args.max_batch_size} if args.backend == "builtin" else {}
    engine = make_engine(policy, args.backend, **kw)
    for dataset in args.dataset:
        examples = load_dataset(dataset, args.split)[:args.limit]
        for prompt in args.prompt:
            # r1_zero stops after the answer tag; "</answer>" is kept in the output for the grader
            stop = ("</answer>",) if prompt == "r1_zero" else ()
            params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, stop=stop, seed=args.seed)
            summary = evaluate(engine, policy.tokenizer, dataset, examples, prompt, params, args.out,
                               batch=args.max_batch_size, grade_workers=args.grade_workers)
            print(json.dumps(summary), flush=True)
    return 0
