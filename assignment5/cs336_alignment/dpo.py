"""Direct preference optimization (Rafailov et al. 2023; CS336 assignment 5 supplement, sec. 5).

Preference pairs (prompt, chosen, rejected) are rendered with the Alpaca instruction template
(``sft_data.instruction_pair_batch``; responses end with EOS). The reference model is frozen, so
its response log-probabilities are computed once, up front, and the reference model is freed:
training then holds one model. The loss is ``losses.dpo_loss`` averaged over the pairs of an
optimizer batch; validation reports the loss and the accuracy of the implicit reward
(``beta * log pi/ref`` of chosen > rejected).

    cs336-alignment dpo --model runs/sft/checkpoints/step_0000100/policy --train_data pairs.jsonl \\
        --beta 0.1 --learning_rate 1e-6 --batch_size 64 --gradient_accumulation_steps 64

The training JSONL has ``prompt`` (or ``instruction``), ``chosen`` and ``rejected`` fields (e.g.
Anthropic HH-RLHF turned into single-turn pairs, as the supplement does).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from cs336_basics.train import exit_status

from cs336_alignment import losses
from cs336_alignment.models import Policy
from cs336_alignment.sft_data import instruction_pair_batch, read_jsonl
from cs336_alignment.train_utils import (
    EarlyStop,
    RunLog,
    autocast,
    default_precision,
    field,
    grad_norm_and_clip,
    load_run_policy,
    load_trainer_state,
    param_dtype,
    parse_config,
    plot_log,
    print_summary,
    required,
    resolve_device,
    save_checkpoint,
    seed_everything,
)


@dataclass(frozen=True)
class DPOConfig:
    model: str = required("policy to train (usually the instruction-tuned SFT model)")
    train_data: str = required("JSONL of prompt/chosen/rejected")
    ref_model: str | None = field(None, "reference model (default: the same as --model)")
    tokenizer: str | None = field(None, "tokenizer directory of a cs336_basics checkpoint")
    out_dir: str = field("runs/dpo", "log, checkpoints, plots")
    val_examples: int = field(200, "pairs held out for validation (seeded)")
    max_pairs: int = field(0, "use a seeded random subset of the pairs (0 = all)")
    max_seq_len: int = field(512, "truncate prompt+response to this many tokens")
    beta: float = field(0.1, "DPO temperature")
    optimizer: Literal["rmsprop", "adamw"] = field("rmsprop", "rmsprop (the supplement's) | adamw")
    learning_rate: float = field(1e-6, "learning rate (constant)")
    epochs: int = field(1, "passes over the training pairs")
    max_minutes: float = field(0.0, "wall-clock budget: past it, the next step is the last "
                               "(final evaluation + checkpoint; --resume continues) (0 = none)")
    batch_size: int = field(64, "pairs per optimizer step")
    gradient_accumulation_steps: int = field(64, "micro-batches per optimizer step")
    max_grad_norm: float = field(0.0, "gradient clipping (<= 0: off)")
    eval_every: int = field(50, "validate every this many optimizer steps (0 = only at the start and the end)")
    checkpoint_every: int = field(0, "checkpoint every this many optimizer steps (0 = only at the end)")
    resume: bool = field(False, "continue from the latest checkpoint in out_dir")
    seed: int = field(0, "seed of the split and shuffling")
    device: str | None = field(None, "cuda | cpu (default: cuda when available)")
    precision: str | None = field(None, "bf16-mixed | bf16 | fp32 (default: bf16-mixed on CUDA, fp32 on CPU)")

    def __post_init__(self):
        if self.batch_size < self.gradient_accumulation_steps:
            raise ValueError("batch_size must be >= gradient_accumulation_steps")
        if self.optimizer not in ("rmsprop", "adamw"):
            raise ValueError("optimizer must be rmsprop or adamw")


def load_pairs(path: str) -> list[dict[str, str]]:
    """``{"prompt", "chosen", "rejected"}`` rows of a JSONL; a row missing a field raises with its line."""
    pairs = []
    for i, row in enumerate(read_jsonl(path), 1):
        prompt = row.get("prompt", row.get("instruction"))
        if prompt is None or "chosen" not in row or "rejected" not in row:
            raise ValueError(f"{path}:{i}: needs prompt (or instruction), chosen and rejected fields")
        pairs.append({"prompt": str(prompt), "chosen": str(row["chosen"]), "rejected": str(row["rejected"])})
    return pairs


def pair_log_probs(model: torch.nn.Module, tokenizer: Any, pairs: list[dict[str, str]], max_seq_len: int,
                   device: torch.device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs ``(chosen (n,), rejected (n,))`` of ``pairs`` under ``model``."""
    n = len(pairs)
    batch = instruction_pair_batch(tokenizer, [p["prompt"] for p in pairs] * 2,
                                   [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    batch = {k: v[:, :max_seq_len] for k, v in batch.items()}
    with autocast(device, precision):
        logp = losses.sequence_log_prob(model, batch)
    return logp[:n], logp[n:]


@torch.no_grad()
def all_pair_log_probs(model: torch.nn.Module, tokenizer: Any, pairs: list[dict[str, str]], max_seq_len: int,
                        device: torch.device, precision: str, chunk: int = 8) -> torch.Tensor:
    """``(n, 2)`` response log-probs (chosen, rejected) of every pair, without gradients, in chunks."""
    out = []
    for s in range(0, len(pairs), chunk):
        c, r = pair_log_probs(model, tokenizer, pairs[s:s + chunk], max_seq_len, device, precision)
        out.append(torch.stack([c, r], dim=-1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def train_dpo(cfg: DPOConfig, policy: Policy | None = None, ref: Policy | None = None,
              pairs: list[dict[str, str]] | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run DPO; returns the final metrics."""
    device = resolve_device(cfg.device)
    precision = cfg.precision or default_precision(device)
    seed_everything(cfg.seed)
    ckpt = None
    if policy is None:
        policy, ckpt = load_run_policy(cfg.model, cfg.out_dir, cfg.resume, device, param_dtype(precision), cfg.tokenizer)
    if ref is None:
        from cs336_alignment.models import load_policy

        ref = load_policy(cfg.ref_model or cfg.model, device=device, dtype=param_dtype(precision),
                          **({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {}))
    pairs = list(pairs if pairs is not None else load_pairs(cfg.train_data))
    random.Random(cfg.seed).shuffle(pairs)
    if cfg.max_pairs > 0:
        pairs = pairs[: cfg.max_pairs]
    val, train = pairs[: cfg.val_examples], pairs[cfg.val_examples:]
    if not train:
        raise ValueError(f"no training pairs left after holding out {cfg.val_examples} for validation")
    tok = policy.tokenizer

    t0 = time.perf_counter()
    ref.model.eval()
    ref_train = all_pair_log_probs(ref.model, tok, train, cfg.max_seq_len, device, precision)
    ref_val = all_pair_log_probs(ref.model, tok, val, cfg.max_seq_len, device, precision)
    del ref  # frozen: its log-probs are all we need
    ref_seconds = time.perf_counter() - t0

    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = (torch.optim.RMSprop(params, lr=cfg.learning_rate) if cfg.optimizer == "rmsprop"
                 else torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0))
    start = load_trainer_state(ckpt, optimizer)["step"] if ckpt is not None else 0
    log = RunLog(cfg.out_dir, cfg, resume=ckpt is not None, quiet=quiet)
    log.log("setup", start, ref_seconds=ref_seconds, train_pairs=len(train), val_pairs=len(val))
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    micro = max(1, cfg.batch_size // cfg.gradient_accumulation_steps)
    final: dict[str, Any] = {}

    with EarlyStop(cfg.max_minutes) as early:
        for step in range(start, total_steps + 1):
            last = step == total_steps or (step > start and early.now())
            if val and (step == start or last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
                metrics = validate(policy, val, ref_val, cfg, device, precision)
                log.log("eval", step, **metrics)
                final.update({f"val_{k}": v for k, v in metrics.items()})
            if step > start and (last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
                save_checkpoint(cfg.out_dir, step, policy, optimizer, cfg)
            if last:
                break

            epoch, index = divmod(step, steps_per_epoch)
            order = list(range(len(train)))
            random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
            rows = order[index * cfg.batch_size : (index + 1) * cfg.batch_size]
            t0 = time.perf_counter()
            policy.model.train()
            sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
            for s in range(0, len(rows), micro):
                idx = rows[s:s + micro]
                chosen, rejected = pair_log_probs(policy.model, tok, [train[i] for i in idx], cfg.max_seq_len, device, precision)
                ref_c, ref_r = ref_train[idx, 0].to(device), ref_train[idx, 1].to(device)
                pair_loss = losses.dpo_loss(chosen.float(), rejected.float(), ref_c, ref_r, cfg.beta)
                (pair_loss.sum() / len(rows)).backward()  # mean over the optimizer batch's pairs
                margin = ((chosen.detach() - ref_c) - (rejected.detach() - ref_r)) * cfg.beta
                sums["loss"] += float(pair_loss.detach().sum())
                sums["accuracy"] += float((margin > 0).float().sum())
                sums["margin"] += float(margin.sum())
            grad_norm = grad_norm_and_clip(policy.model, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {k: v / len(rows) for k, v in sums.items()}
            record.update(grad_norm=grad_norm, epoch=epoch, step_s=time.perf_counter() - t0)
            log.log("train", step + 1, **record)
            final.update(record)
    final.update(early.result())

    plot_log(log.path, log.out_dir / "curves.png", {
        "DPO loss (train)": ("train", "loss"), "implicit-reward accuracy (train)": ("train", "accuracy"),
        "DPO loss (val)": ("eval", "loss"), "implicit-reward accuracy (val)": ("eval", "accuracy"),
        "reward margin (val)": ("eval", "margin"),
    }, title="DPO")
    return final


@torch.no_grad()
def validate(policy: Policy, val: list[dict[str, str]], ref_val: torch.Tensor, cfg: DPOConfig,
             device: torch.device, precision: str, chunk: int = 8) -> dict[str, float]:
    """Mean DPO loss, implicit-reward accuracy and margin on the held-out pairs."""
    policy.model.eval()
    pol = all_pair_log_probs(policy.model, policy.tokenizer, val, cfg.max_seq_len, device, precision, chunk)
    margin = cfg.beta * ((pol[:, 0] - ref_val[:, 0]) - (pol[:, 1] - ref_val[:, 1]))
    loss = losses.dpo_loss(pol[:, 0], pol[:, 1], ref_val[:, 0], ref_val[:, 1], cfg.beta)
    return {"loss": float(loss.mean()), "accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean())}


def cli_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DPOConfig, argv, "Direct preference optimization on preference pairs.")
    final = train_dpo(cfg)
    print_summary(final, cfg)
    return exit_status(final)  # 130 / 143 after Ctrl-C / SIGTERM: resumable
