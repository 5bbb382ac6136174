"""Supervised fine-tuning (CS336 assignment 5, sec. 4; the supplement's instruction tuning).

Two data formats, one optimizer step (``sft_step``):
- ``reasoning`` (default): (prompt, response) pairs, loss on response tokens only. Sources:
  GSM8K answers or MATH solutions rendered into the R1-Zero format (``<think> reasoning
  </think> <answer> a </answer>``), or any JSONL of ``prompt``/``response``. ``--num_examples``
  is the course's dataset-size sweep (128 ... full), ``--filter_correct`` keeps only responses
  whose answer the grader accepts.
- ``packed``: instruction-tuning documents (Alpaca template, EOS-joined, packed into
  ``seq_length`` windows; ``sft_data.PackedSFTDataset``), loss on every token.

The loss is the mean negative log-likelihood per target token over the whole optimizer batch,
whatever the micro-batching. Periodic evaluation samples with the rollout engine and grades
with ``grading.r1_zero_reward_fn``.

    cs336-alignment sft --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf --train_data gsm8k \\
        --num_examples 1024 --epochs 2 --batch_size 64 --gradient_accumulation_steps 8
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from cs336_basics.train import exit_status

from cs336_alignment import losses
from cs336_alignment.models import Policy
from cs336_alignment.sft_data import (
    PackedSFTDataset,
    iterate_batches,
    sft_examples,
    tokenize_prompt_and_output,
)
from cs336_alignment.train_utils import (
    EarlyStop,
    Evaluator,
    RunLog,
    autocast,
    default_precision,
    field,
    grad_norm_and_clip,
    load_run_policy,
    load_trainer_state,
    make_optimizer,
    make_rollout_engine,
    microbatches,
    param_dtype,
    parse_config,
    plot_log,
    print_summary,
    required,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_lr,
)


@dataclass(frozen=True)
class SFTConfig:
    model: str = required("policy to train: HF directory, .gguf file, or cs336_basics checkpoint")
    tokenizer: str | None = field(None, "tokenizer directory of a cs336_basics checkpoint")
    out_dir: str = field("runs/sft", "log, checkpoints, plots")
    data_format: Literal["reasoning", "packed"] = field("reasoning", "reasoning (prompt/response, loss on responses) | packed (instruction tuning)")
    train_data: str = field("gsm8k", "reasoning: gsm8k | math | JSONL of prompt/response; packed: JSONL of prompt/response")
    prompt: str = field("r1_zero", "prompt template for gsm8k/math questions")
    num_examples: int = field(0, "seeded random subset of the training examples (0 = all)")
    filter_correct: bool = field(False, "keep only examples whose response the grader accepts")
    max_seq_len: int = field(1024, "reasoning: truncate prompt+response to this many tokens")
    seq_length: int = field(512, "packed: window length")
    epochs: int = field(1, "passes over the training examples")
    max_minutes: float = field(0.0, "wall-clock budget: past it, the next step is the last "
                               "(final evaluation + checkpoint; --resume continues) (0 = none)")
    batch_size: int = field(64, "examples (or windows) per optimizer step")
    gradient_accumulation_steps: int = field(8, "micro-batches per optimizer step")
    learning_rate: float = field(2e-5, "peak AdamW learning rate")
    min_lr_ratio: float = field(0.1, "cosine decays to learning_rate * this")
    warmup_ratio: float = field(0.03, "fraction of the steps spent warming up")
    weight_decay: float = field(0.0, "AdamW weight decay")
    adam_beta1: float = field(0.9, "AdamW beta1")
    adam_beta2: float = field(0.95, "AdamW beta2")
    max_grad_norm: float = field(1.0, "gradient clipping (<= 0: off)")
    eval_data: str = field("gsm8k", "gsm8k | math | math500 | JSONL of question/answer | none")
    eval_split: str = field("test", "split of eval_data")
    eval_every: int = field(0, "evaluate every this many optimizer steps (0 = only at the start and the end)")
    eval_examples: int = field(1024, "validation questions (0 = the whole split)")
    eval_temperature: float = field(1.0, "evaluation sampling temperature (0 = greedy)")
    eval_max_tokens: int = field(1024, "evaluation response length limit")
    stop: tuple[str, ...] = field(("</answer>",), "evaluation stop strings")
    checkpoint_every: int = field(0, "checkpoint every this many optimizer steps (0 = only at the end)")
    resume: bool = field(False, "continue from the latest checkpoint in out_dir")
    seed: int = field(0, "seed of subset choice, shuffling and evaluation sampling")
    device: str | None = field(None, "cuda | cpu (default: cuda when available)")
    precision: str | None = field(None, "bf16-mixed | bf16 | fp32 (default: bf16-mixed on CUDA, fp32 on CPU)")
    rollout_backend: str = field("builtin", "builtin | vllm (evaluation sampling)")
    rollout_max_batch_size: int = field(512, "sequences decoded at once during evaluation")

    def __post_init__(self):
        if self.data_format not in ("reasoning", "packed"):
            raise ValueError("data_format must be reasoning or packed")
        if self.batch_size < self.gradient_accumulation_steps:
            raise ValueError("batch_size must be >= gradient_accumulation_steps")
        if self.precision not in (None, "bf16-mixed", "bf16", "fp32"):
            raise ValueError("precision must be bf16-mixed, bf16 or fp32")


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-gsm8k": {"train_data": "gsm8k", "epochs": 2, "batch_size": 64, "gradient_accumulation_steps": 4,
                          "learning_rate": 5e-5, "max_seq_len": 512, "eval_max_tokens": 512, "eval_examples": 0},
}


def sft_step(
    policy: Policy,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    gradient_accumulation_steps: int,
    max_grad_norm: float,
    device: torch.device,
    precision: str,
) -> dict[str, float]:
    """One optimizer step on a ``pack_prompt_and_output_ids``-style batch (``input_ids``, ``labels``,
    ``response_mask``): micro-batches fwd/bwd -> clip -> step -> zero_grad.

    The loss is the NLL per target token over the whole batch: each micro-batch's summed NLL is
    divided by the batch's target-token count (via ``normalize_constant = tokens / rows`` and the
    micro-batch's share of the rows), so uneven micro-batches weigh correctly.
    """
    rows_total = batch["input_ids"].shape[0]
    n_tokens = float(batch["response_mask"].sum())
    normalize_constant = max(n_tokens, 1.0) / rows_total
    micro = math.ceil(rows_total / gradient_accumulation_steps)
    loss_sum, entropy_sum = 0.0, 0.0
    policy.model.train()
    for rows, mb in microbatches(batch, torch.arange(rows_total), micro, device):
        with autocast(device, precision):
            out = losses.get_response_log_probs(policy.model, mb["input_ids"], mb["labels"], return_token_entropy=True)
        # rows_total / len(rows) micro-batches of this size make one batch: weigh by the row share
        loss, _ = losses.sft_microbatch_train_step(out["log_probs"], mb["response_mask"], rows_total / len(rows), normalize_constant)
        loss_sum += float(loss)
        entropy_sum += float((out["token_entropy"] * mb["response_mask"]).sum())
    grad_norm = grad_norm_and_clip(policy.model, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "entropy": entropy_sum / max(n_tokens, 1.0), "grad_norm": grad_norm, "tokens": n_tokens}


def truncate(batch: dict[str, torch.Tensor], max_len: int) -> dict[str, torch.Tensor]:
    return {k: v[:, :max_len] for k, v in batch.items()}


def load_reasoning_examples(cfg: SFTConfig) -> list[dict[str, str]]:
    examples = sft_examples(cfg.train_data, cfg.prompt, "train", cfg.num_examples if not cfg.filter_correct else 0, cfg.seed)
    if cfg.filter_correct:
        from cs336_alignment.grading import r1_zero_reward_fn

        examples = [ex for ex in examples if r1_zero_reward_fn(ex["response"], ex["answer"])["reward"] == 1.0]
        if 0 < cfg.num_examples < len(examples):
            examples = random.Random(cfg.seed).sample(examples, cfg.num_examples)
    if not examples:
        raise ValueError(f"no training examples from {cfg.train_data!r}")
    return examples


def train_sft(cfg: SFTConfig, policy: Policy | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run SFT; returns the final metrics (last train record + last evaluation)."""
    device = resolve_device(cfg.device)
    precision = cfg.precision or default_precision(device)
    seed_everything(cfg.seed)
    ckpt = None
    if policy is None:
        policy, ckpt = load_run_policy(cfg.model, cfg.out_dir, cfg.resume, device, param_dtype(precision), cfg.tokenizer)
    tokenizer = policy.tokenizer

    if cfg.data_format == "packed":
        dataset = PackedSFTDataset(tokenizer, cfg.train_data, cfg.seq_length, shuffle=True, seed=cfg.seed)
        steps_per_epoch = len(dataset) // cfg.batch_size  # the last partial batch of an epoch is dropped
    else:
        examples = load_reasoning_examples(cfg)
        steps_per_epoch = max(1, len(examples) // cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch

    from cs336_basics.optimizer import cosine_lr

    optimizer = make_optimizer(policy.model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    start = load_trainer_state(ckpt, optimizer)["step"] if ckpt is not None else 0
    log = RunLog(cfg.out_dir, cfg, resume=ckpt is not None, quiet=quiet)
    evaluator = Evaluator.from_config(cfg, make_rollout_engine(policy, device, cfg.rollout_backend, cfg.rollout_max_batch_size)) \
        if cfg.eval_data not in ("", "none") else None
    warmup = int(cfg.warmup_ratio * total_steps)
    epoch_order: tuple[int, list] | None = None
    final: dict[str, Any] = {"train_examples": len(dataset) if cfg.data_format == "packed" else len(examples)}

    with EarlyStop(cfg.max_minutes) as early:
        for step in range(start, total_steps + 1):
            last = step == total_steps or (step > start and early.now())
            lr = cosine_lr(step, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, warmup, total_steps)
            set_lr(optimizer, lr)

            if evaluator and (step == start or last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
                final.update(evaluator.run(policy, log, step))
            if step > start and (last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
                save_checkpoint(cfg.out_dir, step, policy, optimizer, cfg)
            if last:
                break

            # the data order of an epoch depends only on (seed, epoch): a resumed run sees the same batches
            epoch, index = divmod(step, steps_per_epoch)
            if epoch_order is None or epoch_order[0] != epoch:
                if cfg.data_format == "packed":
                    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
                    epoch_order = (epoch, list(iterate_batches(dataset, cfg.batch_size, shuffle=True, generator=gen)))
                else:
                    order = list(range(len(examples)))
                    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
                    epoch_order = (epoch, order)
            t0 = time.perf_counter()
            if cfg.data_format == "packed":
                windows = epoch_order[1][index]
                batch = {**windows, "response_mask": torch.ones_like(windows["labels"], dtype=torch.bool)}
            else:
                chosen = [examples[i] for i in epoch_order[1][index * cfg.batch_size : (index + 1) * cfg.batch_size]]
                batch = truncate(tokenize_prompt_and_output([e["prompt"] for e in chosen], [e["response"] for e in chosen], tokenizer),
                                 cfg.max_seq_len)
            metrics = sft_step(policy, optimizer, batch, cfg.gradient_accumulation_steps, cfg.max_grad_norm, device, precision)
            dt = time.perf_counter() - t0
            record = {**metrics, "lr": lr, "epoch": epoch, "step_s": dt, "tok_per_s": metrics["tokens"] / max(dt, 1e-9)}
            log.log("train", step + 1, **record)
            final.update(record)
    final.update(early.result())

    plot_log(log.path, log.out_dir / "curves.png", {
        "loss (per token)": ("train", "loss"), "entropy": ("train", "entropy"), "grad norm": ("train", "grad_norm"),
        "lr": ("train", "lr"), "validation accuracy": ("eval", "accuracy"), "validation format rate": ("eval", "format_rate"),
    }, title="SFT")
    return final


def cli_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SFTConfig, argv, "Supervised fine-tuning on reasoning traces or instruction data.", PRESETS)
    final = train_sft(cfg)
    print_summary(final, cfg)
    return exit_status(final)  # 130 / 143 after Ctrl-C / SIGTERM: resumable
