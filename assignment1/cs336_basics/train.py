"""Pretrain the Transformer LM: a flat loop over token files, resumable, wall-clock limited.

Order of one step: lr → eval/checkpoint → micro-batches fwd/bwd → clip → optimizer step →
zero_grad → log of the step before. ``for step in range(start, max_steps + 1)`` with ``last_step``
so the final evaluation and checkpoint always happen.

A logged step's loss is read back (``.item()``) only once the next step is queued on the GPU, so
the host's work between steps (the batch, the log line) never leaves the GPU idle. Evaluations and
checkpoints read the pending loss first, so a non-finite loss still stops the run before any
checkpoint is written after it.

Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) ends the run as ``--max-minutes`` does: the
step in progress finishes, then an evaluation and a checkpoint (`stop_signals`; a second signal
stops at once). The exit status is 128 + the signal's number (130, 143), so a job script can tell
an interrupted run, to resume, from a finished one (0).

    cs336-basics train --preset tinystories-17m --train-data train.bin --val-data valid.bin --compile
    cs336-basics train --resume auto --out-dir runs/lm ...          # continue exactly where it stopped

Multi-GPU: ``train(cfg, strategy)`` with a strategy from ``cs336_systems.parallel`` (DDP, ZeRO-1,
FSDP) under ``torchrun``; the model code is unchanged.

MFU: FLOPs per token = 6·N + 12·L·C·T (Kaplan et al. 2020 / PaLM appendix B): N = parameters
that take part in matmuls (all but the input embedding, LM head included), 6 = forward 2 +
backward 4 per parameter per token; 12·L·C·T = attention scores and weighted sum (QKᵀ and AV,
2 FLOPs per multiply-add, ×3 for fwd+bwd), causal masking not discounted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from cs336_basics.checkpoint import (
    CheckpointError,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
)
from cs336_basics.config import TrainConfig, add_config_args, config_from_cli
from cs336_basics.data import check_token_range, eval_batches, get_batch, load_tokens
from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import clip_grad_norm
from cs336_basics.optimizer import AdamW, cosine_lr
from cs336_basics.profiling import StepProfiler
from cs336_basics.stop_signals import StopSignals

# Dense bf16 peak (TFLOP/s) by GPU name; fp32 runs use TF32 peaks (half). Unknown GPUs: no MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "4090": 165.0, "3090": 71.0}


STOP_CHECK_EVERY = 20  # several ranks: steps between their votes on --max-minutes
PROFILE_AFTER = 10  # --profile-steps: steps after the start before the window opens (compilation, warm-up)
ETA_SMOOTHING = 0.9  # weight of the earlier steps/s in each log line's new average (evaluations not counted)


class TrainingStopped(RuntimeError):
    """Raised for bad input found before anything is written (data, checkpoint, out_dir)."""


class _NoWandb:
    """Stand-in with wandb's call surface, so call sites never test ``if wandb:``."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def import_wandb():
    """The ``wandb`` module, or ``TrainingStopped`` saying how to install it (an optional extra)."""
    try:
        import wandb
    except ImportError as e:
        raise TrainingStopped("--wandb needs the wandb package: pip install 'cs336-basics[wandb]' "
                              f"(or leave --wandb off; metrics.jsonl has every number): {e}") from e
    return wandb


def scalars(row: dict, prefix: str = "") -> dict:
    """The numbers of a metrics row for wandb, nested dicts flattened to ``profile/wall_ms_per_step``
    (lists, strings and None left out: wandb charts numbers)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out |= scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = v
    return out


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str) -> torch.device:
    """``"auto"``: cuda > mps > cpu. Otherwise the named device, with a ``ValueError`` saying why
    when it is not a device name or is not on this machine (instead of a failure at the first tensor)."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
        if device.type == "cuda":
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if n == 0:
                raise ValueError(f"device {name!r}: no CUDA GPU is available here (torch.cuda.is_available() "
                                 "is False); use --device cpu, or auto")
            if device.index is not None and device.index >= n:
                raise ValueError(f"device {name!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
        if device.type == "mps" and not _mps_available():
            raise ValueError(f"device {name!r}: Apple's MPS backend is not available here; use --device cpu, or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def attn_backend(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.attn_backend`` with "auto" resolved: our FlashAttention (Triton, RoPE inside its kernels;
    the fastest, docs/benchmarks.md) on a CUDA GPU of compute capability 8.0 or later (Ampere, Hopper:
    bf16 tensor cores; measured on Hopper) when ``cs336_systems`` is installed, else PyTorch's SDPA
    (e.g. on a Colab T4, sm_75)."""
    if cfg.attn_backend != "auto":
        return cfg.attn_backend
    if device.type != "cuda" or cfg.model_impl != "cs336" or torch.cuda.get_device_capability(device) < (8, 0):
        return "sdpa"
    try:
        import cs336_systems.flash_attention  # noqa: F401 (an optional sibling package)
    except ImportError:
        return "sdpa"
    return "flash"


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Our TransformerLM, or (``model_impl="hf-llama"``) transformers' Llama with the same init weights."""
    backend = attn_backend(cfg, device)
    lm = TransformerLM(cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_ff,
                       cfg.rope_theta, norm=cfg.norm, ffn=cfg.ffn, use_rope=cfg.use_rope,
                       tie_embeddings=cfg.tie_embeddings, attn_backend=backend, device=device)
    if cfg.model_impl == "cs336":
        return lm
    from cs336_basics.hf_llama import HFLogits, to_hf_llama

    if cfg.norm != "pre" or cfg.ffn != "swiglu" or not cfg.use_rope or cfg.tie_embeddings:
        raise ValueError("model_impl='hf-llama' supports only the default architecture (no ablations)")
    attn = "eager" if backend == "math" else "sdpa"
    return HFLogits(to_hf_llama(lm, cfg.rope_theta, attn_implementation=attn), cfg.vocab_size, cfg.context_length)


def flops_per_token(cfg: TrainConfig, model: torch.nn.Module) -> float:
    """Training FLOPs per token, 6·N + 12·L·C·T (see the module docstring)."""
    n_embed = cfg.vocab_size * cfg.d_model
    n_matmul = sum(p.numel() for p in model.parameters()) - n_embed * (1 if not cfg.tie_embeddings else 0)
    n_matmul -= sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)  # norm gains: no matmul
    return 6 * n_matmul + 12 * cfg.num_layers * cfg.d_model * cfg.context_length


def peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12 / (1 if dtype == "bf16" else 2)
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux: peak RSS


def duration(seconds: float) -> str:
    """A short human duration: 45s, 12m05s, 3h07m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@torch.no_grad()
def evaluate(model, val_data, cfg: TrainConfig, device, autocast) -> float:
    """Mean loss over the fixed validation set (the same windows every time)."""
    model.eval()
    acc = torch.float32 if device.type == "mps" else torch.float64  # (MPS has no float64)
    total, n = torch.zeros((), dtype=acc, device=device), 0  # summed on the device: one sync at the end
    for x, y in eval_batches(val_data, cfg.batch_size // cfg.grad_accum_steps, cfg.context_length,
                             cfg.eval_batches, device):
        with autocast:
            total += model(x, targets=y).to(acc) * len(x)
        n += len(x)
    model.train()
    return total.item() / n


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Train and validation loss against step, from metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless; set here, not at import time
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no loss_curve.png (metrics.jsonl has every number)", file=sys.stderr)
        return

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=metrics_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def _resume_path(cfg: TrainConfig, out_dir: Path) -> Path | None:
    if not cfg.resume:
        return None
    return out_dir / "checkpoint.pt" if cfg.resume == "auto" else Path(cfg.resume)


def train(cfg: TrainConfig, strategy=None) -> dict:
    """Run training as configured; returns the final metrics. ``stopped`` says why it ended: "done",
    "max_minutes", "interrupted" (a SIGINT or SIGTERM, named by ``signal``; `stop_signals`: the
    run finished its step, evaluated and wrote a checkpoint) or "non-finite loss"."""
    with StopSignals(announce=strategy is None or strategy.rank == 0) as stop:
        return _train(cfg, strategy, stop)


def _train(cfg: TrainConfig, strategy, stop: StopSignals) -> dict:
    rank, world = (strategy.rank, strategy.world_size) if strategy is not None else (0, 1)
    is_main = rank == 0
    device = getattr(strategy, "device", None) or pick_device(cfg.device)
    micro = cfg.batch_size // cfg.grad_accum_steps  # sequences per micro-batch, all ranks together
    if micro % world:
        raise ValueError(f"micro-batch {micro} (batch_size / grad_accum_steps) is not divisible by world size {world}")
    per_rank = micro // world
    out_dir = Path(cfg.out_dir)
    log = print if is_main else (lambda *a, **k: None)

    # ---- validate every input before writing anything
    train_data = load_tokens(cfg.train_data)
    val_data = load_tokens(cfg.val_data)
    for name, arr in (("train_data", train_data), ("val_data", val_data)):
        if len(arr) < cfg.context_length + 1:
            raise TrainingStopped(f"{name} {getattr(cfg, name)} has {len(arr)} tokens: shorter than one training "
                                  f"example (context_length + 1 = {cfg.context_length + 1})")
        check_token_range(arr, cfg.vocab_size, name=getattr(cfg, name))
    if cfg.tokenizer_dir:
        from cs336_basics.tokenizer import Tokenizer

        tok_vocab = Tokenizer.from_dir(cfg.tokenizer_dir).vocab_size
        if tok_vocab != cfg.vocab_size:
            raise TrainingStopped(f"tokenizer {cfg.tokenizer_dir} has {tok_vocab} tokens but vocab_size={cfg.vocab_size}")
    resume_from = _resume_path(cfg, out_dir)
    ckpt = None
    if resume_from is not None:
        if cfg.resume == "auto" and not resume_from.exists():
            resume_from = None  # nothing to resume yet: a fresh start
        else:
            ckpt = read_checkpoint(resume_from)
    if ckpt is None and (out_dir / "checkpoint.pt").exists() and not cfg.overwrite:
        raise TrainingStopped(f"{out_dir}/checkpoint.pt exists from an earlier run; resume it with --resume auto, "
                              "pass --overwrite, or choose another --out-dir")
    wandb = import_wandb() if cfg.wandb and is_main else None

    # ---- model, optimizer, RNG
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain under autocast
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg, device)
    if ckpt is not None:
        load_model_state(model, ckpt["model"], name=f"checkpoint {resume_from}")
    raw_model = model
    if cfg.compile:  # the loss is part of the model's forward (model(x, targets=y)), so compiled with it
        model = torch.compile(model)
    if strategy is not None:
        model = strategy.wrap_model(model)
    adamw_kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if strategy is not None:
        optimizer = strategy.make_optimizer(model, **adamw_kwargs)
    elif cfg.optimizer_impl == "torch-fused":
        optimizer = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda", **adamw_kwargs)
    else:
        optimizer = AdamW(model.parameters(), **adamw_kwargs)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    start_step, wall_before = 0, 0.0
    if ckpt is not None:
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["iteration"]
        data_rng.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        wall_before = ckpt.get("wall_s", 0.0)
    use_amp = device.type in ("cuda", "mps") and cfg.dtype == "bf16"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext())

    # ---- outputs (rank 0 only); a resumed run keeps the metrics of the steps before its checkpoint
    metrics_path = out_dir / "metrics.jsonl"
    wandb_run = _NoWandb()
    # a resumed run goes on logging into the wandb run its checkpoint names
    wandb_id = (ckpt or {}).get("wandb_id") or uuid.uuid4().hex[:12]
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "git_sha": git_sha()}, indent=2))
        kept = []
        if ckpt is not None and metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                r = json.loads(line)
                if r["step"] < start_step or ("val_loss" in r and r["step"] == start_step):
                    kept.append(line + "\n")
        metrics_path.write_text("".join(kept))
        if wandb is not None:
            wandb_run = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), mode=cfg.wandb_mode,
                                   dir=str(out_dir), name=out_dir.name, id=wandb_id, resume="allow")
    metrics_file = open(metrics_path, "a") if is_main else None  # noqa: SIM115 (closed at every exit of the loop)

    def record(row: dict) -> None:
        if is_main:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            wandb_run.log(scalars(row), step=row["step"])

    def checkpoint(step: int, wall: float) -> None:
        state = strategy.model_state_dict(model) if strategy is not None else raw_model.state_dict()
        if is_main:
            save_checkpoint(state, optimizer, step, out_dir / "checkpoint.pt", config=cfg.to_dict(),
                            data_rng=data_rng.get_state(), torch_rng=torch.get_rng_state(),
                            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                            wall_s=wall, wandb_id=wandb_id if cfg.wandb else None)

    tokens_per_step = cfg.batch_size * cfg.context_length
    flops_step = flops_per_token(cfg, raw_model) * tokens_per_step
    peak = peak_flops(device, cfg.dtype)
    n_params = sum(p.numel() for p in raw_model.parameters())
    log(f"config: {json.dumps(cfg.to_dict())}")
    log(f"git {git_sha()} | device {device} | world {world} | attention {attn_backend(cfg, device)} | "
        f"params {n_params / 1e6:.2f}M | "
        f"{tokens_per_step:,} tokens/step | {flops_step / tokens_per_step / 1e6:.1f} MFLOP/token"
        + (f" | resumed at step {start_step}" if ckpt is not None else ""))

    t_start = time.perf_counter()
    # Throughput runs on a loop clock that stands still during evaluations and the profiler's export.
    # A step's stamp is taken once it is queued: on a GPU, the host is then one step behind the device,
    # so the stamps are as far apart as the steps take; on a CPU each step is done when queued.
    # the next log line's window, and the smoothed steps/s of the ETA (none for the first window: it
    # holds the compilation)
    clock = {"paused": 0.0, "t_last": t_start, "step_last": start_step, "steps_per_s": None}

    def loop_clock() -> float:
        return time.perf_counter() - clock["paused"]

    result = {"stopped": "done", "step": start_step}
    last_loss = float("nan")
    val_loss = None
    stop_for = None  # "max_minutes" / "interrupted": the next iteration is the last (eval + checkpoint)
    pending = None  # (step, lr, loss, grad_norm, stamp) of the last step to log, its tensors not yet read
    # --profile-steps: a window of steps after compilation and warm-up (rank 0)
    prof_first = start_step + PROFILE_AFTER if cfg.profile_steps and is_main else -1
    profiler = StepProfiler(device, out_dir / "trace.json") if prof_first >= 0 else None

    def read_back() -> dict | None:
        """Log the pending step (its .item() waits for that step only: the step after it is already
        queued, so the GPU never idles while the host reads, logs and prepares the next batch).
        Returns the stop result when its loss is not finite, else None."""
        nonlocal pending, last_loss
        if pending is None:
            return None
        p_step, p_lr, p_loss, p_norm, p_stamp = pending
        pending = None
        last_loss = p_loss.item()  # (several ranks: already their mean)
        grad_norm = float(p_norm)  # a 0-dim tensor from clip_grad_norm; ready with the loss
        if not math.isfinite(last_loss):
            return _stop_nonfinite(p_step, "training", out_dir, is_main, result, metrics_file, wandb_run, profiler)
        now = time.perf_counter()
        tok_s = (p_step + 1 - clock["step_last"]) * tokens_per_step / max(p_stamp - clock["t_last"], 1e-9)
        mfu = tok_s * flops_step / tokens_per_step / peak if peak else None
        mem = memory_gb(device)
        wall = wall_before + now - t_start
        eta = None
        if clock["step_last"] > start_step:  # ETA: the steps left at an exponential average of steps/s
            rate = tok_s / tokens_per_step
            if clock["steps_per_s"] is not None:
                rate = ETA_SMOOTHING * clock["steps_per_s"] + (1 - ETA_SMOOTHING) * rate
            clock["steps_per_s"] = rate
            eta = (cfg.max_steps - p_step - 1) / rate
            if cfg.max_minutes:
                eta = max(0.0, min(eta, 60 * cfg.max_minutes - wall))
        clock.update(t_last=p_stamp, step_last=p_step + 1)
        log(f"step {p_step:>6} | loss {last_loss:.4f} | lr {p_lr:.2e} | {tok_s:>9,.0f} tok/s | "
            f"mfu {'%5.1f%%' % (100 * mfu) if mfu is not None else '  n/a'} | mem {mem:.2f} GB | "
            f"norm {grad_norm:.2f} | {wall:.1f}s | eta {'?' if eta is None else duration(eta)}")
        record({"step": p_step, "loss": last_loss, "lr": p_lr, "tok_s": round(tok_s, 1),
                "mfu": None if mfu is None else round(mfu, 4), "mem_gb": round(mem, 3),
                "grad_norm": grad_norm, "wall_s": round(wall, 3), "eta_s": None if eta is None else round(eta, 1)})
        return None

    for step in range(start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps or stop_for is not None
        lr = cosine_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.cosine_steps or cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- eval / checkpoint (not again at the step a resumed run starts from)
        resumed_here = ckpt is not None and step == start_step
        if (last_step or step % cfg.eval_interval == 0) and not resumed_here:
            if (stopped := read_back()) is not None:  # a non-finite loss never reaches a checkpoint
                return stopped
            t_eval = time.perf_counter()
            wall = wall_before + t_eval - t_start
            val_loss = evaluate(model, val_data, cfg, device, autocast)
            if strategy is not None:
                val_loss = strategy.all_reduce_mean(val_loss)
            log(f"step {step:>6} | val_loss {val_loss:.4f} | eval {time.perf_counter() - t_eval:.1f}s")
            record({"step": step, "val_loss": val_loss, "wall_s": round(wall, 3), "tokens": step * tokens_per_step})
            if not math.isfinite(val_loss):
                return _stop_nonfinite(step, "validation", out_dir, is_main, result, metrics_file, wandb_run,
                                       profiler)
            if last_step or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0 and step > start_step):
                checkpoint(step, wall)
            clock["paused"] += time.perf_counter() - t_eval  # eval time does not count against throughput
        if last_step:
            result.update(step=step, stopped=stop_for if stop_for and step < cfg.max_steps else "done")
            if result["stopped"] == "interrupted":  # (None on a rank that stopped for another's signal)
                result["signal"] = stop.received.name if stop.received is not None else None
            break

        # ---- one optimizer step over grad_accum_steps micro-batches
        if step == prof_first:
            profiler.start()
        loss_sum = None
        for _ in range(cfg.grad_accum_steps):
            x, y = get_batch(train_data, micro, cfg.context_length, device, generator=data_rng)
            x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
            with autocast:
                # LM head + loss in one op on CUDA (the logits are never kept; model.TransformerLM.forward)
                loss = model(x, targets=y) / cfg.grad_accum_steps
            loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if strategy is not None:
            strategy.after_backward(model, optimizer)
        grad_norm = clip_grad_norm(model.parameters(), cfg.grad_clip) if cfg.grad_clip else float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- log the previous logged step now that this one is queued, and keep this one for later
        stamp = loop_clock()
        if (stopped := read_back()) is not None:
            return stopped
        if step % cfg.log_interval == 0 or step + 1 == cfg.max_steps:
            if strategy is not None:  # the mean over ranks, queued behind this step like the loss itself
                loss_sum = strategy.all_reduce_mean_tensor(loss_sum)
            pending = (step, lr, loss_sum, grad_norm, stamp)
        if profiler is not None and step == prof_first + cfg.profile_steps - 1:
            t_stop = time.perf_counter()
            summary = profiler.stop(cfg.profile_steps)
            clock["paused"] += time.perf_counter() - t_stop  # (the wait for the device, the trace export)
            busy = summary["device_busy_ms_per_step"]
            log(f"profile of steps {prof_first}-{step}: {summary['wall_ms_per_step']:.2f} ms/step"
                + (f", device busy {busy:.2f} ms ({summary['device_busy_fraction']:.0%})" if busy is not None else "")
                + f"; trace {summary['trace']}")
            record({"step": step, "profile": summary})
        # over time or a signal: the next iteration is the last (eval + checkpoint). With several ranks,
        # every rank must stop at the same step: they agree every STOP_CHECK_EVERY steps (a vote waits
        # for the GPU), stopping if any rank asks to
        if strategy is None or (step + 1) % STOP_CHECK_EVERY == 0:
            votes = [float(stop.received is not None),
                     float(bool(cfg.max_minutes) and wall_before + time.perf_counter() - t_start >= 60 * cfg.max_minutes)]
            if strategy is not None:
                votes = [strategy.all_reduce_mean(v) for v in votes]
            stop_for = "interrupted" if votes[0] > 0 else "max_minutes" if votes[1] > 0 else None
            if stop_for == "interrupted":
                log(f"step {step:>6} | interrupted: evaluating and writing a checkpoint (resume with --resume auto)")
    if profiler is not None:  # a window the run ended inside of
        profiler.close()
    wall = wall_before + time.perf_counter() - t_start
    result.update(train_loss=last_loss, val_loss=val_loss, wall_s=wall, tokens=result["step"] * tokens_per_step)
    if is_main:
        metrics_file.close()
        plot_losses(metrics_path, out_dir / "loss_curve.png")
        wandb_run.finish()
    log(f"finished: {json.dumps(result)}")
    return result


def _stop_nonfinite(step, which, out_dir, is_main, result, metrics_file, wandb_run, profiler) -> dict:
    """Stop without writing a checkpoint, so the last good one stays the newest; close what the run
    holds open (metrics file, wandb, a profile window)."""
    if profiler is not None:
        profiler.close()
    ckpt = out_dir / "checkpoint.pt"
    last = f"{ckpt} (step {read_checkpoint(ckpt)['iteration']})" if ckpt.exists() else "none written yet"
    msg = f"non-finite {which} loss at step {step}: stopping; last good checkpoint: {last}"
    if is_main:
        print(msg, file=sys.stderr)
        metrics_file.close()
        wandb_run.finish()
    result.update(stopped="non-finite loss", step=step, message=msg)
    return result


def cli_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cs336-basics train", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_cli(parser, args)
    try:
        result = train(cfg)
    except (TrainingStopped, CheckpointError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return exit_status(result)


def exit_status(result: dict) -> int:
    """The process's exit status for `train`'s result: 0 when done or out of time; 128 + the
    signal's number when interrupted (the shell's convention: 130 for Ctrl-C, 143 for SIGTERM), so
    a job script can tell a run to resume from a finished one; else 1."""
    if result["stopped"] in ("done", "max_minutes"):
        return 0
    if result["stopped"] == "interrupted" and result.get("signal"):
        return 128 + signal.Signals[result["signal"]].value
    return 1


if __name__ == "__main__":
    from cs336_basics.cli import line_buffered_stdout

    line_buffered_stdout()
    sys.exit(cli_main())
