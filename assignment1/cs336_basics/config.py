"""The training run's configuration: one frozen dataclass, named presets, a CLI that maps 1:1 onto it.

    cs336-basics train --preset tinystories-17m --train-data data/ts_train.bin --val-data data/ts_valid.bin
    cs336-basics train --preset tiny --train-data ... --val-data ... --max-steps 50 --lr 3e-3

Every field's help text is its ``metadata["help"]``; ``--help`` prints them all.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainConfig:
    # --- data
    train_data: str = _f("", "token file for training (flat uint16/uint32 + <file>.json sidecar)")
    val_data: str = _f("", "token file for validation (same format)")
    tokenizer_dir: str = _f("", "optional tokenizer folder; its vocab size must equal vocab_size")
    # --- model (TransformerLM arguments)
    vocab_size: int = _f(10_000, "vocabulary size (must exceed every id in the data)")
    context_length: int = _f(256, "tokens per training sequence (the model's maximum)")
    d_model: int = _f(512, "residual stream width")
    num_layers: int = _f(4, "Transformer blocks")
    num_heads: int = _f(16, "attention heads (d_model must be divisible by it)")
    d_ff: int = _f(1344, "feed-forward inner width (~8/3 d_model for SwiGLU)")
    rope_theta: float = _f(10_000.0, "RoPE base")
    norm: str = _f("pre", "ablation: 'pre', 'post' or 'none' (RMSNorm placement)", choices=("pre", "post", "none"))
    ffn: str = _f("swiglu", "ablation: 'swiglu' or 'silu' (ungated)", choices=("swiglu", "silu"))
    use_rope: bool = _f(True, "ablation: False = no positional information (NoPE)")
    tie_embeddings: bool = _f(False, "share the input embedding and the LM head")
    attn_backend: str = _f("auto", "attention kernel: 'math' (ours), 'sdpa' (PyTorch), 'flash' (cs336_systems), "
                                   "'auto' ('flash' on CUDA compute capability >= 8.0 when cs336_systems is installed, else 'sdpa')",
                           choices=("auto", "math", "sdpa", "flash"))
    model_impl: str = _f("cs336", "'cs336' (ours) or 'hf-llama' (transformers' Llama of the same shape, "
                                  "initialized with our weights: the benchmark baseline)", choices=("cs336", "hf-llama"))
    # --- optimization
    batch_size: int = _f(128, "sequences per optimizer step (global, over micro-batches and ranks)")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    max_steps: int = _f(10_000, "optimizer steps (128 x 256 x 10000 = the course's 327,680,000 tokens)")
    lr: float = _f(2e-3, "peak learning rate")
    min_lr: float = _f(2e-4, "final learning rate of the cosine schedule")
    warmup_steps: int = _f(200, "linear warmup steps")
    cosine_steps: int = _f(0, "step at which the cosine reaches min_lr (0 = max_steps)")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clip (0 = off)")
    optimizer_impl: str = _f("cs336", "'cs336' (our AdamW) or 'torch-fused' (torch.optim.AdamW(fused=True), CUDA)",
                             choices=("cs336", "torch-fused"))
    # --- evaluation, logging, checkpoints
    eval_interval: int = _f(500, "evaluate every N steps (and always at the last step)")
    eval_batches: int = _f(20, "batches of the fixed validation set")
    log_interval: int = _f(1, "print/log a line every N steps (each is read back one step late, so it does not stall the GPU)")
    checkpoint_interval: int = _f(1000, "write out_dir/checkpoint.pt every N steps (0 = only at the end)")
    out_dir: str = _f("runs/lm", "folder for checkpoint.pt, metrics.jsonl, config.json, loss_curve.png")
    resume: str = _f("", "checkpoint to resume from ('auto' = out_dir/checkpoint.pt)")
    overwrite: bool = _f(False, "allow a fresh run to replace an existing checkpoint in out_dir")
    max_minutes: float = _f(0.0, "stop (eval + checkpoint) after this much wall time (0 = no limit)")
    profile_steps: int = _f(0, "profile this many steps from the 11th of the run with torch.profiler: out_dir/"
                               "trace.json (open in Perfetto) and a summary line (device busy per step)")
    wandb: bool = _f(False, "log to Weights & Biases (needs the 'wandb' extra)")
    wandb_project: str = _f("cs336-basics", "wandb project")
    wandb_mode: str = _f("offline", "wandb mode: 'offline' or 'online'", choices=("offline", "online"))
    # --- system
    device: str = _f("auto", "'auto' (cuda > mps > cpu), or a torch device string")
    dtype: str = _f("bf16", "autocast dtype on GPU: 'bf16' or 'fp32' (CPU always runs fp32)", choices=("bf16", "fp32"))
    compile: bool = _f(False, "torch.compile the model")
    seed: int = _f(0, "seed of the model init and the data sampler")

    def __post_init__(self):
        positive = ["vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "batch_size",
                    "grad_accum_steps", "eval_interval", "eval_batches", "log_interval"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ["max_steps", "warmup_steps", "cosine_steps", "checkpoint_interval", "max_minutes", "profile_steps",
                     "weight_decay", "grad_clip", "lr", "min_lr"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.use_rope and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.d_model // self.num_heads}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by grad_accum_steps={self.grad_accum_steps}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} exceeds lr={self.lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, TrainConfig] = {
    # The course's TinyStories model: ~17M non-embedding params, 327.68M tokens in 10k steps of 128 x 256.
    "tinystories-17m": TrainConfig(),
    # GPT-2-small-shaped model for OpenWebText with a 32K vocabulary.
    "owt-small": TrainConfig(vocab_size=32_000, context_length=512, d_model=768, num_layers=12, num_heads=12,
                             d_ff=2048, batch_size=64, max_steps=20_000, lr=1e-3, min_lr=1e-4, warmup_steps=1000,
                             compile=True),
    # Small enough to train on a laptop CPU in a minute (a few-hundred-token vocabulary).
    "tiny": TrainConfig(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=192,
                        batch_size=16, max_steps=200, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_interval=50,
                        eval_batches=4, checkpoint_interval=100, attn_backend="math", dtype="fp32",
                        out_dir="runs/tiny"),
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field (``--max-steps`` for ``max_steps``; booleans get ``--no-...``)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinystories-17m",
                        help="named starting point; every flag below overrides it")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=typ, default=None, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset, with every flag given on the command line replacing its field."""
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if getattr(args, f.name, None) is not None}
    return PRESETS[args.preset].replace(**changes)


def config_from_cli(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """``config_from_args`` for a training command: an invalid config or a missing data file is a
    usage error (``parser.error``: message + exit code 2), never a traceback."""
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    for name in ("train_data", "val_data"):
        if not getattr(cfg, name):
            parser.error(f"--{name.replace('_', '-')} is required")
    return cfg
