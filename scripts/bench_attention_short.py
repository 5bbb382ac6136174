"""Attention at the tinystories-17m shape on one GPU: where the per-step attention time goes and
what the short-sequence kernels (the one-launch backward, the whole-sequence forward) and RoPE inside
the kernels save.

Shape: bf16, causal, 16 heads of d = 32, B*T = 32,768 tokens (the course's batch 128 x context 256),
q/k/v as ``(B, H, T, D)`` views of ``(B, T, H, D)`` buffers, as the model makes them. Times are the
median of ``triton.testing.do_bench`` for one attention layer (the model has 4).

* ``kernels``: the tiled forward, the two-pass backward (``flash_bwd``), the one-launch backward
  (``flash_kernels_short``) and, up to T = 256, the whole-sequence forward (``flash_kernels_whole``),
  autotuned, at T = 128..1024 (B = 32768 / T, then B = 1; B = 1 rows time the launch more than the kernel).
* ``configs``: at T = 256, every tile config of the short-sequence kernels forced in turn.
* ``rope``: at T = 256, the RoPE kernels of ``fused_rope`` (q and k, forward and backward) against
  the kernels with RoPE applied inside them.
* ``inductor``: whether a config's register cap survives ``torch.compile`` (eager vs compiled operator).
* ``layer``: at T = 256, forward + backward through autograd of RoPE + attention: SDPA with our RoPE
  kernels, FlashAttention (two-pass, short) with them, short with RoPE inside after the tiled or the
  whole-sequence forward; plus the bf16 errors of each against float64.
* ``ab`` (with ``--baseline-short FILE``): at T = 256, the one-launch backward of this tree against
  another version of ``flash_kernels_short.py`` (e.g. from an earlier commit) in the same process,
  every candidate config forced, without and with RoPE inside, the two timed alternately.

    PYTHONPATH=assignment1:assignment2 python3 scripts/bench_attention_short.py --out short.json
    git show 113d70a:assignment2/cs336_systems/flash_kernels_short.py > /tmp/short_old.py
    PYTHONPATH=assignment1:assignment2 python3 scripts/bench_attention_short.py ab --baseline-short /tmp/short_old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics

import torch

H, D, TOKENS = 16, 32, 32768
DEVICE = "cuda"  # (the 'ab' table also runs on CPU under TRITON_INTERPRET=1, at a small TOKENS: a smoke test)


def make_qkv(t: int, grad: bool = False, b: int | None = None) -> tuple[torch.Tensor, ...]:
    b = b or TOKENS // t
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    return tuple(torch.randn(b, t, H, D, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(grad)
                 for _ in range(3))


def rope_tables(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernels' ``rope`` argument for ``q`` (B, H, T, D): positions 0..T-1 as (B, H, T), and the
    model's cos/sin tables (T, D/2)."""
    from cs336_basics.model import RotaryPositionalEmbedding

    t = q.shape[-2]
    rope = RotaryPositionalEmbedding(10000.0, D, t, device=q.device)
    return torch.arange(t, device=q.device).expand(q.shape[:-1]), rope.cos, rope.sin


def bench(fn, warmup=25, rep=100) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep)


def kernel_row(fk, fs, fw, t: int, b: int | None = None) -> dict:
    q, k, v = make_qkv(t, b=b)
    o, L = fk.flash_fwd(q, k, v, True)
    do = torch.randn_like(o)
    row = {"T": t, "B": q.shape[0],
           "fwd_ms": bench(lambda: fk.flash_fwd(q, k, v, True)),
           "bwd_two_pass_ms": bench(lambda: fk.flash_bwd(q, k, v, o, L, do, True)),
           "bwd_short_ms": bench(lambda: fs.flash_bwd_short(q, k, v, o, L, do, True)),
           "fwd_whole_ms": None}
    if t <= 256:  # (longer: the resident tiles outgrow the registers)
        row["fwd_whole_ms"] = bench(lambda: fw.flash_fwd_whole(q, k, v, True))
    return row


def kernels_table(fk, fs, fw, seqs) -> list[dict]:
    rows = []
    for t, b in [(t, None) for t in seqs] + [(t, 1) for t in seqs]:  # B = 1: 16 programs for the short one
        rows.append(row := kernel_row(fk, fs, fw, t, b))
        print(f"T={t:5d} B={row['B']:4d}  fwd {row['fwd_ms']:.4f} whole {row['fwd_whole_ms'] or 0:.4f}  "
              f"bwd two-pass {row['bwd_two_pass_ms']:.4f} short {row['bwd_short_ms']:.4f} ms", flush=True)
    return rows


def configs_table(fk, fs, fw, t=256) -> dict:
    """Every candidate config of the short-sequence kernels forced in turn, without and with RoPE inside,
    plus register-capped forward configs that are not in the forward's list (which serves long sequences too)."""
    q, k, v = make_qkv(t)
    tables = rope_tables(q)
    o, L = fk.flash_fwd(q, k, v, True)
    do = torch.randn_like(o)
    extra = {"fwd": [fk._cfg(128, 32, 4, 3, 168), fk._cfg(64, 64, 4, 3, 128), fk._cfg(64, 32, 4, 3, 128)]}
    out = {}
    for name, fn in (("fwd", lambda r: fk.flash_fwd(q, k, v, True, r)),
                     ("short", lambda r: fs.flash_bwd_short(q, k, v, o, L, do, True, r)),
                     ("fwd_whole", lambda r: fw.flash_fwd_whole(q, k, v, True, r))):
        out[name] = {}
        configs, candidates = fk._CONFIG_LISTS[name]
        for cfg in candidates(configs, D, torch.bfloat16) + extra.get(name, []):
            fk.FORCE_CONFIG[name] = cfg
            row = out[name][fk.config_name(cfg)] = {"ms": bench(lambda fn=fn: fn(None)), "rope_inside_ms": bench(lambda fn=fn: fn(tables))}
            print(f"{name:9s} {fk.config_name(cfg):18s} {row['ms']:.4f} ms, RoPE inside {row['rope_inside_ms']:.4f} ms",
                  flush=True)
        fk.FORCE_CONFIG.clear()
    out["autotuned"] = fk.best_configs()
    return out


def rope_table(fk, fs, fw, t=256) -> dict:
    from cs336_basics import fused_rope

    q, k, v = make_qkv(t)
    tables = rope_tables(q)
    o, L = fk.flash_fwd(q, k, v, True)
    do = torch.randn_like(o)
    row = {
        "rope_kernel_4_calls_ms": 4 * bench(lambda: fused_rope._rotated(q, *tables, 1.0)),
        "fwd_ms": bench(lambda: fk.flash_fwd(q, k, v, True)),
        "fwd_rope_inside_ms": bench(lambda: fk.flash_fwd(q, k, v, True, tables)),
        "bwd_short_ms": bench(lambda: fs.flash_bwd_short(q, k, v, o, L, do, True)),
        "bwd_short_rope_inside_ms": bench(lambda: fs.flash_bwd_short(q, k, v, o, L, do, True, tables)),
        "fwd_whole_ms": bench(lambda: fw.flash_fwd_whole(q, k, v, True)),
        "fwd_whole_rope_inside_ms": bench(lambda: fw.flash_fwd_whole(q, k, v, True, tables)),
    }
    for key, ms in row.items():
        print(f"{key:28s} {ms:.4f} ms", flush=True)
    return row


def inductor_table(fk, t=256) -> dict:
    """Does a register cap (``maxnreg``) survive torch.compile? The one-launch backward with RoPE inside,
    one config forced (so the traced op body launches that kernel with explicit options, no autotuner),
    timed eager and as the compiled operator."""
    from cs336_systems.flash_attention import flash_bwd_op

    q, k, v = make_qkv(t)
    tables = rope_tables(q)
    o, L, q, k = fk.flash_fwd(q, k, v, True, tables)  # (the backward takes them rotated)
    do = torch.randn_like(o)
    args = (q, k, v, o, L.view(q.shape[:-1]), do, True, *tables)
    out = {}
    for cfg in (fk._cfg(64, 64, 4, 3), fk._cfg(64, 64, 4, 3, 168)):
        fk.FORCE_CONFIG["short"] = cfg
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: flash_bwd_op(*a))
        row = out[fk.config_name(cfg)] = {"eager_ms": bench(lambda: flash_bwd_op(*args)),
                                          "compiled_ms": bench(lambda compiled=compiled: compiled(*args))}
        print(f"short {fk.config_name(cfg):16s} eager {row['eager_ms']:.4f} compiled {row['compiled_ms']:.4f} ms",
              flush=True)
    fk.FORCE_CONFIG.clear()
    return out


def layer_table(t=256) -> dict:
    from cs336_basics.model import RotaryPositionalEmbedding
    from cs336_systems import flash_attention as fa

    rope = RotaryPositionalEmbedding(10000.0, D, t, device="cuda")
    pos = torch.arange(t, device="cuda")
    q, k, v = make_qkv(t, grad=True)
    do = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(rope(q, pos), rope(k, pos), v, is_causal=True)

    def flash_rope_outside(q, k, v):
        return fa.flash_attn_mha(rope(q, pos), rope(k, pos), v, True)

    def flash_rope_inside(q, k, v):
        return fa.flash_attn_mha(q, k, v, True, rope=rope, positions=pos)

    whole_bytes = fa.WHOLE_SEQ_BYTES
    variants = {"sdpa + rope kernels": (sdpa, 0, 256), "flash two-pass + rope kernels": (flash_rope_outside, 0, 0),
                "flash short + rope kernels": (flash_rope_outside, 0, 256),
                "flash short, rope inside": (flash_rope_inside, 0, 256),
                "flash whole fwd + short, rope inside": (flash_rope_inside, 2**30, 256)}
    out, grads = {}, {}
    for name, (fn, whole_max, short_max) in variants.items():
        fa.WHOLE_SEQ_BYTES, fa.SHORT_SEQ_MAX = whole_max, short_max

        def step(fn=fn):
            for x in (q, k, v):
                x.grad = None
            (fn(q, k, v) * do).sum().backward()

        out[name] = bench(step)
        step()
        grads[name] = [x.grad.clone() for x in (q, k, v)]
        print(f"{name:30s} fwd+bwd {out[name]:.4f} ms", flush=True)
    fa.WHOLE_SEQ_BYTES, fa.SHORT_SEQ_MAX = whole_bytes, 256
    # errors in float64 on 8 heads' worth of batch
    qs, ks, vs = (x.detach()[:4].double().requires_grad_() for x in (q, k, v))
    rope64 = RotaryPositionalEmbedding(10000.0, D, t, device="cuda")

    def rot(x):
        c, s = rope64.cos[pos].double(), rope64.sin[pos].double()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)

    ref = torch.nn.functional.scaled_dot_product_attention(rot(qs), rot(ks), vs, is_causal=True)
    (ref * do[:4].double()).sum().backward()
    errs = {name: {n: ((g[i][:4].double() - r.grad).norm() / r.grad.norm()).item()
                   for i, (n, r) in enumerate(zip("qkv", (qs, ks, vs)))} for name, g in grads.items()}
    for name, e in errs.items():
        print(f"{name:30s} rel err dq {e['q']:.2e} dk {e['k']:.2e} dv {e['v']:.2e}", flush=True)
    return {"fwd_bwd_ms": out, "grad_rel_err_vs_fp64": errs}


def load_baseline(fk, path: str):
    """``path`` (a flash_kernels_short.py) as a module of its own. Importing it registers its launcher
    under the same name ("short") in ``fk``: that entry is put back, and the baseline is only run with
    a forced config (its own kernel, never the shared autotuner)."""
    saved = dict(fk._CONFIG_LISTS)
    spec = importlib.util.spec_from_file_location("baseline_flash_kernels_short", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fk._CONFIG_LISTS.clear()
    fk._CONFIG_LISTS.update(saved)
    return module


def ab_table(fk, fs, baseline, t=256, repeats=3) -> dict:
    """This tree's one-launch backward against ``baseline``'s, per forced config, without and with RoPE
    inside (rotated q, k from the forward, as the model runs it): medians of ``repeats`` alternating
    timings, the ratio new / baseline, and the largest difference between their gradients."""
    q, k, v = make_qkv(t)
    tables = rope_tables(q)
    o, L = fk.flash_fwd(q, k, v, True)
    o_r, L_r, q_r, k_r = fk.flash_fwd(q, k, v, True, tables)
    do = torch.randn_like(o)
    configs, candidates = fk._CONFIG_LISTS["short"]
    out = {}
    for cfg in candidates(configs, D, torch.bfloat16):
        fk.FORCE_CONFIG["short"] = cfg
        for rope_inside in (False, True):
            args = (q_r, k_r, v, o_r, L_r, do, True, tables) if rope_inside else (q, k, v, o, L, do, True)
            new = lambda args=args: fs.flash_bwd_short(*args)
            old = lambda args=args: baseline.flash_bwd_short(*args)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(new(), old(), strict=True))
            times = {"new": [], "baseline": []}
            for _ in range(repeats):
                times["new"].append(bench(new))
                times["baseline"].append(bench(old))
            row = {name: statistics.median(ts) for name, ts in times.items()}
            row |= {"ratio": row["new"] / row["baseline"], "max_abs_diff": diff, "times": times}
            out[f"{fk.config_name(cfg)}{' rope' if rope_inside else ''}"] = row
            print(f"short {fk.config_name(cfg):14s} {'RoPE inside' if rope_inside else 'no RoPE    '} "
                  f"new {row['new']:.4f} baseline {row['baseline']:.4f} ms  ratio {row['ratio']:.3f}  "
                  f"max |diff| {diff:.1e}", flush=True)
    fk.FORCE_CONFIG.clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="*", default=["kernels", "configs", "rope", "layer"])
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--out", default="bench_attention_short.json")
    ap.add_argument("--baseline-short", help="for 'ab': another flash_kernels_short.py to time against this tree's")
    args = ap.parse_args()
    if "ab" in args.what and not args.baseline_short:
        ap.error("'ab' needs --baseline-short FILE (e.g. git show REV:assignment2/cs336_systems/flash_kernels_short.py)")
    from cs336_systems import flash_kernels as fk
    from cs336_systems import flash_kernels_short as fs
    from cs336_systems import flash_kernels_whole as fw

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": {"H": H, "D": D, "tokens": TOKENS}}
    if "kernels" in args.what:
        results["kernels"] = kernels_table(fk, fs, fw, args.seqs)
    if "configs" in args.what:
        results["configs"] = configs_table(fk, fs, fw)
    if "rope" in args.what:
        results["rope"] = rope_table(fk, fs, fw)
    if "inductor" in args.what:
        results["inductor"] = inductor_table(fk)
    if "layer" in args.what:
        results["layer"] = layer_table()
    if "ab" in args.what:
        results["ab"] = ab_table(fk, fs, load_baseline(fk, args.baseline_short))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
