"""Throughput of the training program itself (``cs336-basics train``), not of a bare step.

``bench_lm.py`` times one step on a fixed on-device batch. A user's run also samples batches from
a memory-mapped file, copies them to the GPU, logs a line per step and evaluates. This script runs
the real CLI for ``--steps`` steps on random tokens (no download) for each variant, one process
each, and reports the median in-loop tokens/s of ``metrics.jsonl`` after ``--skip`` steps (the
warm-up and compilation), next to the step time that implies.

Variants: ``ours`` (``--attn-backend`` auto: our FlashAttention on CUDA), ``ours-sdpa``, ``hf``
(transformers' Llama + ``torch.optim.AdamW(fused=True)``); with ``--baseline-tree DIR`` (a folder
holding another version's ``cs336_basics``, e.g. from ``git archive``), each variant also runs with
that version's training loop, alternating with this tree's. This tree's runs also profile 20 steps
(``--profile-steps``, steps 10-29, before the median's window): the device-busy ms per step inside
the loop, against the loop's own step time, says how long the GPU waits for the host.

    PYTHONPATH=assignment1:assignment2 python3 scripts/bench_train_loop.py --out train_loop.json
    mkdir -p /tmp/old && git archive HEAD~3 assignment1 | tar -x -C /tmp/old
    PYTHONPATH=assignment1:assignment2 python3 scripts/bench_train_loop.py \\
        --baseline-tree /tmp/old/assignment1 --out train_loop.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from cs336_basics.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ours": [],
    "ours-sdpa": ["--attn-backend", "sdpa"],
    "hf": ["--model-impl", "hf-llama", "--optimizer-impl", "torch-fused"],
}


def write_tokens(path: Path, n: int, vocab: int, seed: int) -> str:
    np.random.default_rng(seed).integers(0, vocab, n, dtype=np.uint16).tofile(path)
    Path(f"{path}.json").write_text(json.dumps({"dtype": "uint16", "num_tokens": n}))
    return str(path)


def run_one(tree: Path, extra: list[str], data: tuple[str, str], out_dir: Path, args, profile_steps: int) -> dict:
    """One ``cs336-basics train`` process with ``tree``'s cs336_basics first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(REPO / "assignment2"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "cs336_basics.train", "--preset", args.preset, "--train-data", data[0],
           "--val-data", data[1], "--max-steps", str(args.steps), "--eval-interval", str(10 * args.steps),
           "--eval-batches", "2", "--checkpoint-interval", "0", "--out-dir", str(out_dir), "--overwrite", *extra]
    if args.compile:
        cmd.append("--compile")
    if profile_steps:  # steps 10.. (before --skip): how busy the device is inside the loop
        cmd += ["--profile-steps", str(profile_steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    tok_s = [r["tok_s"] for r in rows if "tok_s" in r and r["step"] >= args.skip]
    header = next((x for x in proc.stdout.splitlines() if x.startswith("git ")), "")
    fields = [p.strip() for p in header.split("|")]  # the run's header names its attention backend (older trees: "?")
    attention = next((f.removeprefix("attention ") for f in fields if f.startswith("attention ")), "?")
    median = statistics.median(tok_s)
    preset = PRESETS[args.preset]
    profile = next((r["profile"] for r in rows if "profile" in r), {})
    return {"tok_s_median": round(median), "step_ms": round(1e3 * preset.batch_size * preset.context_length / median, 2),
            "tok_s_p10": round(float(np.percentile(tok_s, 10))), "logged_steps": len(tok_s), "attention": attention,
            "device_busy_ms": profile.get("device_busy_ms_per_step")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--preset", default="tinystories-17m")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip", type=int, default=50, help="steps left out of the median (warm-up)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--profile-steps", type=int, default=20,
                    help="steps profiled from step 10 (this tree only: older loops lack the option); 0: none")
    ap.add_argument("--baseline-tree", help="a folder holding another version's cs336_basics package")
    ap.add_argument("--out", default="train_loop.json")
    args = ap.parse_args()
    if args.skip >= args.steps:
        ap.error(f"--skip {args.skip} leaves no step of --steps {args.steps} to time")
    trees = {"this": REPO / "assignment1"}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
        if not (trees["baseline"] / "cs336_basics" / "train.py").is_file():
            ap.error(f"{trees['baseline']} holds no cs336_basics/train.py")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = PRESETS[args.preset].vocab_size
        data = (write_tokens(tmp / "train.bin", 2_000_000, vocab, 0), write_tokens(tmp / "val.bin", 100_000, vocab, 1))
        for variant in args.variants:
            for tree_name, tree in trees.items():  # alternating, so drift hits both alike
                prof = args.profile_steps if tree_name == "this" else 0
                r = run_one(tree, VARIANTS[variant], data, tmp / f"{variant}-{tree_name}", args, prof)
                rows.append({"variant": variant, "tree": tree_name, **r})
                print(f"{variant:<10} {tree_name:<9} {r['tok_s_median']:>11,} tok/s  {r['step_ms']:>7.2f} ms/step  "
                      f"(p10 {r['tok_s_p10']:,})  attention {r['attention']}"
                      + (f"  device busy {r['device_busy_ms']:.2f} ms/step (profiled)" if r["device_busy_ms"] else ""),
                      flush=True)
    by = {(r["variant"], r["tree"]): r["tok_s_median"] for r in rows}
    ratios = {f"{v}/hf ({t})": round(by[(v, t)] / by[("hf", t)], 3)
              for v in args.variants for t in trees if v != "hf" and ("hf", t) in by}
    ratios |= {f"{v}: this/baseline": round(by[(v, "this")] / by[(v, "baseline")], 3)
               for v in args.variants if (v, "baseline") in by}
    for k, v in ratios.items():
        print(f"{k:<28} {v:.3f}")
    Path(args.out).write_text(json.dumps({"preset": args.preset, "steps": args.steps, "skip": args.skip,
                                          "compile": args.compile, "rows": rows, "ratios": ratios}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
