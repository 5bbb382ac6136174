"""GRPO and its policy-gradient relatives (CS336 assignment 5, sec. 7; DeepSeekMath, Shao et al. 2024).

One GRPO step: sample ``rollout_batch_size / group_size`` questions, draw ``group_size``
responses each from the rollout engine, score them (``grading.r1_zero_reward_fn``), normalize
rewards within each group, then take ``epochs_per_rollout_batch * rollout_batch_size /
train_batch_size`` optimizer steps on the batch (on-policy when that is 1, off-policy otherwise,
with old log-probs from a no-grad pass before training, or the rollout engine's with
``--old_log_probs engine``). Each optimizer step's rows are sorted by length before they are cut
into micro-batches, so each is padded little (the gradient is the same sum). Losses, advantages
and length normalization are the pure functions of ``losses.py``. ``--dynamic_sampling_rounds N`` (DAPO's
dynamic sampling, Yu et al. 2025) samples up to N rounds of questions per step and trains first on
the groups whose rewards differ: with sparse rewards most groups are all-wrong and add no gradient.

    cs336-alignment grpo --model ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --n_grpo_steps 100 --rollout_batch_size 256 --group_size 8 --loss_type grpo_clip

Logs (``out_dir/log.jsonl``, one "train" record per GRPO step, "eval" records on a schedule):
reward / format reward / answer reward, entropy, response length, clip fraction, gradient norm,
validation accuracy, and the step time split into rollout / scoring / training.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from cs336_basics.train import exit_status

from cs336_alignment import losses
from cs336_alignment.losses import LengthNormalization, LossType
from cs336_alignment.models import Policy
from cs336_alignment.sft_data import pack_prompt_and_output_ids, pad_id_of, qa_examples
from cs336_alignment.train_utils import (
    EarlyStop,
    Evaluator,
    RunLog,
    autocast,
    build_prompts,
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
    place_response_values,
    plot_log,
    print_summary,
    prompt_token_ids,
    required,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_lr,
    sort_by_length,
    warmup_constant_lr,
)

OldLogProbs = Literal["recompute", "engine"]


@dataclass(frozen=True)
class GRPOConfig:
    model: str = required("policy to train: HF directory, .gguf file, or cs336_basics checkpoint")
    tokenizer: str | None = field(None, "tokenizer directory of a cs336_basics checkpoint")
    out_dir: str = field("runs/grpo", "log, checkpoints, plots")
    train_data: str = field("gsm8k", "gsm8k | math | JSONL of question/answer")
    eval_data: str = field("gsm8k", "gsm8k | math | math500 | JSONL of question/answer")
    eval_split: str = field("test", "split of eval_data")
    prompt: str = field("r1_zero", "prompt template (prompts/*.prompt)")
    max_train_examples: int = field(0, "use a seeded random subset of the training questions (0 = all)")
    n_grpo_steps: int = field(200, "rollout batches (GRPO steps)")
    max_minutes: float = field(0.0, "wall-clock budget: past it, the next step is the last "
                               "(final evaluation + checkpoint; --resume continues) (0 = none)")
    learning_rate: float = field(1e-5, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = field(0, "linear warm-up, in GRPO steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    adam_beta1: float = field(0.9, "AdamW beta1")
    adam_beta2: float = field(0.95, "AdamW beta2")
    advantage_eps: float = field(1e-6, "added to the group std")
    rollout_batch_size: int = field(256, "responses per GRPO step (questions x group_size)")
    group_size: int = field(8, "responses per question")
    dynamic_sampling_rounds: int = field(1, "DAPO dynamic sampling: up to this many rollout rounds per step, "
                                         "training first on the groups whose rewards differ (1 = off)")
    sampling_temperature: float = field(1.0, "rollout temperature")
    sampling_top_p: float = field(1.0, "rollout nucleus mass")
    sampling_min_tokens: int = field(4, "no EOS/stop before this many tokens")
    sampling_max_tokens: int = field(1024, "response length limit")
    stop: tuple[str, ...] = field(("</answer>",), "stop strings (kept in the response)")
    epochs_per_rollout_batch: int = field(1, "passes over each rollout batch (>1: off-policy)")
    old_log_probs: OldLogProbs = field(  # noqa: RUF009
        "recompute", "off-policy GRPO-Clip/No-Clip's old log-probs: recompute (a no-grad pass under the rollout "
        "weights; the first optimizer step, still at those weights, uses its own) | engine (the rollout engine's "
        "sampled log-probs, no extra pass; needs sampling_temperature 1 and sampling_top_p 1)")
    length_sorted_microbatches: bool = field(True, "order each optimizer step's rows by length before cutting "
                                             "micro-batches (less padding, the same gradient)")
    train_batch_size: int = field(256, "responses per optimizer step")
    gradient_accumulation_steps: int = field(128, "micro-batches per optimizer step")
    loss_type: LossType = field(  # noqa: RUF009  (field() is dataclasses.field with a help text)
        "reinforce_with_baseline", "no_baseline | reinforce_with_baseline | grpo_clip | grpo_no_clip")
    use_std_normalization: bool = field(True, "divide advantages by the group std (off: Dr. GRPO)")
    length_normalization: LengthNormalization = field(  # noqa: RUF009
        "masked_mean", "masked_mean (per response) | masked_normalize (Dr. GRPO)")
    normalize_constant: float | None = field(None, "masked_normalize divisor (default: sampling_max_tokens)")
    cliprange: float = field(0.2, "GRPO-Clip epsilon")
    max_grad_norm: float = field(1.0, "gradient clipping (<= 0: off)")
    eval_every: int = field(10, "evaluate every this many GRPO steps (0 = only at the start and the end)")
    eval_examples: int = field(1024, "validation questions (0 = the whole split)")
    eval_temperature: float = field(1.0, "evaluation sampling temperature (0 = greedy)")
    eval_max_tokens: int = field(1024, "evaluation response length limit")
    checkpoint_every: int = field(0, "checkpoint every this many GRPO steps (0 = only at the end)")
    resume: bool = field(False, "continue from the latest checkpoint in out_dir")
    seed: int = field(0, "seed of question sampling, rollouts and initialization")
    device: str | None = field(None, "cuda | cpu (default: cuda when available)")
    precision: str | None = field(None, "bf16-mixed | bf16 | fp32 (default: bf16-mixed on CUDA, fp32 on CPU)")
    rollout_backend: str = field("builtin", "builtin | vllm")
    rollout_max_batch_size: int = field(512, "sequences decoded at once by the rollout engine")

    def __post_init__(self):
        if self.dynamic_sampling_rounds < 1:
            raise ValueError("dynamic_sampling_rounds must be >= 1 (1 = off)")
        if self.rollout_batch_size % self.group_size:
            raise ValueError("rollout_batch_size must be a multiple of group_size")
        if self.train_batch_size % self.gradient_accumulation_steps:
            raise ValueError("train_batch_size must be a multiple of gradient_accumulation_steps")
        if self.rollout_batch_size % self.train_batch_size:
            raise ValueError("rollout_batch_size must be a multiple of train_batch_size")
        if self.loss_type not in losses.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {losses.LOSS_TYPES}")
        if self.length_normalization not in losses.LENGTH_NORMALIZATIONS:
            raise ValueError(f"length_normalization must be one of {losses.LENGTH_NORMALIZATIONS}")
        if self.precision not in (None, "bf16-mixed", "bf16", "fp32"):
            raise ValueError("precision must be bf16-mixed, bf16 or fp32")
        if self.old_log_probs not in ("recompute", "engine"):
            raise ValueError("old_log_probs must be recompute or engine")
        if self.old_log_probs == "engine" and (self.sampling_temperature != 1.0 or self.sampling_top_p != 1.0):
            # the policy's log-probs are of the unmodified distribution; an engine samples (and, as vLLM
            # may, reports log-probs) from the tempered / truncated one
            raise ValueError("old_log_probs='engine' needs sampling_temperature 1 and sampling_top_p 1 (got "
                             f"{self.sampling_temperature}, {self.sampling_top_p}); use old_log_probs='recompute'")

    @property
    def off_policy(self) -> bool:
        """More than one optimizer step per rollout batch: later steps see a stale policy's samples."""
        return self.epochs_per_rollout_batch * self.rollout_batch_size // self.train_batch_size > 1


PRESETS: dict[str, dict[str, Any]] = {
    # The course's defaults (Qwen2.5-Math-1.5B, MATH) are the dataclass defaults.
    # SmolLM2-135M on GSM8K within ~30 min of H100 time (see scripts/rl_recipe.sh).
    # Groups of 32: at a ~2.5% pass rate a group of 8 is all-wrong (no gradient) 87% of the time,
    # one of 32 about half as often; micro-batches of 32 because the step is host-bound at 16 (64
    # rows x 700 tokens x 49K vocab of fp32 logits and their temporaries took over 100 GB). Old
    # log-probs from the engine (T = 1, top_p = 1: they equal a recompute, tests/test_grpo_step.py): the
    # step skips the no-grad pass. On the GPU the engine is a bf16 copy; the log's old_logp_abs_diff is the gap.
    "smollm2-gsm8k": {"n_grpo_steps": 100, "rollout_batch_size": 512, "group_size": 32, "train_batch_size": 256,
                          "gradient_accumulation_steps": 8, "sampling_max_tokens": 512, "eval_max_tokens": 512,
                          "learning_rate": 2e-5, "loss_type": "grpo_clip", "epochs_per_rollout_batch": 1, "eval_every": 10,
                          "eval_examples": 0, "rollout_max_batch_size": 1024, "old_log_probs": "engine"},
}


def recompute_old_log_probs(model: torch.nn.Module, cfg: GRPOConfig, batch: dict[str, torch.Tensor], rows: torch.Tensor,
                            device: torch.device, precision: str, out: torch.Tensor) -> int:
    """The no-grad log-probs of ``rows`` (under the current weights) into ``out`` ``(B, T)`` on ``device``;
    returns the padded positions processed."""
    micro_size = cfg.train_batch_size // cfg.gradient_accumulation_steps
    if cfg.length_sorted_microbatches:
        rows = sort_by_length(batch, rows)
    padded = 0
    with torch.no_grad(), autocast(device, precision):
        for chunk, mb in microbatches(batch, rows, micro_size, device):
            lp = losses.get_response_log_probs(model, mb["input_ids"], mb["labels"])["log_probs"]
            out[chunk.to(device), : lp.shape[1]] = lp.float()  # stays on device: no host sync per micro-batch
            padded += lp.numel()
    return padded


def backward_micro_batches(
    model: torch.nn.Module,
    cfg: GRPOConfig,
    batch: dict[str, torch.Tensor],
    rows: torch.Tensor,
    raw_rewards: torch.Tensor,
    advantages: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    device: torch.device,
    precision: str,
    totals: dict[str, Any],
    first_step: bool = False,
) -> None:
    """Forward/backward of one optimizer step's ``rows``, cut into micro-batches in the given order: their
    gradients add up in ``.grad``. ``raw_rewards``/``advantages`` ``(B,)`` and ``old_log_probs`` ``(B, T)``
    (None: on-policy) are on ``device``. ``first_step``: the weights are still the rollout weights, so with
    ``old_log_probs="recompute"`` the rows' old log-probs are their detached log-probs of this pass, written
    into ``old_log_probs`` for later epochs. Adds device scalars to ``totals`` (read once per GRPO step:
    no host sync per micro-batch) and the padded positions processed to ``totals["padded_tokens"]``.
    """
    micro_size = cfg.train_batch_size // cfg.gradient_accumulation_steps
    normalize_constant = cfg.normalize_constant or float(cfg.sampling_max_tokens)
    for chunk, mb in microbatches(batch, rows, micro_size, device):
        chunk = chunk.to(device)
        with autocast(device, precision):
            out = losses.get_response_log_probs(model, mb["input_ids"], mb["labels"], return_token_entropy=True)
        logp, mask = out["log_probs"], mb["response_mask"]
        width = logp.shape[1]
        if old_log_probs is None:
            old = logp.detach()
        elif first_step and cfg.old_log_probs == "recompute":
            old = logp.detach()
            old_log_probs[chunk, :width] = old
        else:
            old = old_log_probs[chunk, :width]
        loss, meta = losses.grpo_microbatch_train_step(
            logp, mask, cfg.gradient_accumulation_steps, cfg.loss_type,
            raw_rewards=raw_rewards[chunk, None], advantages=advantages[chunk, None],
            old_log_probs=old, cliprange=cfg.cliprange,
            length_normalization=cfg.length_normalization, normalize_constant=normalize_constant)
        totals["loss"] = totals["loss"] + loss
        totals["entropy"] = totals["entropy"] + (out["token_entropy"] * mask).sum()
        if "clipped" in meta:
            totals["clipped"] = totals["clipped"] + (meta["clipped"] & mask).sum()
        totals["tokens"] = totals["tokens"] + mask.sum()
        if first_step and old_log_probs is not None:
            # same weights as the rollout: how far the old log-probs are from this pass's (0 when recomputed)
            totals["old_diff"] = totals["old_diff"] + ((logp.detach() - old).abs() * mask).sum()
            totals["old_tokens"] = totals["old_tokens"] + mask.sum()
        totals["padded_tokens"] += logp.numel()


def train_grpo(
    cfg: GRPOConfig,
    policy: Policy | None = None,
    reward_fn: Callable[[str, str], dict[str, float]] | None = None,
    train_examples: list[dict[str, str]] | None = None,
    eval_examples: list[dict[str, str]] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run GRPO; returns the final metrics. ``policy``/``reward_fn``/examples override the config's
    (tests use a tiny model on a toy task; examples are ``{"question" | "prompt", "answer"}``)."""
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
    tokenizer = policy.tokenizer
    pad_id = pad_id_of(tokenizer)

    from cs336_alignment.rollout import SamplingParams

    engine = make_rollout_engine(policy, device, cfg.rollout_backend, cfg.rollout_max_batch_size)
    evaluator = Evaluator.from_config(cfg, engine, eval_examples, reward_fn)
    optimizer = make_optimizer(policy.model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    start = load_trainer_state(ckpt, optimizer)["step"] if ckpt is not None else 0
    log = RunLog(cfg.out_dir, cfg, resume=ckpt is not None, quiet=quiet)

    n_questions = cfg.rollout_batch_size // cfg.group_size
    final: dict[str, Any] = {}

    with EarlyStop(cfg.max_minutes) as early:
        for step in range(start, cfg.n_grpo_steps + 1):
            last = step == cfg.n_grpo_steps or (step > start and early.now())
            lr = warmup_constant_lr(step, cfg.learning_rate, cfg.warmup_steps)
            set_lr(optimizer, lr)

            # ---- evaluation and checkpoint (before the step: step 0 is the starting policy)
            if evaluator.prompts and (step == start or last or (cfg.eval_every > 0 and step % cfg.eval_every == 0)):
                final.update(evaluator.run(policy, log, step))
            if step > start and (last or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
                save_checkpoint(cfg.out_dir, step, policy, optimizer, cfg)
            if last:
                break

            # ---- rollouts and scoring: G responses for each of n_questions questions (seeded by step:
            # resumable); with dynamic sampling, more rounds until n_questions groups have rewards that
            # differ (all-equal groups have zero advantage), all-equal ones filling what is left
            t0 = time.perf_counter()
            engine.load_weights(policy.model)  # in-place copy into the rollout engine's weights
            kept: list[tuple[list[int], list[Any], torch.Tensor]] = []  # prompt ids, G completions, G rewards
            fillers: list[tuple[list[int], list[Any], torch.Tensor]] = []
            rollout_s = scoring_s = 0.0
            generated = 0  # tokens sampled in all rounds
            for rnd in range(cfg.dynamic_sampling_rounds):
                t_round = time.perf_counter()
                seed = cfg.seed * 1_000_003 + step + rnd * 1_000_000_007
                rng = random.Random(seed)
                picked = rng.sample(range(len(train_examples)), n_questions) if n_questions <= len(train_examples) \
                    else [rng.randrange(len(train_examples)) for _ in range(n_questions)]
                prompt_ids = prompt_token_ids(tokenizer, [train_prompts[i] for i in picked])
                params = SamplingParams(temperature=cfg.sampling_temperature, top_p=cfg.sampling_top_p,
                                        max_new_tokens=cfg.sampling_max_tokens, min_new_tokens=cfg.sampling_min_tokens,
                                        stop=cfg.stop, n=cfg.group_size, seed=seed)
                outs = engine.generate(prompt_ids, params)
                t_scored = time.perf_counter()
                truths = [train_examples[i]["answer"] for i in picked for _ in range(cfg.group_size)]
                _, round_rewards, round_meta = losses.compute_group_normalized_rewards(
                    reward_fn, [c.text for group in outs for c in group], truths, cfg.group_size,
                    cfg.advantage_eps, cfg.use_std_normalization)
                if rnd == 0:
                    reward_meta = round_meta  # the policy's own reward statistics (round 0 is an unbiased sample)
                useful = losses.informative_groups(round_rewards, cfg.group_size).tolist()
                for j, (ids, group) in enumerate(zip(prompt_ids, outs)):
                    rewards = round_rewards[j * cfg.group_size:(j + 1) * cfg.group_size]
                    (kept if useful[j] or cfg.dynamic_sampling_rounds == 1 else fillers).append((ids, group, rewards))
                rollout_s += t_scored - t_round
                generated += sum(len(c.token_ids) for group in outs for c in group)
                scoring_s += time.perf_counter() - t_scored
                if len(kept) >= n_questions:
                    break
            batch_groups = (kept + fillers)[:n_questions]
            prompt_ids = [ids for ids, _, _ in batch_groups]
            completions = [c for _, group, _ in batch_groups for c in group]  # group by group
            raw_rewards = torch.cat([r for _, _, r in batch_groups])
            advantages = losses.group_normalize(raw_rewards, cfg.group_size, cfg.advantage_eps, cfg.use_std_normalization)
            t2 = time.perf_counter()

            # ---- training on the rollout batch (the sampled token ids, not a re-tokenization of the text)
            batch = pack_prompt_and_output_ids([p for p in prompt_ids for _ in range(cfg.group_size)],
                                               [c.token_ids for c in completions], pad_id)
            policy.model.train()
            # the rows of every optimizer step, drawn before any forward pass (the forward draws from the RNG)
            step_rows = [rows for _ in range(cfg.epochs_per_rollout_batch)
                         for rows in torch.randperm(cfg.rollout_batch_size).split(cfg.train_batch_size)]
            old_log_probs = None  # (B, T) on device; None: on-policy, the loss uses the detached log-probs
            recompute_tokens = 0
            if cfg.loss_type in ("grpo_clip", "grpo_no_clip") and cfg.off_policy:
                if cfg.old_log_probs == "engine":
                    old_log_probs = place_response_values(batch["response_mask"], [c.logprobs for c in completions]).to(device)
                else:  # the first optimizer step fills in its own rows; the rest of the first epoch needs a pass now
                    old_log_probs = torch.zeros(batch["labels"].shape, device=device)
                    rest = step_rows[1:cfg.rollout_batch_size // cfg.train_batch_size]
                    if rest:
                        recompute_tokens = recompute_old_log_probs(policy.model, cfg, batch, torch.cat(rest), device,
                                                                   precision, old_log_probs)
            rewards_dev, advantages_dev = raw_rewards.to(device), advantages.to(device)
            totals = {k: torch.zeros((), device=device) for k in ("loss", "entropy", "clipped", "tokens", "old_diff", "old_tokens")}
            totals["padded_tokens"] = 0
            grad_norms = []
            for i, rows in enumerate(step_rows):
                if cfg.length_sorted_microbatches:
                    rows = sort_by_length(batch, rows)
                backward_micro_batches(policy.model, cfg, batch, rows, rewards_dev, advantages_dev, old_log_probs, device,
                                       precision, totals, first_step=i == 0)
                grad_norms.append(grad_norm_and_clip(policy.model, cfg.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            n_micro = len(step_rows) * cfg.gradient_accumulation_steps
            loss_sum, entropy_sum, clipped, tokens, old_diff, old_tokens = torch.stack(
                [totals[k] for k in ("loss", "entropy", "clipped", "tokens", "old_diff", "old_tokens")]).tolist()  # one sync
            t3 = time.perf_counter()

            # ---- log
            lengths = [len(c.token_ids) for c in completions]
            record = {
                **{k.removesuffix("_mean"): v for k, v in reward_meta.items() if k.endswith("_mean")},
                "reward_std": reward_meta["reward_std"],
                "frac_groups_all_equal": reward_meta["frac_groups_all_equal"],
                "frac_trained_groups_informative": losses.informative_groups(raw_rewards, cfg.group_size).float().mean().item(),
                "sampling_rounds": rnd + 1,
                "loss": loss_sum * cfg.gradient_accumulation_steps / n_micro,  # mean over optimizer steps
                # per response token of all micro-batches (not a mean of micro-batch means: independent of the grouping)
                "entropy": entropy_sum / max(1.0, tokens),
                "clip_fraction": clipped / max(1.0, tokens),
                "grad_norm": sum(grad_norms) / len(grad_norms),
                **({"old_logp_abs_diff": old_diff / max(1.0, old_tokens)} if old_log_probs is not None else {}),
                "padded_tokens": totals["padded_tokens"],
                "recompute_tokens": recompute_tokens,
                "response_tokens": sum(lengths) / len(lengths),
                "frac_truncated": sum(c.finish_reason == "length" for c in completions) / len(completions),
                "lr": lr,
                "rollout_s": rollout_s,
                "scoring_s": scoring_s,
                "training_s": t3 - t2,
                "step_s": t3 - t0,
                "rollout_tok_per_s": generated / max(rollout_s, 1e-9),
            }
            log.log("train", step + 1, **record)
            final.update(record)
    final.update(early.result())

    _plots(log)
    return final


def _plots(log: RunLog) -> None:
    plot_log(log.path, log.out_dir / "curves.png", {
        "reward (train)": ("train", "reward"),
        "answer reward (train)": ("train", "answer_reward"),
        "format reward (train)": ("train", "format_reward"),
        "validation accuracy": ("eval", "accuracy"),
        "validation format rate": ("eval", "format_rate"),
        "entropy": ("train", "entropy"),
        "response tokens": ("train", "response_tokens"),
        "clip fraction": ("train", "clip_fraction"),
        "grad norm": ("train", "grad_norm"),
        "step time: rollout (s)": ("train", "rollout_s"),
        "step time: training (s)": ("train", "training_s"),
    }, title="GRPO")


def cli_main(argv: list[str] | None = None) -> int:
    cfg = parse_config(GRPOConfig, argv, "GRPO / policy-gradient training with the rollout engine.", PRESETS)
    final = train_grpo(cfg)
    print_summary(final, cfg)
    return exit_status(final)  # 130 / 143 after Ctrl-C / SIGTERM: resumable
