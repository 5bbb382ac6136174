"""Generation speed of `cs336_basics.generate` (tokens/s), on whatever device is given.

For the ``tinystories-17m`` shape (random weights: speed does not depend on them) it times
``generate_samples`` from a 3-token prompt for 1 and 8 samples: with the KV cache, the projections
concatenated into one matmul or run apart (``fuse_projections``), and without the cache (every
token reruns the whole window: the cost the cache removes). Warm-up excluded; median of
``--repeats`` runs; one process, so the rows compare.

    uv run python scripts/bench_generate.py --out generate.json              # CPU
    PYTHONPATH=assignment1 python3 scripts/bench_generate.py --device cuda --out generate.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from cs336_basics.config import PRESETS
from cs336_basics.generate import generate_samples
from cs336_basics.model import MultiHeadSelfAttention, SwiGLU, TransformerLM

VARIANTS = {  # name: (fuse_projections, use_kv_cache)
    "cache, projections apart": (False, True),
    "cache, projections fused": (True, True),
    "no cache": (False, False),
}


def time_one(lm: TransformerLM, samples: int, tokens: int, fuse: bool, cache: bool, repeats: int, device) -> float:
    """Median seconds of one ``generate_samples`` call."""
    MultiHeadSelfAttention.fuse_projections = SwiGLU.fuse_projections = fuse
    run = lambda n: generate_samples(lm, [1, 2, 3], n, samples, generator=torch.Generator(device).manual_seed(0),
                                     use_kv_cache=cache)
    run(4)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = run(tokens)
        times.append(time.perf_counter() - t)  # (the tokens are read back: the device is done)
        assert all(len(s) == tokens for s in out)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tinystories-17m")
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per sample (within the 256 context)")
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    lm = TransformerLM(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff,
                       cfg.rope_theta, attn_backend="sdpa", device=device).eval()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    header = (f"{args.preset} | {device}{gpu}, {torch.get_num_threads()} CPU threads | torch {torch.__version__} | "
              f"{args.tokens} new tokens per sample")
    print(header)
    print("| variant | samples | ms per step | tokens/s |\n|---|---:|---:|---:|")
    rows = []
    for samples in args.samples:
        for name, (fuse, cache) in VARIANTS.items():
            sec = time_one(lm, samples, args.tokens, fuse, cache, args.repeats, device)
            row = {"variant": name, "samples": samples, "ms_per_step": round(1e3 * sec / args.tokens, 3),
                   "tokens_per_s": round(samples * args.tokens / sec, 1)}
            rows.append(row)
            print(f"| {name} | {samples} | {row['ms_per_step']:.2f} | {row['tokens_per_s']:,.0f} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
