"""Plumbing shared by the alignment training programs (``sft.py``, ``expert_iteration.py``,
``grpo.py``, ``dpo.py``): config <-> command line, precision, the run log, resumable checkpoints,
evaluation through the rollout engine, and plots. No training math lives here (see ``losses.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import random
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from cs336_basics.stop_signals import StopSignals
from cs336_basics.train import git_sha

from cs336_alignment.models import Policy

# --------------------------------------------------------------------------- config <-> command line


def _field_type(tp: Any) -> Any:
    """The concrete type argparse should parse for an annotation (``int | None`` -> int)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _field_type(args[0])
    if typing.get_origin(tp) is typing.Literal:
        return type(typing.get_args(tp)[0])
    if typing.get_origin(tp) is tuple:
        return tuple
    return tp


def parse_config(cls: type, argv: Sequence[str] | None, description: str, presets: dict[str, dict] | None = None) -> Any:
    """Build the frozen config ``cls`` from ``--field-name value`` flags, one per dataclass field.

    ``--preset NAME`` starts from ``presets[NAME]`` instead of the dataclass defaults; explicit
    flags override it. Booleans are ``--flag`` / ``--no-flag``; tuples take several values.
    Each field's help text is its ``metadata["help"]``.
    """
    parser = argparse.ArgumentParser(description=description)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None, help="named starting configuration")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, help_text = _field_type(hints[f.name]), f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        # --train-data, as in cs336-basics; the field's own spelling --train_data is accepted too
        flags = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])
        common = {"dest": f.name, "default": None, "help": f"{help_text} (default {default})"}
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif tp is tuple:
            inner = _field_type(typing.get_args(hints[f.name])[0]) if typing.get_args(hints[f.name]) else str
            parser.add_argument(*flags, nargs="+", type=inner, **common)
        else:
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else None
            parser.add_argument(*flags, type=tp, choices=choices, **common)
    args = vars(parser.parse_args(argv))
    values = dict(presets[args.pop("preset")]) if presets and args.get("preset") else {}
    args.pop("preset", None)
    values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None})
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        parser.error("missing required " + ", ".join("--" + m for m in missing))
    return cls(**values)


def print_summary(final: dict[str, Any], config: Any) -> None:
    """The end-of-run summary of a training program's ``cli_main``."""
    print({k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in final.items()})
    print(f"config: {dataclasses.asdict(config)}")


def field(default: Any, help: str) -> Any:
    """A dataclass field with a help text (shown by ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


def required(help: str) -> Any:
    return dataclasses.field(metadata={"help": help})


# --------------------------------------------------------------------------- devices, precision, seeds


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def param_dtype(precision: str) -> torch.dtype:
    """``"bf16"`` keeps bf16 parameters (half the memory, as in the course); the others fp32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``"bf16-mixed"`` (fp32 master weights); a no-op otherwise."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rollout_copy(policy: Policy, dtype: torch.dtype) -> Policy:
    """A separate inference copy of the policy for the rollout engine (bf16 on GPU).

    Training keeps its own (fp32 master) weights; ``engine.load_weights(policy.model)`` copies
    them in place before each rollout round.
    """
    return Policy(copy.deepcopy(policy.model).to(dtype).eval().requires_grad_(False), policy.tokenizer, policy.kind)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (fused kernels on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = params[0].is_cuda if params else False
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_constant_lr(step: int, max_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``max_lr``, then constant (the course's RL runs use a constant rate)."""
    return max_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else max_lr


def grad_norm_and_clip(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (``max_norm <= 0``: measure only); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm)  # .item() syncs with the GPU once per optimizer step


# --------------------------------------------------------------------------- early stop


class EarlyStop:
    """The early end of a training loop: after the first SIGINT or SIGTERM
    (`cs336_basics.stop_signals`), or past ``max_minutes`` of wall clock (0: no limit), the next step
    is the last one. That step evaluates and checkpoints like the end of a finished run, so
    ``--resume`` goes on from there. A second signal acts at once, as it would without this.

        with EarlyStop(cfg.max_minutes) as early:
            for step in range(start, total + 1):
                last = step == total or (step > start and early.now())
                ...
        final.update(early.result())

    ``result()`` is ``{"stopped": "done" | "max_minutes" | "interrupted", "signal": name | None}``;
    `cs336_basics.train.exit_status` turns it into the process's exit status (130 after Ctrl-C).
    """

    def __init__(self, max_minutes: float = 0.0):
        self.max_minutes = max_minutes
        self.stopped = "done"
        self._signals = StopSignals()

    def __enter__(self) -> typing.Self:
        self._t_start = time.perf_counter()
        self._signals.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._signals.__exit__(*exc)

    def now(self) -> bool:
        """Whether the loop should stop at this step (it records why)."""
        if self._signals.received is not None:
            self.stopped = "interrupted"
        elif self.max_minutes > 0 and time.perf_counter() - self._t_start > 60 * self.max_minutes:
            self.stopped = "max_minutes"
        return self.stopped != "done"

    def result(self) -> dict[str, Any]:
        received = self._signals.received if self.stopped == "interrupted" else None
        return {"stopped": self.stopped, "signal": received.name if received is not None else None}


# --------------------------------------------------------------------------- run log


class RunLog:
    """``out_dir/config.json`` (resolved config + git SHA), ``out_dir/log.jsonl`` (one JSON object per
    record) and one fixed-format line per record on stdout."""

    def __init__(self, out_dir: str | Path, config: Any, resume: bool = False, quiet: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "log.jsonl"
        self.quiet = quiet
        if not resume and self.path.exists():
            self.path.unlink()
        record = {"config": dataclasses.asdict(config), "git_sha": git_sha(), "argv": sys.argv, "time": time.time()}
        (self.out_dir / "config.json").write_text(json.dumps(record, indent=2, default=str))
        if not quiet:
            print(f"config ({record['git_sha']}): {json.dumps(record['config'], default=str)}", flush=True)

    def log(self, kind: str, step: int, **metrics: Any) -> None:
        """Append a record; ``kind`` is "train", "eval" or another label."""
        row = {"kind": kind, "step": step, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if not self.quiet:
            cells = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))
            print(f"{kind:5s} {step:6d} | {cells}", flush=True)

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return read_log(self.path, kind)


def read_log(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r.get("kind") == kind]


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir: str | Path, step: int, policy: Policy, optimizer: torch.optim.Optimizer | None,
                    config: Any, keep: int = 2, **extra: Any) -> Path:
    """Write ``out_dir/checkpoints/step_<n>/`` (``policy/`` loadable by ``load_policy`` + ``trainer.pt``).

    Written to a temporary folder and renamed, so a crash never leaves a half checkpoint that
    ``latest_checkpoint`` would pick; only the newest ``keep`` are kept.
    """
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.save(tmp / "policy")
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": dataclasses.asdict(config),
        "git_sha": git_sha(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        **extra,
    }, tmp / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def load_trainer_state(ckpt: Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore optimizer and RNG state from ``ckpt/trainer.pt``; returns the saved dict (``step``, extras)."""
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state


def load_run_policy(model_spec: str, out_dir: str | Path, resume: bool, device: torch.device, dtype: torch.dtype,
                    tokenizer: str | None = None) -> tuple[Policy, Path | None]:
    """The policy to train: the latest checkpoint's when resuming (and one exists), else ``model_spec``."""
    from cs336_alignment.models import load_policy

    ckpt = latest_checkpoint(out_dir) if resume else None
    spec = ckpt / "policy" if ckpt is not None else model_spec
    tok = None if ckpt is not None else tokenizer
    return load_policy(spec, device=device, dtype=dtype, **({"tokenizer": tok} if tok else {})), ckpt


# --------------------------------------------------------------------------- evaluation


def prompt_token_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Prompt ids exactly as ``tokenize_prompt_and_output`` makes them (so rollouts and training agree)."""
    return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]


def build_prompts(prompt_name: str, examples: list[dict[str, str]]) -> list[str]:
    """Each example's ``prompt`` if it has one, else its ``question`` in the ``prompt_name`` template."""
    if all("prompt" in ex for ex in examples):
        return [ex["prompt"] for ex in examples]
    from cs336_alignment.prompts import format_prompt

    return [ex["prompt"] if "prompt" in ex else format_prompt(prompt_name, ex["question"]) for ex in examples]


def make_rollout_engine(policy: Policy, device: torch.device, backend: str, max_batch_size: int) -> Any:
    """A rollout engine over a separate inference copy of ``policy`` (bf16 on GPU, fp32 on CPU)."""
    from cs336_alignment.rollout import make_engine

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return make_engine(rollout_copy(policy, dtype), backend, max_batch_size=max_batch_size)


class Evaluator:
    """Sample one response per held-out question with the rollout engine and grade it."""

    def __init__(self, engine: Any, examples: list[dict[str, str]], prompt_name: str, params: Any,
                 reward_fn: Callable[[str, str], dict[str, float]] | None = None):
        if reward_fn is None:
            from cs336_alignment.grading import r1_zero_reward_fn as reward_fn
        self.engine, self.params, self.reward_fn = engine, params, reward_fn
        self.prompts, self.answers = build_prompts(prompt_name, examples), [ex["answer"] for ex in examples]

    @classmethod
    def from_config(cls, cfg: Any, engine: Any, examples: list[dict[str, str]] | None = None,
                    reward_fn: Callable[[str, str], dict[str, float]] | None = None) -> Evaluator:
        """From a config's ``eval_data``, ``eval_split``, ``eval_examples``, ``prompt``,
        ``eval_temperature``, ``eval_max_tokens``, ``stop`` and ``seed`` fields."""
        from cs336_alignment.rollout import SamplingParams
        from cs336_alignment.sft_data import qa_examples

        if examples is None:
            examples = qa_examples(cfg.eval_data, cfg.eval_split, cfg.eval_examples, cfg.seed)
        params = SamplingParams(temperature=cfg.eval_temperature, max_new_tokens=cfg.eval_max_tokens,
                                stop=tuple(cfg.stop), seed=cfg.seed)
        return cls(engine, examples, cfg.prompt, params, reward_fn)

    def run(self, policy: Policy, log: RunLog, step: int) -> dict[str, float]:
        """Evaluate the current weights of ``policy``; logs an "eval" record and writes the samples."""
        self.engine.load_weights(policy.model)
        metrics = evaluate_rewards(self.engine, self.prompts, self.answers, self.params, self.reward_fn,
                                   log.out_dir / f"eval_samples_step{step:05d}.jsonl")
        log.log("eval", step, **metrics)
        return {f"eval_{k}": v for k, v in metrics.items()}


def evaluate_rewards(
    engine: Any,
    prompts: list[str],
    answers: list[str],
    params: Any,
    reward_fn: Callable[[str, str], dict[str, float]],
    samples_path: str | Path | None = None,
) -> dict[str, float]:
    """Generate one completion per prompt and score it: mean reward, answer accuracy, format rate, length.

    ``samples_path``: also write every (prompt, response, answer, rewards) as JSONL.
    """
    t0 = time.perf_counter()
    outs = engine.generate(prompt_token_ids(engine.policy.tokenizer, prompts), params)
    scores = [reward_fn(o[0].text, a) for o, a in zip(outs, answers)]
    n = max(1, len(scores))
    metrics = {
        "accuracy": sum(s.get("answer_reward", s["reward"]) for s in scores) / n,
        "format_rate": sum(s.get("format_reward", 0.0) for s in scores) / n,
        "reward": sum(s["reward"] for s in scores) / n,
        "response_tokens": sum(len(o[0].token_ids) for o in outs) / n,
        "eval_seconds": time.perf_counter() - t0,
        "n": len(scores),
    }
    if samples_path is not None:
        with open(samples_path, "w") as f:
            f.writelines(json.dumps({"prompt": p, "response": o[0].text, "answer": a, **s}) + "\n" for p, o, a, s in zip(prompts, outs, answers, scores))
    return metrics


# --------------------------------------------------------------------------- plots


def plot_log(log_path: str | Path, out_png: str | Path, panels: dict[str, tuple[str, str]], title: str = "") -> Path | None:
    """One subplot per ``panels`` entry ``label -> (record kind, metric)``, metric against step.

    Returns the image path, or None when matplotlib is missing or nothing was logged.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_log(log_path)
    series = {}
    for label, (kind, key) in panels.items():
        pts = [(r["step"], r[key]) for r in rows if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
        if pts:
            series[label] = pts
    if not series:
        return None
    cols = min(3, len(series))
    nrows = -(-len(series) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (label, pts) in zip(axes.flat, series.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


# --------------------------------------------------------------------------- batches


def response_ends(response_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T) -> (B,)``: one past each row's last response position (0 for a row with none), i.e. the
    width a micro-batch holding the row needs (the padding after it needs no forward pass)."""
    positions = torch.arange(1, response_mask.shape[-1] + 1, device=response_mask.device)
    return (positions * response_mask).amax(dim=-1)


def sort_by_length(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ordered longest first (by ``response_ends``), so that ``microbatches`` groups rows of
    similar length and pads each micro-batch little.

    Reordering the rows of one optimizer step leaves its gradient unchanged up to float rounding
    when its micro-batches all have the same number of rows (each contributes its rows' mean
    loss / the accumulation steps). Longest first: the largest activations are allocated first and
    later, smaller micro-batches reuse the allocator's blocks.
    """
    ends = response_ends(batch["response_mask"][rows])
    return rows[torch.argsort(ends, descending=True, stable=True)]


def microbatches(batch: dict[str, torch.Tensor], rows: torch.Tensor, micro_size: int, device: torch.device):
    """Split the ``rows`` of a ``pack_prompt_and_output_ids`` batch, in the given order, into micro-batches
    on ``device``, each cut after its last response token (padding past it needs no forward pass)."""
    for chunk in rows.split(micro_size):
        width = max(1, int(response_ends(batch["response_mask"][chunk]).max()))  # CPU tensors: no GPU sync
        yield chunk, {k: v[chunk, :width].to(device, non_blocking=True) for k, v in batch.items() if v.dim() == 2}


def place_response_values(response_mask: torch.Tensor, values: Sequence[Sequence[float]]) -> torch.Tensor:
    """Per-response-token values (row ``b``: one per output token, in order) -> ``(B, T)`` float32 at the
    positions where ``response_mask`` is set, 0 elsewhere.

    ``pack_prompt_and_output_ids`` sets ``response_mask[b, t]`` where ``labels[b, t]`` is output token
    ``t - (len(prompt) - 1)``, a contiguous run per row, so a row-major boolean assignment puts the
    ``i``-th value of row ``b`` on the label that is its ``i``-th output token.
    """
    counts = response_mask.sum(dim=-1).tolist()
    if len(counts) != len(values) or any(c != len(v) for c, v in zip(counts, values)):
        raise ValueError(f"response lengths {counts} do not match the value counts {[len(v) for v in values]}")
    out = torch.zeros(response_mask.shape, dtype=torch.float32)
    out[response_mask.bool()] = torch.tensor([x for v in values for x in v], dtype=torch.float32)
    return out
