"""Benchmark and profile the ``cs336_basics`` Transformer LM at the course's model sizes.

Times forward, backward and the optimizer step of the unchanged ``cs336_basics.model.TransformerLM``
(with ``cs336_basics.optimizer.AdamW`` and ``cs336_basics.nn_utils.cross_entropy``) over a sweep of
sizes x context lengths x modes x autocast dtypes x compile modes x attention backends:

- warm-up steps run first and are excluded; each phase is timed with CUDA events (``perf_counter``
  on the CPU) and every step ends with a device synchronization; mean +- std over measured steps;
- peak memory per phase (``torch.cuda.max_memory_allocated`` reset before each phase);
- MFU per row from the FLOP formula in :func:`forward_flops`;
- a row that runs out of memory is reported as ``OOM`` and the sweep goes on;
- options: bf16 autocast, ``torch.compile`` (per block or whole model), attention backend,
  activation checkpointing (applied here, by wrapping each block's forward);
- ``--nvtx`` (NVTX ranges for ``nsys``), ``--profile`` (PyTorch profiler trace + top-kernels
  table), ``--memory`` (CUDA memory snapshot + memory-timeline PNG).

Output: a markdown table on stdout, ``benchmark.json`` and ``benchmark.png`` in ``--out``.

    cs336-systems benchmark --size small medium --dtype fp32 bf16 --compile none blocks
    cs336-systems benchmark --size 2.7B --context-length 128 256 512 --mode forward train --memory
    cs336-systems benchmark --size tiny --device cpu --steps 3          # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import json
import pickle
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cs336_systems.model_sizes import (
    FLOP_FORMULA,
    MODEL_SIZES,
    ROPE_THETA,
    VOCAB_SIZE,
    canonical_size,
    forward_flops,
    peak_flops,
)
from cs336_systems.nvtx import annotate_modules, annotated_attention, nvtx_range

MODES = ("forward", "forward-backward", "train")  # forward: inference (no_grad); train: + AdamW
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("none", "blocks", "model")  # blocks: each TransformerBlock compiled, code reused
ATTN_BACKENDS = ("math", "sdpa", "flash")
PHASES = ("forward", "backward", "optimizer")


def _check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class BenchConfig:
    """One row of the benchmark: what is built and how it is timed."""

    size: str = "small"  # a key of MODEL_SIZES
    context_length: int = 512
    batch_size: int = 4
    mode: str = "train"  # forward | forward-backward | train
    dtype: str = "fp32"  # autocast dtype of the forward (parameters and optimizer stay fp32)
    compile: str = "none"  # none | blocks | model
    compile_backend: str = (
        "inductor"  # torch.compile backend ("aot_eager" tests the plumbing cheaply)
    )
    attn_backend: str = "math"  # math | sdpa | flash (passed to TransformerLM)
    checkpoint: bool = False  # activation checkpointing of every TransformerBlock
    warmup: int = 3  # steps run before timing, excluded from every statistic
    steps: int = 10  # measured steps
    device: str = dataclasses.field(
        default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu"
    )
    seed: int = 0
    nvtx: bool = False  # NVTX ranges per submodule + annotated attention (breaks compiled graphs)

    def __post_init__(self) -> None:
        _check_choice("model size", self.size, tuple(MODEL_SIZES))
        _check_choice("mode", self.mode, MODES)
        _check_choice("dtype", self.dtype, tuple(AUTOCAST_DTYPES))
        _check_choice("compile mode", self.compile, COMPILE_MODES)
        _check_choice("attention backend", self.attn_backend, ATTN_BACKENDS)
        for name in ("context_length", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.mode == "forward" and self.checkpoint:
            raise ValueError("activation checkpointing needs a backward pass; use --mode train")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for but CUDA is not available; use --device cpu")
        if MODEL_SIZES[self.size].d_model % MODEL_SIZES[self.size].num_heads:
            raise ValueError(f"size {self.size}: d_model not divisible by num_heads")

    @property
    def tag(self) -> str:
        """A file-name-safe label of the row."""
        parts = [
            self.size,
            f"ctx{self.context_length}",
            f"b{self.batch_size}",
            self.mode,
            self.dtype,
        ]
        parts += [f"compile-{self.compile}"] if self.compile != "none" else []
        parts += [self.attn_backend] if self.attn_backend != "math" else []
        parts += ["ckpt"] if self.checkpoint else []
        return "_".join(parts).replace(".", "p")


# ----------------------------------------------------------------------------- FLOPs and MFU


def step_flops(cfg: BenchConfig) -> int:
    per_forward = forward_flops(MODEL_SIZES[cfg.size], cfg.batch_size, cfg.context_length)
    return per_forward * {"forward": 1, "forward-backward": 3, "train": 3}[cfg.mode]


def matmul_dtype(cfg: BenchConfig) -> str:
    if cfg.dtype != "fp32":
        return cfg.dtype
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


# ----------------------------------------------------------------------------- timing helpers


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (call after :meth:`sync`)."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM raised by the allocator, or a RuntimeError from a library saying the same."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20


# ----------------------------------------------------------------------------- model set-up


def build_model(cfg: BenchConfig) -> nn.Module:
    """The unchanged ``cs336_basics`` LM at ``cfg.size``, built on ``cfg.device``."""
    from cs336_basics.model import TransformerLM

    s = MODEL_SIZES[cfg.size]
    backend: Any = (
        annotated_attention if cfg.nvtx and cfg.attn_backend == "math" else cfg.attn_backend
    )
    return TransformerLM(
        VOCAB_SIZE,
        cfg.context_length,
        s.d_model,
        s.num_layers,
        s.num_heads,
        s.d_ff,
        ROPE_THETA,
        attn_backend=backend,
        device=torch.device(cfg.device),
    )


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList of Transformer blocks")
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward: its forward runs under ``checkpoint``.

    Done by replacing the block instance's ``forward``, so the model class is untouched and the
    parameter names stay the same.
    """
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def prepare_model(model: nn.Module, cfg: BenchConfig) -> nn.Module:
    """Checkpointing, NVTX hooks and compilation, in that order; returns the module to call."""
    if cfg.checkpoint:
        apply_activation_checkpointing(model)
    if cfg.nvtx:
        annotate_modules(model)
    if cfg.compile == "blocks":
        for block in _blocks(model):
            block.compile(
                backend=cfg.compile_backend
            )  # same code and shapes in every block: compiled once, reused L times
    elif cfg.compile == "model":
        return torch.compile(model, backend=cfg.compile_backend)
    return model


# ----------------------------------------------------------------------------- the benchmark


ModelFactory = Callable[[BenchConfig], nn.Module]


def run_benchmark(
    cfg: BenchConfig,
    *,
    model_factory: ModelFactory = build_model,
    out_dir: Path | None = None,
    profile: bool = False,
    memory: bool = False,
    profile_steps: int = 2,
) -> dict[str, Any]:
    """Run one row; returns it as a flat dict. OOM gives ``status="OOM"``, never an exception."""
    row: dict[str, Any] = {**dataclasses.asdict(cfg), "status": "ok"}
    recording = False
    try:
        recording = _run(cfg, row, model_factory, out_dir, profile, memory, profile_steps)
    except Exception as exc:  # noqa: BLE001 - one failed row must not end a sweep
        if is_oom(exc):
            row["status"] = "OOM"
        else:
            row["status"] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            traceback.print_exc(file=sys.stderr)
    finally:
        if recording or (memory and row["status"] == "OOM" and torch.cuda.is_available()):
            _finish_memory_record(cfg, row, out_dir)
        if cfg.compile != "none":
            torch.compiler.reset()  # drop compiled graphs (and the recompile budget) between rows
        free_device_memory()
    return row


def _run(
    cfg: BenchConfig,
    row: dict[str, Any],
    model_factory: ModelFactory,
    out_dir: Path | None,
    profile: bool,
    memory: bool,
    profile_steps: int,
) -> bool:
    from cs336_basics.nn_utils import cross_entropy
    from cs336_basics.optimizer import AdamW

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = model_factory(cfg)
    row["params"] = sum(p.numel() for p in model.parameters())
    optimizer = AdamW(model.parameters(), lr=1e-4) if cfg.mode == "train" else None
    model_fn = prepare_model(model, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    x, y = (
        torch.randint(
            0, VOCAB_SIZE, (cfg.batch_size, cfg.context_length), device=device, generator=generator
        )
        for _ in range(2)
    )
    clock = Clock(device)
    autocast_dtype = AUTOCAST_DTYPES[cfg.dtype]
    track_memory = device.type == "cuda"

    def step() -> dict[str, float]:
        """One step; returns milliseconds per phase (and peak MiB per phase on CUDA)."""
        if optimizer is not None or cfg.mode == "forward-backward":
            model.zero_grad(set_to_none=True)
        clock.sync()
        marks, peaks = [clock.mark()], {}

        def end_phase(phase: str) -> None:
            marks.append(clock.mark())
            if track_memory:
                peaks[phase] = mib(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)

        if track_memory:
            torch.cuda.reset_peak_memory_stats(device)
        grad_ctx = torch.no_grad() if cfg.mode == "forward" else contextlib.nullcontext()
        autocast = torch.autocast(
            device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        )
        with nvtx_range("forward"), grad_ctx, autocast:
            logits = model_fn(x)
            loss = cross_entropy(logits, y) if cfg.mode != "forward" else None
        end_phase("forward")
        if loss is not None:
            with nvtx_range("backward"):
                loss.backward()
            end_phase("backward")
        if optimizer is not None:
            with nvtx_range("optimizer"):
                optimizer.step()
            end_phase("optimizer")
        clock.sync()  # every step ends on the device; no work leaks into the next step's timing
        result = {phase: clock.ms(a, b) for phase, a, b in zip(PHASES, marks, marks[1:])}
        result["total"] = clock.ms(marks[0], marks[-1])
        result.update({f"peak_{phase}": value for phase, value in peaks.items()})
        return result

    for _ in range(cfg.warmup):
        with nvtx_range("warmup step"):
            step()
    recording = memory and track_memory
    if recording:
        row["_memory_baseline_bytes"] = torch.cuda.memory_allocated(device)
        row["_memory_marks_us"] = []
        torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    samples = []
    for i in range(cfg.steps):
        if recording:
            row["_memory_marks_us"].append((f"step {i}", time.time_ns() // 1000))
        with nvtx_range(f"step {i}"):
            samples.append(step())
    if recording:
        clock.sync()
        row["_memory_marks_us"].append(("end", time.time_ns() // 1000))
    _summarize(cfg, row, samples, device)
    if profile:
        _profile(step, cfg, row, out_dir, profile_steps, device)
    return recording


def _summarize(
    cfg: BenchConfig, row: dict[str, Any], samples: list[dict[str, float]], device: torch.device
) -> None:
    for key in ("forward", "backward", "optimizer", "total"):
        values = [s[key] for s in samples if key in s]
        if values:
            row[f"{key}_ms"], row[f"{key}_std_ms"] = mean_std(values)
        peaks = [s[f"peak_{key}"] for s in samples if f"peak_{key}" in s]
        if peaks:
            row[f"peak_{key}_mib"] = max(peaks)
    flops = step_flops(cfg)
    row["flops_per_step"] = flops
    row["tflops"] = flops / (row["total_ms"] / 1e3) / 1e12
    peak = peak_flops(device, matmul_dtype(cfg))
    row["mfu"] = row["tflops"] * 1e12 / peak if peak else None


# ----------------------------------------------------------------------------- profiler


def _profile(
    step: Callable[[], dict[str, float]],
    cfg: BenchConfig,
    row: dict[str, Any],
    out_dir: Path | None,
    profile_steps: int,
    device: torch.device,
) -> None:
    """Extra steps under ``torch.profiler`` (not part of the timing): a trace + top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(profile_steps):
            step()
    row["top_kernels"] = top_kernels(prof, device)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(out_dir / f"trace_{cfg.tag}.json"))
        (out_dir / f"kernels_{cfg.tag}.md").write_text(kernel_table(row["top_kernels"]) + "\n")


def top_kernels(prof: Any, device: torch.device, limit: int = 15) -> list[dict[str, Any]]:
    """The GPU kernels (CPU ops without a GPU) that took the most self time, as dicts."""
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        self_time = lambda e: getattr(
            e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)
        )
    else:
        kernels, self_time = list(events), (lambda e: e.self_cpu_time_total)
    kernels = [e for e in kernels if self_time(e) > 0]
    total = sum(self_time(e) for e in kernels) or 1.0
    kernels.sort(key=self_time, reverse=True)
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": self_time(e) / 1e3,
            "share": self_time(e) / total,
        }
        for e in kernels[:limit]
    ]


def kernel_table(kernels: list[dict[str, Any]]) -> str:
    rows = [
        [f"{k['self_ms']:.2f}", f"{100 * k['share']:.1f}%", str(k["calls"]), k["name"][:90]]
        for k in kernels
    ]
    return markdown_table(["self ms", "share", "calls", "kernel"], rows)


# ----------------------------------------------------------------------------- memory snapshot


def _finish_memory_record(cfg: BenchConfig, row: dict[str, Any], out_dir: Path | None) -> None:
    """Stop recording; dump the snapshot (for pytorch.org/memory_viz) and draw its timeline."""
    try:
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            pickle_path = out_dir / f"memory_{cfg.tag}.pickle"
            torch.cuda.memory._dump_snapshot(str(pickle_path))
            with open(pickle_path, "rb") as f:
                snapshot = pickle.load(f)
            png = out_dir / f"memory_{cfg.tag}.png"
            plot_memory_timeline(
                snapshot,
                png,
                baseline_bytes=row.get("_memory_baseline_bytes", 0),
                marks=row.get("_memory_marks_us", []),
                title=f"{cfg.tag} ({row['status']})",
            )
            row["memory_snapshot"], row["memory_png"] = pickle_path.name, png.name
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
        row.pop("_memory_baseline_bytes", None)
        row.pop("_memory_marks_us", None)


def memory_timeline(
    snapshot: dict[str, Any], baseline_bytes: int = 0, device_index: int = 0
) -> tuple[list[float], list[float]]:
    """(time in µs, or the event index when the trace has no times; allocated bytes) after each event.

    Replays the allocator trace of ``torch.cuda.memory._snapshot()``: ``alloc`` adds the block's
    size, ``free_completed`` removes it; ``baseline_bytes`` is what was allocated when recording
    started (the model, optimizer state, ...).
    """
    traces = snapshot.get("device_traces", [])
    trace = traces[device_index] if device_index < len(traces) else []
    xs, ys, allocated = [], [], float(baseline_bytes)
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            allocated += event["size"]
        elif event["action"] == "free_completed":
            allocated -= event["size"]
        else:
            continue
        xs.append(float(event.get("time_us", i)))
        ys.append(allocated)
    return xs, ys


def plot_memory_timeline(
    snapshot: dict[str, Any],
    path: Path,
    *,
    baseline_bytes: int = 0,
    marks: Sequence[tuple[str, int]] = (),
    title: str = "",
) -> None:
    """Allocated GiB over time, with the ``(label, time_us)`` marks drawn as vertical lines.

    Time runs from the first mark (else the first event); events after a mark labelled ``end``
    (the harness tearing the run down) are left out.
    """
    from matplotlib.figure import Figure

    xs, ys = memory_timeline(snapshot, baseline_bytes)
    timed = bool(xs) and "time_us" in snapshot["device_traces"][0][0]
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.add_subplot()
    if timed:
        end = dict(marks).get("end", float("inf"))
        kept = [(x, y) for x, y in zip(xs, ys) if x <= end]
        xs, ys = [x for x, _ in kept], [y for _, y in kept]
        t0 = marks[0][1] if marks else (xs[0] if xs else 0.0)
        xs = [(x - t0) / 1e3 for x in xs]
        for label, t_us in marks:
            ax.axvline((t_us - t0) / 1e3, color="grey", ls=":", lw=0.8)
            ax.annotate(
                label,
                ((t_us - t0) / 1e3, 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                va="top",
                rotation=90,
            )
    ax.plot(xs, [y / 2**30 for y in ys], lw=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("ms since the first measured step" if timed else "allocator event")
    ax.set_ylabel("allocated (GiB)")
    ax.set_title(title or "CUDA memory timeline", fontsize=9)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- sweep and output


def sweep_configs(
    sizes: Sequence[str],
    context_lengths: Sequence[int],
    modes: Sequence[str],
    dtypes: Sequence[str],
    compiles: Sequence[str],
    attn_backends: Sequence[str],
    **common: Any,
) -> list[BenchConfig]:
    """The Cartesian product, size outermost; validation happens here, before anything runs."""
    product = itertools.product(sizes, context_lengths, modes, dtypes, compiles, attn_backends)
    return [
        BenchConfig(
            size=canonical_size(s),
            context_length=t,
            mode=m,
            dtype=d,
            compile=c,
            attn_backend=a,
            **common,
        )
        for s, t, m, d, c, a in product
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(row: dict[str, Any], key: str) -> str:
    if f"{key}_ms" not in row:
        return "-" if row["status"] == "ok" else row["status"].split(":")[0]
    return f"{row[f'{key}_ms']:.2f} ± {row[f'{key}_std_ms']:.2f}"


def _peak(row: dict[str, Any]) -> str:
    peaks = [row[f"peak_{p}_mib"] for p in PHASES if f"peak_{p}_mib" in row]
    return f"{max(peaks) / 1024:.2f}" if peaks else "-"


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """The stdout/markdown table: one line per row, OOM and errors shown in the time columns."""
    header = [
        "size",
        "ctx",
        "mode",
        "dtype",
        "compile",
        "attn",
        "ckpt",
        "fwd ms",
        "bwd ms",
        "opt ms",
        "total ms",
        "TFLOP/s",
        "MFU",
        "peak GiB",
    ]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        lines.append(
            [
                r["size"],
                str(r["context_length"]),
                r["mode"],
                r["dtype"],
                r["compile"],
                r["attn_backend"],
                "yes" if r["checkpoint"] else "no",
                _ms(r, "forward"),
                _ms(r, "backward"),
                _ms(r, "optimizer"),
                _ms(r, "total"),
                f"{r['tflops']:.1f}" if ok else "-",
                f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") is not None else "-",
                _peak(r),
            ]
        )
    return markdown_table(header, lines)


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Stacked forward/backward/optimizer bars per row (OOM rows labelled, no bar)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    labels = [
        f"{r['size']} {r['dtype']} {r['compile']}\nctx{r['context_length']} {r['mode']}"
        for r in rows
    ]
    bottom = [0.0] * len(rows)
    for phase, color in zip(PHASES, ("tab:blue", "tab:orange", "tab:green")):
        heights = [r.get(f"{phase}_ms", 0.0) if r["status"] == "ok" else 0.0 for r in rows]
        ax.bar(range(len(rows)), heights, bottom=bottom, color=color, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights)]
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            ax.text(
                i, 0, r["status"].split(":")[0], ha="center", va="bottom", rotation=90, color="red"
            )
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms per step (mean)")
    positive = [b for b in bottom if b > 0]
    if positive and max(positive) > 50 * min(positive):  # sizes span orders of magnitude
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _git_sha() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def run_meta(device: str) -> dict[str, Any]:
    """What a result file needs to be read later: versions, device, commit, command."""
    dev = torch.device(device)
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "git_sha": _git_sha(),
        "argv": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def write_results(
    rows: Sequence[dict[str, Any]], out_dir: Path, meta: dict[str, Any], plot: bool = True
) -> None:
    """``benchmark.json`` (meta + rows) and, with ``plot``, ``benchmark.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": {**meta, "flop_formula": FLOP_FORMULA}, "rows": list(rows)}
    (out_dir / "benchmark.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if plot:
        plot_results(rows, out_dir / "benchmark.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cs336-systems benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--size",
        nargs="+",
        default=["small"],
        type=canonical_size_arg,
        metavar="SIZE",
        help=f"model sizes: {', '.join(MODEL_SIZES)} (default small)",
    )
    p.add_argument("--context-length", nargs="+", type=int, default=[512])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--mode",
        nargs="+",
        default=["train"],
        choices=MODES,
        help="forward (inference, no_grad), forward-backward, train (+ AdamW step)",
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["fp32"],
        choices=tuple(AUTOCAST_DTYPES),
        help="autocast dtype of the forward; parameters stay fp32",
    )
    p.add_argument(
        "--compile",
        nargs="+",
        default=["none"],
        choices=COMPILE_MODES,
        help="torch.compile each block (blocks) or the whole model (model)",
    )
    p.add_argument("--attn-backend", nargs="+", default=["math"], choices=ATTN_BACKENDS)
    p.add_argument(
        "--checkpoint-activations", action="store_true", help="torch.utils.checkpoint per block"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls for fp32 rows")
    p.add_argument(
        "--nvtx", action="store_true", help="NVTX ranges per submodule and attention step"
    )
    p.add_argument(
        "--profile", action="store_true", help="torch.profiler trace + top kernels per row"
    )
    p.add_argument(
        "--memory", action="store_true", help="CUDA memory snapshot + timeline PNG per row"
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/benchmark"), help="folder for JSON/PNG/traces"
    )
    return p


def canonical_size_arg(name: str) -> str:
    try:
        return canonical_size(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cli_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        configs = sweep_configs(
            args.size,
            args.context_length,
            args.mode,
            args.dtype,
            args.compile,
            args.attn_backend,
            batch_size=args.batch_size,
            checkpoint=args.checkpoint_activations,
            warmup=args.warmup,
            steps=args.steps,
            device=args.device,
            seed=args.seed,
            nvtx=args.nvtx,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, meta = [], run_meta(args.device)
    for i, cfg in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}] {cfg.tag} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rows.append(run_benchmark(cfg, out_dir=args.out, profile=args.profile, memory=args.memory))
        write_results(rows, args.out, meta, plot=False)  # a run cut short keeps its finished rows
        print(
            f"    {rows[-1]['status']} ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        if args.profile and "top_kernels" in rows[-1]:
            print(f"\ntop kernels, {cfg.tag}:\n{kernel_table(rows[-1]['top_kernels'])}\n")
    write_results(rows, args.out, meta)
    print(results_table(rows))
    print(f"\nwrote {args.out / 'benchmark.json'} and {args.out / 'benchmark.png'}")
    return 0 if all(r["status"] in ("ok", "OOM") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(cli_main())
