"""Training throughput of our Transformer LM + AdamW vs transformers' LlamaForCausalLM + fused AdamW.

Same shape (the ``tinystories-17m`` preset: d_model 512, 4 layers, 16 heads, d_ff 1344, context
256, vocab 10K), same batch (128), bf16 autocast, TF32 on, same step (forward, loss, backward,
clip to norm 1, optimizer step, zero_grad), measured in one process, one after the other.

- ours: ``cs336_basics.model.TransformerLM`` (attention backend ``sdpa``), our ``cross_entropy``,
  ``clip_grad_norm`` and ``AdamW`` (multi-tensor).
- HF: ``LlamaForCausalLM`` (``attn_implementation="sdpa"``, same initial weights), the loss it uses
  internally (``F.cross_entropy`` on fp32 logits), ``torch.nn.utils.clip_grad_norm_`` and
  ``torch.optim.AdamW(fused=True)``.

Each variant: warm-up steps (compilation included) excluded, then ``--steps`` timed steps, each
timed with ``torch.cuda.synchronize()``; median reported. "compiled" = ``torch.compile`` of the
model and of the loss function, on both sides; the optimizers are not compiled. MFU = tokens/s × FLOPs/token / 989e12
(H100 SXM dense bf16), FLOPs/token = 6·N + 12·L·C·T (N = matmul parameters, LM head included,
input embedding excluded; see ``cs336_basics.train``).

    python scripts/bench_lm.py --out bench.json           # on one GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from cs336_basics.config import PRESETS
from cs336_basics.nn_utils import clip_grad_norm, cross_entropy
from cs336_basics.optimizer import AdamW
from cs336_basics.train import build_model, flops_per_token, peak_flops

COURSE_TOKENS = 327_680_000  # the course's TinyStories budget: 10,000 steps x 128 x 256


def make_variant(name: str, cfg, device):
    """(model, optimizer, loss_fn, clip_fn) for ``ours-eager``, ``ours-compiled``, ``hf-eager``, ``hf-compiled``."""
    impl, mode = name.split("-")
    torch.manual_seed(0)
    model = build_model(cfg.replace(model_impl="cs336" if impl == "ours" else "hf-llama"), device)
    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    if impl == "ours":
        opt = AdamW(model.parameters(), **kw)
        loss_fn, clip_fn = cross_entropy, clip_grad_norm
    else:
        opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
        loss_fn = lambda logits, y: F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        clip_fn = torch.nn.utils.clip_grad_norm_
    if mode == "compiled":  # model and loss, for both sides
        model, loss_fn = torch.compile(model), torch.compile(loss_fn)
    return model, opt, loss_fn, clip_fn


def bench_variant(name, cfg, device, batch_size, warmup, steps) -> dict:
    model, opt, loss_fn, clip_fn = make_variant(name, cfg, device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), device=device, generator=g)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    t_first = time.perf_counter()
    for i in range(warmup + steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        clip_fn(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        if i == warmup - 1:
            warm_s = time.perf_counter() - t_first
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = statistics.median(times)
    tokens = batch_size * cfg.context_length
    raw = getattr(model, "_orig_mod", model)
    fpt = flops_per_token(cfg, raw)
    peak = peak_flops(device, "bf16")
    tok_s = tokens / step_s
    row = {
        "variant": name, "step_ms": round(1e3 * step_s, 2), "tok_s": round(tok_s),
        "mfu": round(tok_s * fpt / peak, 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
        "warmup_s": round(warm_s, 1), "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "course_budget_min": round(COURSE_TOKENS / tok_s / 60, 1),
        "step_ms_min": round(1e3 * min(times), 2), "step_ms_max": round(1e3 * max(times), 2),
    }
    print(json.dumps(row), flush=True)
    del model, opt
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["hf-eager", "ours-eager", "ours-compiled", "hf-compiled"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = PRESETS["tinystories-17m"].replace(attn_backend="sdpa")
    print(f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | batch {args.batch_size} x "
          f"{cfg.context_length} | FLOPs/token {flops_per_token(cfg, build_model(cfg, 'meta')) / 1e6:.1f}M", flush=True)
    rows = [bench_variant(v, cfg, device, args.batch_size, args.warmup, args.steps) for v in args.variants]
    by = {r["variant"]: r for r in rows}
    ratios = {f"{a}/{b}": round(by[a]["tok_s"] / by[b]["tok_s"], 3)
              for a in by if a.startswith("ours") for b in by if b.startswith("hf")}
    print(json.dumps({"ratios": ratios}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "batch_size": args.batch_size, "rows": rows, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
