"""Expert iteration (CS336 assignment 5, sec. 5; Anthony et al. 2017, STaR: Zelikman et al. 2022).

Each EI step: sample ``questions_per_step`` training questions, draw ``rollouts_per_question``
responses each from the rollout engine, keep the ones the grader accepts (reward 1), and run
``sft_epochs`` passes of SFT (``sft.sft_step``) on the kept (prompt, response) pairs. The
course's knobs: the question batch size (512 / 1024 / 2048), G, and the SFT epochs per step.

    cs336-alignment expert-iteration --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --n_ei_steps 5 --questions_per_step 512 --rollouts_per_question 4 --sft_epochs 1
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from cs336_basics.train import exit_status

from cs336_alignment.models import Policy
from cs336_alignment.sft import sft_step
from cs336_alignment.sft_data import pack_prompt_and_output_ids, pad_id_of, qa_examples
from cs336_alignment.train_utils import (
    EarlyStop,
    Evaluator,
    RunLog,
    build_prompts,
    default_precision,
    field,
    load_run_policy,
    load_trainer_state,
    make_optimizer,
    make_rollout_engine,
    param_dtype,
    parse_config,
    plot_log,
    print_summary,
    prompt_token_ids,
    required,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_lr,
)


@dataclass(frozen=True)
class EIConfig:
    model: str = required("policy to train: HF directory, .gguf file, or cs336_basics checkpoint")
    tokenizer: str | None = field(None, "tokenizer directory of a cs336_basics checkpoint")
    out_dir: str = field("runs/expert_iteration", "log, checkpoints, plots")
    train_data: str = field("gsm8k", "gsm8k | math | JSONL of question/answer")
    eval_data: str = field("gsm8k", "gsm8k | math | math500 | JSONL of question/answer")
    eval_split: str = field("test", "split of eval_data")
    prompt: str = field("r1_zero", "prompt template")
    max_train_examples: int = field(0, "seeded random subset of the training questions (0 = all)")
    n_ei_steps: int = field(5, "expert-iteration steps")
    max_minutes: float = field(0.0, "wall-clock budget: past it, the next step is the last "
                               "(final evaluation + checkpoint; --resume continues) (0 = none)")
    questions_per_step: int = field(512, "questions sampled per EI step (the course's D_b: 512 / 1024 / 2048)")
    rollouts_per_question: int = field(4, "responses sampled per question (G)")
    sampling_temperature: float = field(1.0, "rollout temperature")
    sampling_min_tokens: int = field(4, "no EOS/stop before this many tokens")
    sampling_max_tokens: int = field(1024, "response length limit")
    stop: tuple[str, ...] = field(("</answer>",), "stop strings (kept in the response)")
    sft_epochs: int = field(1, "SFT passes over each step's correct responses")
    batch_size: int = field(64, "examples per optimizer step")
    gradient_accumulation_steps: int = field(8, "micro-batches per optimizer step")
    learning_rate: float = field(1e-5, "AdamW learning rate (constant)")
    weight_decay: float = field(0.0, "AdamW weight decay")
    adam_beta1: float = field(0.9, "AdamW beta1")
    adam_beta2: float = field(0.95, "AdamW beta2")
    max_grad_norm: float = field(1.0, "gradient clipping (<= 0: off)")
    eval_every: int = field(1, "evaluate every this many EI steps (0 = only at the start and the end)")
    eval_examples: int = field(1024, "validation questions (0 = the whole split)")
    eval_temperature: float = field(1.0, "evaluation sampling temperature (0 = greedy)")
    eval_max_tokens: int = field(1024, "evaluation response length limit")
    checkpoint_every: int = field(0, "checkpoint every this many EI steps (0 = only at the end)")
    resume: bool = field(False, "continue from the latest checkpoint in out_dir")
    seed: int = field(0, "seed of question sampling, rollouts and shuffling")
    device: str | None = field(None, "cuda | cpu (default: cuda when available)")
    precision: str | None = field(None, "bf16-mixed | bf16 | fp32 (default: bf16-mixed on CUDA, fp32 on CPU)")
    rollout_backend: str = field("builtin", "builtin | vllm")
    rollout_max_batch_size: int = field(512, "sequences decoded at once by the rollout engine")

    def __post_init__(self):
        if self.batch_size < self.gradient_accumulation_steps:
            raise ValueError("batch_size must be >= gradient_accumulation_steps")
        if self.precision not in (None, "bf16-mixed", "bf16", "fp32"):
            raise ValueError("precision must be bf16-mixed, bf16 or fp32")


PRESETS: dict[str, dict[str, Any]] = {
    # Meant to start from the SFT model (scripts/rl_recipe.sh): the base model almost never produces
    # the r1_zero format, so it has no correct samples to keep.
    "smollm2-gsm8k": {"n_ei_steps": 5, "questions_per_step": 1024, "rollouts_per_question": 8, "sft_epochs": 1,
                          "batch_size": 64, "gradient_accumulation_steps": 4, "learning_rate": 2e-5,
                          "sampling_max_tokens": 512, "eval_max_tokens": 512, "eval_examples": 0,
                          "rollout_max_batch_size": 1024},
}


def train_expert_iteration(
    cfg: EIConfig,
    policy: Policy | None = None,
    reward_fn: Callable[[str, str], dict[str, float]] | None = None,
    train_examples: list[dict[str, str]] | None = None,
    eval_examples: list[dict[str, str]] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run expert iteration; returns the final metrics. Overrides as in ``grpo.train_grpo``."""
    device = resolve_device(cfg.device)
    precision = cfg.precision or default_precision(device)
    seed_everything(cfg.seed)
    ckpt = None
    if policy is None:
        policy, ckpt = load_run_policy(cfg.model, cfg.out_dir, cfg.resume, device, param_dtype(precision), cfg.tokenizer)
    if reward_fn is None:
        from cs336_alignment.grading import r1_zero_reward_fn as reward_fn
    if train_examples is None:
        train_examples = qa_examples(cfg.train_data, "train", cfg.max_train_examples, cfg.seed)
    train_prompts = build_prompts(cfg.prompt, train_examples)
    tokenizer, pad_id = policy.tokenizer, pad_id_of(policy.tokenizer)

    from cs336_alignment.rollout import SamplingParams

    engine = make_rollout_engine(policy, device, cfg.rollout_backend, cfg.rollout_max_batch_size)
    evaluator = Evaluator.from_config(cfg, engine, eval_examples, reward_fn)
    optimizer = make_optimizer(policy.model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    set_lr(optimizer, cfg.learning_rate)
    start = load_trainer_state(ckpt, optimizer)["step"] if ckpt is not None else 0
    log = RunLog(cfg.out_dir, cfg, resume=ckpt is not None, quiet=quiet)
    final: dict[str, Any] = {}

    with EarlyStop(cfg.max_minutes) as early:
        for step in range(start, cfg.n_ei_steps + 1):
            last = step == cfg.n_ei_steps or (step > start and early.now())
            if evaluator.prompts and (step == start or last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
                final.update(evaluator.run(policy, log, step))
            if step > start and (last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
                save_checkpoint(cfg.out_dir, step, policy, optimizer, cfg)
            if last:
                break

            # ---- sample G responses per question, keep the correct ones
            t0 = time.perf_counter()
            engine.load_weights(policy.model)
            rng = random.Random(cfg.seed * 1_000_003 + step)
            picked = rng.sample(range(len(train_examples)), min(cfg.questions_per_step, len(train_examples)))
            prompt_ids = prompt_token_ids(tokenizer, [train_prompts[i] for i in picked])
            params = SamplingParams(temperature=cfg.sampling_temperature, max_new_tokens=cfg.sampling_max_tokens,
                                    min_new_tokens=cfg.sampling_min_tokens, stop=cfg.stop, n=cfg.rollouts_per_question,
                                    seed=cfg.seed * 1_000_003 + step)
            outs = engine.generate(prompt_ids, params)
            t1 = time.perf_counter()
            kept_prompts, kept_outputs, lengths, questions_solved = [], [], [], 0
            for i, ids, group in zip(picked, prompt_ids, outs):
                correct = [c for c in group if reward_fn(c.text, train_examples[i]["answer"])["reward"] == 1.0]
                kept_prompts += [ids] * len(correct)
                kept_outputs += [c.token_ids for c in correct]
                questions_solved += bool(correct)
                lengths += [len(c.token_ids) for c in group]
            t2 = time.perf_counter()

            # ---- SFT on the kept responses (their sampled token ids)
            sums, n_opt = {"loss": 0.0, "entropy": 0.0, "grad_norm": 0.0}, 0
            for epoch in range(cfg.sft_epochs if kept_outputs else 0):
                order = torch.randperm(len(kept_outputs), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 97 + epoch))
                for rows in order.split(cfg.batch_size):
                    batch = pack_prompt_and_output_ids([kept_prompts[r] for r in rows], [kept_outputs[r] for r in rows], pad_id)
                    metrics = sft_step(policy, optimizer, batch, min(cfg.gradient_accumulation_steps, len(rows)),
                                       cfg.max_grad_norm, device, precision)
                    for k in sums:
                        sums[k] += metrics[k]
                    n_opt += 1
            t3 = time.perf_counter()

            record = {
                "frac_correct": len(kept_outputs) / max(1, len(lengths)),
                "questions_solved": questions_solved / max(1, len(picked)),
                "n_kept": len(kept_outputs),
                "optimizer_steps": n_opt,
                **{k: v / max(1, n_opt) for k, v in sums.items()},
                "response_tokens": sum(lengths) / max(1, len(lengths)),
                "rollout_s": t1 - t0,
                "scoring_s": t2 - t1,
                "training_s": t3 - t2,
            }
            log.log("train", step + 1, **record)
            final.update(record)
    final.update(early.result())

    plot_log(log.path, log.out_dir / "curves.png", {
        "fraction of samples correct": ("train", "frac_correct"), "SFT loss": ("train", "loss"),
        "entropy": ("train", "entropy"), "validation accuracy": ("eval", "accuracy"),
        "validation format rate": ("eval", "format_rate"), "response tokens": ("train", "response_tokens"),
    }, title="Expert iteration")
    return final


def cli_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EIConfig, argv, "Expert iteration: sample, keep the correct responses, SFT, repeat.", PRESETS)
    final = train_expert_iteration(cfg)
    print_summary(final, cfg)
    return exit_status(final)  # 130 / 143 after Ctrl-C / SIGTERM: resumable
