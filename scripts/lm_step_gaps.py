"""Where a training step's GPU waits: kernel gaps of one `bench_lm.py` variant, phase by phase.

Runs a variant's step (see ``scripts/bench_lm.py``) under ``torch.profiler``, with each phase of the
step (forward, loss, backward, clip, optimizer, zero_grad) in a ``record_function`` range, and
reads the kernel timeline from the exported trace. For each profiled step (started from an idle
GPU, as ``bench_lm.py`` times it) it reports the time from the host's step start to the last
kernel's end, the kernel time (union of kernel intervals), and the idle time split into: before
the first kernel, gaps under 5 us (launch-to-launch spacing of back-to-back kernels) and longer
gaps, each longer gap charged to the phase whose range launched the kernel after it. The longest
gaps are listed with the kernels on either side, and the kernels by phase and time.

    python scripts/bench_lm.py ...   # first: the variant names
    python scripts/lm_step_gaps.py --variants hf-compiled ours-compiled-fused-tritonce --out gaps.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import torch
from bench_lm import make_variant
from cs336_basics.config import PRESETS

PHASES = ("forward", "loss", "backward", "clip", "optimizer", "zero_grad")
SHORT_GAP_US = 5.0


def make_step(name: str, cfg, device, batch_size: int):
    model, opt, loss_fn, clip_fn = make_variant(name, cfg, device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), device=device, generator=g)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    rf = torch.profiler.record_function

    def step():
        with rf("step"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if loss_fn is None:
                    with rf("phase:forward"):
                        loss = model(x, targets=y)
                else:
                    with rf("phase:forward"):
                        logits = model(x)
                    with rf("phase:loss"):
                        loss = loss_fn(logits, y)
            with rf("phase:backward"):
                loss.backward()
            with rf("phase:clip"):
                clip_fn(model.parameters(), 1.0)
            with rf("phase:optimizer"):
                opt.step()
            with rf("phase:zero_grad"):
                opt.zero_grad(set_to_none=True)

    return step


def gap_report(trace: dict, n_steps: int) -> dict:
    """Per-step idle accounting from a chrome trace (see the module docstring)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"] == "step"),
                   key=lambda e: e["ts"])[-n_steps:]
    phases = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("phase:")]
    # which phase launched each kernel: the phase range (host) holding the timestamp of the runtime
    # (cudaLaunch*/cuLaunch*) event with the kernel's correlation id
    launches = {e["args"].get("correlation"): e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}

    def phase_of(kernel) -> str:
        t = launches.get(kernel["args"].get("correlation"))
        for p in phases:
            if t is not None and p["ts"] <= t <= p["ts"] + p["dur"]:
                return p["name"][6:]
        return "other"

    per_step = []
    for s in steps:
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        ks = [k for k in kernels if launches.get(k["args"].get("correlation"), -1) >= t0
              and launches.get(k["args"].get("correlation"), float("inf")) <= t1]
        if not ks:
            continue
        busy, short, long_gaps, end = 0.0, 0.0, defaultdict(float), ks[0]["ts"]
        gaps = []
        phase = [phase_of(k) for k in ks]
        by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])  # (phase, name) -> [us, calls]
        for k, ph in zip(ks, phase):
            entry = by_kernel[(ph, k["name"][:80])]
            entry[0] += k["dur"]
            entry[1] += 1
        for prev, k, ph in zip([None, *ks[:-1]], ks, phase):
            start, stop = k["ts"], k["ts"] + k["dur"]
            if prev is not None and start > end:
                gap = start - end
                if gap < SHORT_GAP_US:
                    short += gap
                else:
                    long_gaps[ph] += gap
                    gaps.append((gap, prev["name"][:60], k["name"][:60], ph))
            busy += max(0.0, stop - max(start, end))
            end = max(end, stop)
        per_step.append({
            "host_start_to_gpu_end_ms": (end - t0) / 1e3, "kernel_ms": busy / 1e3,
            "before_first_kernel_ms": (ks[0]["ts"] - t0) / 1e3, "short_gaps_ms": short / 1e3,
            "long_gaps_ms_by_phase": {p: round(v / 1e3, 3) for p, v in sorted(long_gaps.items(), key=lambda kv: -kv[1])},
            "kernels": len(ks),
            "kernel_ms_by_phase": {ph: round(sum(v[0] for (p2, _), v in by_kernel.items() if p2 == ph) / 1e3, 3)
                                   for ph in (*PHASES, "other")},
            "top_kernels": [{"phase": ph, "name": nm, "us": round(v[0], 1), "calls": v[1]}
                            for (ph, nm), v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:40]],
            "longest_gaps": [{"us": round(g, 1), "after": a, "before": b, "phase": p}
                             for g, a, b, p in sorted(gaps, reverse=True)[:8]],
        })
    return {"steps": per_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    cfg = PRESETS["tinystories-17m"]
    results = {}
    for name in args.variants:
        step = make_step(name, cfg, device, args.batch_size)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                torch.cuda.synchronize()
                step()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                results[name] = gap_report(json.load(f), args.steps)
        last = results[name]["steps"][-1] if results[name]["steps"] else {}
        print(json.dumps({"variant": name, **{k: (round(v, 3) if isinstance(v, float) else v)
                                              for k, v in last.items() if k not in ("longest_gaps", "top_kernels")}}),
              flush=True)
        for g in last.get("longest_gaps", []):
            print("   ", json.dumps(g), flush=True)
        del step
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
