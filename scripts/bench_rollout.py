"""Rollout throughput: our engine vs `transformers` ``generate``, same prompts, same call.

    python scripts/bench_rollout.py --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompts 256 --n 8 --max-new-tokens 512 --out runs/bench_rollout.json

256 GSM8K test questions in the r1_zero prompt, ``n`` samples each at temperature 1, up to
``max_new_tokens`` new tokens (EOS ends a sample; no stop strings, so both do the same work).
Generated tokens count every sampled token up to and including EOS. Both sides run after a
short warm-up; ``generate`` runs in chunks of ``--hf-prompts`` prompts x n samples, and stops
after ``--hf-budget-s`` seconds (its rate is then measured on the chunks done). First, a greedy
check: our tokens vs ``generate``'s on a few prompts (bf16 may part ways after near-ties).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from cs336_alignment.datasets import load_gsm8k
from cs336_alignment.models import load_policy
from cs336_alignment.prompts import format_prompt
from cs336_alignment.rollout import RolloutEngine, SamplingParams


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_generate(policy, prompts: list[str], n: int, max_new_tokens: int, temperature: float) -> list[list[int]]:
    """``generate`` on left-padded prompts; returns each sample's tokens up to and including EOS."""
    tok = policy.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
    kw = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
    out = policy.model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    rows = []
    for row in out[:, enc.input_ids.shape[1]:].tolist():
        rows.append(row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-batch-size", type=int, default=2048)
    ap.add_argument("--hf-prompts", type=int, default=256, help="prompts per generate() call (x n rows)")
    ap.add_argument("--hf-budget-s", type=float, default=240.0)
    ap.add_argument("--check-prompts", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.model == "random-smollm":  # SmolLM2-135M's shapes, random weights, GPT-2's tokenizer (no files)
        from cs336_alignment.models import Policy, gpt2_tokenizer, tiny_llama

        tok = gpt2_tokenizer()
        model = tiny_llama(len(tok), hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                           intermediate_size=1536, max_position_embeddings=8192, tie_word_embeddings=True)
        policy = Policy(model.to("cuda", torch.bfloat16), tok)
    else:
        policy = load_policy(args.model)
    load_s = time.perf_counter() - t0
    prompts = [format_prompt("r1_zero", ex.question) for ex in load_gsm8k("test")[:args.prompts]]
    engine = RolloutEngine(policy, max_batch_size=args.max_batch_size)
    result: dict = {"model": args.model, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "dtype": str(policy.dtype), "load_s": round(load_s, 1), "prompts": len(prompts), "n": args.n,
                    "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}

    # Greedy agreement with generate (also the warm-up of both).
    check = prompts[:args.check_prompts]
    ours = [c[0].token_ids for c in engine.generate(check, SamplingParams(temperature=0.0, max_new_tokens=64))]
    ref = hf_generate(policy, check, 1, 64, 0.0)
    same_prefix = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), min(len(o), len(r)))
                   for o, r in zip(ours, ref)]
    result["greedy_check"] = {"prompts": len(check), "identical": sum(o == r for o, r in zip(ours, ref)),
                              "mean_common_prefix_tokens": sum(same_prefix) / len(check)}
    print("greedy check:", result["greedy_check"], flush=True)

    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, n=args.n, seed=0)
    sync()
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync()
    ours_s = time.perf_counter() - t
    ours_tokens = sum(len(c.token_ids) for cs in outs for c in cs)
    result["ours"] = {"seconds": round(ours_s, 2), "generated_tokens": ours_tokens,
                      "tokens_per_s": round(ours_tokens / ours_s), "max_batch_size": args.max_batch_size,
                      "mean_len": ours_tokens / (len(prompts) * args.n),
                      "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None}
    print("ours:", result["ours"], flush=True)

    del engine, outs  # give generate the memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    hf_tokens, hf_s, done = 0, 0.0, 0
    for s in range(0, len(prompts), args.hf_prompts):
        sync()
        t = time.perf_counter()
        rows = hf_generate(policy, prompts[s:s + args.hf_prompts], args.n, args.max_new_tokens, args.temperature)
        sync()
        hf_s += time.perf_counter() - t
        hf_tokens += sum(len(r) for r in rows)
        done += len(rows) // args.n
        print(f"generate: {done}/{len(prompts)} prompts, {hf_tokens} tokens, {hf_s:.1f}s", flush=True)
        if hf_s > args.hf_budget_s:
            break
    result["transformers_generate"] = {"seconds": round(hf_s, 2), "generated_tokens": hf_tokens,
                                       "tokens_per_s": round(hf_tokens / hf_s), "prompts_done": done,
                                       "rows_per_call": args.hf_prompts * args.n,
                                       "mean_len": hf_tokens / (done * args.n)}
    result["speedup"] = round(result["ours"]["tokens_per_s"] / result["transformers_generate"]["tokens_per_s"], 1)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
