"""Training throughput of our Transformer LM + AdamW vs transformers' LlamaForCausalLM + fused AdamW.

Same shape (the ``tinystories-17m`` preset: d_model 512, 4 layers, 16 heads, d_ff 1344, context
256, vocab 10K), same batch (128), bf16 autocast, TF32 on, same step (forward, loss, backward,
clip to norm 1, optimizer step, zero_grad), measured in one process, one after the other.

Variants ``{impl}-{mode}[-{optimizer}[-{loss}[-{ops}[-{attn}[-{proj}]]]]]``:
- impl ``ours``: ``cs336_basics.model.TransformerLM`` (attention backend ``sdpa``) and our
  ``clip_grad_norm``; optimizer ``foreach`` (our ``AdamW(fused=False)``, multi-tensor
  ``torch._foreach_*``) or ``fused`` (our ``AdamW(fused=True)``, one Triton kernel per step); loss
  ``torchce`` (``cross_entropy_torch``, PyTorch ops; default) or ``tritonce`` (the Triton kernels of
  ``fused_cross_entropy``, called on the logits, outside the compiled model) or ``modelce``
  (``model(x, targets=y)``: the same Triton loss inside the model, so inside its compiled graph; what
  ``cs336-basics train`` runs in eager mode) or ``headce`` (``model(x, targets=y)`` with
  ``model.FUSED_LM_HEAD``: LM head and loss as one op, ``fused_cross_entropy.linear_cross_entropy``;
  what ``cs336-basics train --compile`` runs); ops ``torchops`` (eager:
  ``model.FUSED_KERNELS = False``, RMSNorm, RoPE and SwiGLU's gate in PyTorch ops; compiled:
  inductor fuses all of those; default) or ``tritonops`` (eager: their Triton kernels
  ``fused_rmsnorm``/``fused_rope``/``fused_swiglu``; compiled: the kernels of
  ``model.COMPILED_KERNELS``, i.e. our RoPE and SwiGLU-gate operators, inductor the rest; both what
  the model runs on CUDA) or ``tritonrope`` (compiled: only the RoPE operator, as before the
  gate's); attn ``sdpa`` (PyTorch's SDPA, its default backend: cuDNN on Hopper; default) or ``flash``
  (our Triton FlashAttention-2 of ``cs336_systems``, ``triton_op`` operators that inductor launches;
  RoPE applied inside its kernels) or ``flashsep`` (the same with RoPE as its own kernels first) or
  ``flash2p`` (RoPE as its own kernels and the two-pass backward, ``SHORT_SEQ_MAX = 0``); proj
  ``fusedproj`` (one [q; k; v] and one [W1; W3] matmul, ``fuse_projections``; default) or
  ``sepproj`` (one matmul per projection, as the HF model).
- impl ``hf``: ``LlamaForCausalLM`` (``attn_implementation="sdpa"``, same initial weights), the loss
  it uses internally (``F.cross_entropy`` on fp32 logits), ``torch.nn.utils.clip_grad_norm_`` and
  ``torch.optim.AdamW(fused=True)``.
- mode ``compiled`` = ``torch.compile`` of the model, and of the loss function where it is PyTorch
  ops (not the Triton one); optimizers are not compiled.
- mode ``graphed`` = ``compiled`` with ``mode="reduce-overhead"`` (CUDA graphs over the compiled
  forward and backward; not yet measured), e.g. ``--variants hf-graphed ours-graphed-fused-tritonce``.

Each variant: warm-up steps (compilation included) excluded, then ``--steps`` timed steps, each
timed with ``torch.cuda.synchronize()``; median reported. ``--rounds R`` adds R-1 interleaved passes
over the variants (A B C A B C ...), so that a machine whose speed drifts during the run (the eager
steps are host-bound) affects all variants alike. Then ``--profile-steps`` steps under
``torch.profiler``: GPU kernel time per step (the rest of the step is the GPU waiting for the
host) and the top kernels. MFU = tokens/s × FLOPs/token / 989e12 (H100 SXM dense bf16),
FLOPs/token = 6·N + 12·L·C·T (N = matmul parameters, LM head included, input embedding excluded;
see ``cs336_basics.train``). Also times the optimizer step alone (``--opt-bench``): ours foreach,
ours fused and torch's fused AdamW on the 17M model's parameters and on 8 layers of the course's
2.7B model (839M parameters), with the peak memory the step adds.

    python scripts/bench_lm.py --out bench.json           # on one GPU
    python scripts/bench_lm.py --quick                     # HF eager vs ours eager, kernels off and on
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
from cs336_basics import model as cs336_model
from cs336_basics.config import PRESETS
from cs336_basics.fused_cross_entropy import cross_entropy as triton_cross_entropy
from cs336_basics.nn_utils import clip_grad_norm, cross_entropy_torch
from cs336_basics.optimizer import AdamW
from cs336_basics.train import build_model, flops_per_token, peak_flops

DEFAULT_COMPILED_KERNELS = frozenset(cs336_model.COMPILED_KERNELS)
COURSE_TOKENS = 327_680_000  # the course's TinyStories budget: 10,000 steps x 128 x 256
DEFAULT_VARIANTS = ["hf-eager", "ours-eager-foreach", "ours-eager-fused-tritonce",
                    "ours-eager-fused-tritonce-tritonops", "hf-compiled", "ours-compiled-foreach",
                    "ours-compiled-fused", "ours-compiled-fused-tritonce"]
QUICK_VARIANTS = ["hf-eager", "ours-eager-fused-tritonce", "ours-eager-fused-tritonce-tritonops"]


def make_variant(name: str, cfg, device):
    """(model, optimizer, loss_fn, clip_fn, set_globals) for a variant name (see the module docstring)."""
    impl, mode, *rest = name.split("-")
    defaults = ["foreach", "torchce", "torchops", "sdpa", "fusedproj"]
    opt_impl, loss_impl, ops_impl, attn, proj = (rest + defaults[len(rest):])[:5]
    assert impl in ("ours", "hf") and mode in ("eager", "compiled", "graphed"), name
    assert opt_impl in ("foreach", "fused") and loss_impl in ("torchce", "tritonce", "modelce", "headce"), name
    assert impl == "ours" or loss_impl == "torchce", name
    assert ops_impl in ("torchops", "tritonops", "tritonrope"), name
    assert attn in ("sdpa", "flash", "flashsep", "flash2p") and (impl == "ours" or attn == "sdpa"), name
    assert proj in ("fusedproj", "sepproj") and (impl == "ours" or proj == "fusedproj"), name

    def set_globals():
        """The module globals the variant runs with: read at every forward (eager) or trace (compiled,
        guarded by dynamo), so set again before each of its timed passes (``--rounds``: the other
        variants set theirs in between). Compiled, only the kernels in COMPILED_KERNELS replace
        inductor's fusion, and True keeps the fused LM head + loss of headce."""
        cs336_model.FUSED_KERNELS = ops_impl != "torchops" or mode != "eager"
        cs336_model.COMPILED_KERNELS = {"tritonops": set(DEFAULT_COMPILED_KERNELS), "tritonrope": {"fused_rope"}}.get(
            ops_impl, set())
        cs336_model.FUSED_LM_HEAD = loss_impl == "headce"  # modelce: the head GEMM + Triton loss, also compiled
        if attn.startswith("flash"):  # read when the op bodies are traced (compiled) or called (eager)
            from cs336_systems import flash_attention

            flash_attention.SHORT_SEQ_MAX = 0 if attn == "flash2p" else 256

    set_globals()
    torch.manual_seed(0)
    attn_backend = "flash" if attn.startswith("flash") else attn
    model = build_model(cfg.replace(model_impl="cs336" if impl == "ours" else "hf-llama", attn_backend=attn_backend),
                        device)
    if attn in ("flashsep", "flash2p"):  # RoPE as its own kernels before FlashAttention, not inside its kernels
        for module in model.modules():
            if hasattr(module, "attn_applies_rope"):
                module.attn_applies_rope = False
    for module in model.modules():
        if hasattr(module, "fuse_projections"):
            module.fuse_projections = proj == "fusedproj"
    kw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    if impl == "ours":
        opt = AdamW(model.parameters(), fused=opt_impl == "fused", **kw)
        loss_fn = {"tritonce": triton_cross_entropy, "torchce": cross_entropy_torch}.get(loss_impl)  # None: in the model
        clip_fn = clip_grad_norm
    else:
        opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
        loss_fn = lambda logits, y: F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        clip_fn = torch.nn.utils.clip_grad_norm_
    if mode in ("compiled", "graphed"):  # model and (PyTorch-ops) loss, for both sides
        # graphed: inductor's CUDA graphs replay the model's forward and backward (no launch gaps)
        model = torch.compile(model, mode="reduce-overhead" if mode == "graphed" else "default")
        if loss_fn is not triton_cross_entropy and loss_fn is not None:
            loss_fn = torch.compile(loss_fn)
    return model, opt, loss_fn, clip_fn, set_globals


def profile_steps(step_fn, steps: int, top: int = 25) -> dict:
    """GPU kernel time per step and the ``top`` kernels by total time, under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    total_us = sum(e.self_device_time_total for e in kernels)
    return {"gpu_ms_per_step": round(total_us / steps / 1e3, 2),
            "top_kernels": [{"name": e.key[:120], "ms_per_step": round(e.self_device_time_total / steps / 1e3, 3),
                             "calls_per_step": e.count // steps} for e in kernels[:top]]}


def summarize(row: dict, times: list[float], peak: float | None) -> None:
    """Set the time-derived fields of ``row`` from the step times (seconds) measured so far."""
    step_s = statistics.median(times)
    tok_s = row["_tokens"] / step_s
    row.update({
        "step_ms": round(1e3 * step_s, 2), "tok_s": round(tok_s),
        "mfu": round(tok_s * row["_fpt"] / peak, 4) if peak else None,
        "course_budget_min": round(COURSE_TOKENS / tok_s / 60, 1),
        "step_ms_min": round(1e3 * min(times), 2), "step_ms_max": round(1e3 * max(times), 2),
        "timed_steps": len(times), "times_ms": [round(1e3 * t, 2) for t in times], "_times": times,
    })


def bench_variant(name, cfg, device, batch_size, warmup, steps, prof_steps) -> dict:
    model, opt, loss_fn, clip_fn, set_globals = make_variant(name, cfg, device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), device=device, generator=g)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # graphed: a new iteration (outputs of the last may be reused)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, targets=y) if loss_fn is None else loss_fn(model(x), y)
        loss.backward()
        clip_fn(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def timed(n: int, untimed: int = 0) -> tuple[list[float], torch.Tensor]:
        """Seconds of each of ``n`` steps, each started and ended with a synchronize, after ``untimed``
        steps (a later round: the other variants ran in between); the last loss."""
        set_globals()
        for _ in range(untimed):
            step()
        out = []
        for _ in range(n):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = step()
            torch.cuda.synchronize(device)
            out.append(time.perf_counter() - t0)
        return out, loss

    torch.cuda.reset_peak_memory_stats(device)
    losses = []
    t_first = time.perf_counter()
    for _ in range(warmup):
        losses.append(step().item())
    warm_s = time.perf_counter() - t_first
    times, last_loss = timed(steps)
    losses.append(last_loss.item())  # after warm-up + steps
    raw = getattr(model, "_orig_mod", model)
    row = {
        "variant": name, "warmup_s": round(warm_s, 1), "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4), "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2),
        "_fpt": flops_per_token(cfg, raw), "_tokens": batch_size * cfg.context_length,
    }
    summarize(row, times, peak_flops(device, "bf16"))
    row["_timed"] = timed  # more rounds (--rounds), removed before the JSON is written
    print(json.dumps({k: v for k, v in public(row).items() if k != "times_ms"}), flush=True)
    if prof_steps:
        try:
            row["profile"] = profile_steps(step, prof_steps)
        except Exception as e:  # noqa: BLE001 (a profiler problem must not lose the timings)
            row["profile"] = {"error": repr(e)}
    return row


def bench_optimizer(shapes: list[tuple[int, ...]], label: str, device, iters: int = 20) -> list[dict]:
    """The optimizer step alone over fp32 parameters of ``shapes`` with fixed random gradients:
    median time (CUDA events) and the peak memory it adds above parameters, grads and states."""
    rows = []
    for impl in ("ours-foreach", "ours-fused", "torch-fused"):
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        kw = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}
        opt = (torch.optim.AdamW(params, fused=True, **kw) if impl == "torch-fused"
               else AdamW(params, fused=impl == "ours-fused", **kw))
        opt.step()  # states allocated (and kernels compiled) outside the measurement
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        n = sum(p.numel() for p in params)
        ms = statistics.median(times)
        rows.append({"params": label, "n_params": n, "impl": impl, "step_ms": round(ms, 3),
                     "gb_per_s_at_28_bytes_per_param": round(28 * n / ms / 1e6, 1),
                     "extra_peak_gb": round((torch.cuda.max_memory_allocated(device) - base) / 1e9, 3)})
        print(json.dumps(rows[-1]), flush=True)
        del params, opt
        torch.cuda.empty_cache()
    return rows


def public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    ap.add_argument("--quick", action="store_true",
                    help=f"only {' '.join(QUICK_VARIANTS)} (unless --variants) and no optimizer benchmark")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1,
                    help="R > 1: after the first pass over the variants, R-1 more passes of --steps timed steps "
                         "each, variants interleaved (A B A B ...), so that drift of the machine over the run "
                         "hits all variants alike; the median is over all timed steps (the variants stay in memory)")
    ap.add_argument("--profile-steps", type=int, default=3, help="0: no profile")
    ap.add_argument("--opt-bench", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cfg = PRESETS["tinystories-17m"].replace(attn_backend="sdpa")
    print(f"{torch.cuda.get_device_name(device)} | torch {torch.__version__} | batch {args.batch_size} x "
          f"{cfg.context_length} | FLOPs/token {flops_per_token(cfg, build_model(cfg, 'meta')) / 1e6:.1f}M", flush=True)
    opt_rows = []
    if args.opt_bench and not args.quick:
        model_shapes = [tuple(p.shape) for p in build_model(cfg, "meta").parameters()]
        d, f = 2560, 10240  # 8 of the 32 layers of the course's 2.7B model
        big_shapes = [(d, d)] * 4 * 8 + [(f, d), (d, f), (f, d)] * 8 + [(d,)] * 2 * 8
        opt_rows = (bench_optimizer(model_shapes, "tinystories-17m", device)
                    + bench_optimizer(big_shapes, "2.7B x 8 layers", device))
    rows = []
    for v in args.variants or (QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS):
        try:
            rows.append(bench_variant(v, cfg, device, args.batch_size, args.warmup, args.steps, args.profile_steps))
        except Exception as e:  # noqa: BLE001 (one broken variant must not lose the others)
            rows.append({"variant": v, "error": repr(e)})
            print(json.dumps(rows[-1]), flush=True)
        if args.rounds == 1:
            rows[-1].pop("_timed", None)
            gc.collect()
            torch.cuda.empty_cache()
    peak = peak_flops(device, "bf16")
    for r in range(1, args.rounds):
        for row in rows:
            if "_timed" in row:
                summarize(row, row["_times"] + row["_timed"](args.steps, untimed=2)[0], peak)
                print(json.dumps({"round": r + 1, **{k: row[k] for k in ("variant", "step_ms", "step_ms_min")}}),
                      flush=True)
    rows = [public(r) for r in rows]
    by = {r["variant"]: r for r in rows if "error" not in r}
    ratios = {f"{a}/{b}": round(by[a]["tok_s"] / by[b]["tok_s"], 3)
              for a in by if a.startswith("ours") for b in by if b.startswith("hf")}
    for a in by:  # the Triton model kernels against the same variant in PyTorch ops
        b = a.removesuffix("-tritonops")
        if b != a and b in by:
            ratios[f"{a}/{b}"] = round(by[a]["tok_s"] / by[b]["tok_s"], 3)
    print(json.dumps({"ratios": ratios}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "batch_size": args.batch_size, "rows": rows, "ratios": ratios, "optimizer": opt_rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
