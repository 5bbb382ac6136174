"""The math of SFT, policy-gradient RL (REINFORCE, GRPO) and DPO as small pure functions.

Shapes: ``B`` = batch (rollouts), ``T`` = sequence positions (labels), ``V`` = vocabulary,
``G`` = group size (rollouts per question). Training programs (``sft.py``, ``grpo.py``,
``expert_iteration.py``, ``dpo.py``) compose these; nothing here knows about optimizers or data.

References:
- GRPO: Shao et al. 2024, "DeepSeekMath" (group-normalized advantages, clipped surrogate).
- PPO clip objective: Schulman et al. 2017.
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training" (no std normalization,
  sum over tokens divided by a constant instead of per-sequence length normalization).
- DPO: Rafailov et al. 2023, eq. 7.
- CS336 (Spring 2025) assignment 5 and its supplement define the exact function contracts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]
LengthNormalization = Literal["masked_mean", "masked_normalize"]
LOSS_TYPES: tuple[str, ...] = ("no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip")
LENGTH_NORMALIZATIONS: tuple[str, ...] = ("masked_mean", "masked_normalize")


# --------------------------------------------------------------------------- per-token quantities


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution: ``(..., V) -> (...)``.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v``, in float32 without forming ``log p`` (no
    ``0 * -inf``); ``-inf`` logits (masked vocab entries) contribute 0.
    """
    # shift by the max first: logsumexp(z) and E_p[z] are both ~max(z), and subtracting two large
    # fp32 numbers would lose the entropy's digits
    logits = logits.float()
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)
    finite = torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - (probs * finite).sum(dim=-1)


def model_logits(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """Logits ``(B, T, V)`` of a HF causal LM (output ``.logits``) or of a plain module returning them."""
    # a HF model would otherwise build a KV cache that a training forward never reads
    kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", False) else {}
    out = model(input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def get_response_log_probs(
    model: torch.nn.Module, input_ids: Tensor, labels: Tensor, return_token_entropy: bool = False
) -> dict[str, Tensor]:
    """Per-token log-probabilities ``log p(labels[b, t] | input_ids[b, :t+1])``.

    input_ids, labels: ``(B, T)`` (labels = inputs shifted by one, as ``tokenize_prompt_and_output``
    makes them). Returns ``{"log_probs": (B, T)}`` (float32, differentiable) and, when asked,
    ``"token_entropy": (B, T)`` (detached: a diagnostic, never a loss term here).
    Padding is on the right, so a causal model needs no attention mask for the real tokens.
    """
    logits = model_logits(model, input_ids).float()  # (B, T, V), fp32 for the log-softmax
    # gather - logsumexp avoids materializing a second (B, T, V) log-softmax tensor
    chosen = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    out = {"log_probs": chosen - torch.logsumexp(logits, dim=-1)}
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = compute_entropy(logits)
    return out


# --------------------------------------------------------------------------- masked reductions


def masked_mean(tensor: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``tensor`` over the elements where ``mask`` is nonzero (along ``dim``, or all).

    Rows with no unmasked element give 0 (not NaN), so a fully masked response contributes
    nothing to a loss instead of poisoning the step.
    """
    mask = mask.to(tensor.dtype)
    total = (tensor * mask).sum() if dim is None else (tensor * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    # safe denominator: a 0/0 in an unused torch.where branch would still give NaN gradients
    return total / torch.where(count == 0, torch.ones_like(count), count)


def masked_normalize(
    tensor: Tensor, mask: Tensor, dim: int | None = None, normalize_constant: float = 1.0
) -> Tensor:
    """Sum of ``tensor`` over ``mask`` (along ``dim``, or all) divided by a constant.

    With the constant set to the maximum generation length this is Dr. GRPO's length
    normalization: every token weighs the same whatever the length of its response.
    """
    masked = tensor * mask.to(tensor.dtype)
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    return total / normalize_constant


def aggregate_token_loss(
    per_token_loss: Tensor,
    response_mask: Tensor,
    length_normalization: LengthNormalization = "masked_mean",
    normalize_constant: float | None = None,
) -> Tensor:
    """``(B, T)`` per-token loss -> scalar: per-sequence reduction over response tokens, then batch mean.

    ``"masked_mean"`` divides each sequence by its own length (GRPO as published);
    ``"masked_normalize"`` divides by ``normalize_constant`` (default ``T``), as in Dr. GRPO.
    """
    if length_normalization == "masked_mean":
        per_seq = masked_mean(per_token_loss, response_mask, dim=-1)
    elif length_normalization == "masked_normalize":
        constant = float(per_token_loss.shape[-1]) if normalize_constant is None else normalize_constant
        per_seq = masked_normalize(per_token_loss, response_mask, dim=-1, normalize_constant=constant)
    else:
        raise ValueError(f"length_normalization must be one of {LENGTH_NORMALIZATIONS}, got {length_normalization!r}")
    return per_seq.mean()


# --------------------------------------------------------------------------- SFT


def sft_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward pass of one SFT micro-batch; returns the (scaled) loss and metadata.

    loss = mean_b [ -sum_t mask[b,t] * logp[b,t] / normalize_constant ] / gradient_accumulation_steps.
    Dividing by the accumulation steps makes ``k`` micro-batches of size ``b`` give the gradient
    of one batch of ``k*b``.
    """
    nll = -masked_normalize(policy_log_probs, response_mask, dim=-1, normalize_constant=normalize_constant)
    loss = nll.mean() / gradient_accumulation_steps
    loss.backward()
    num_tokens = response_mask.sum()
    metadata = {
        "nll_per_sequence": nll.mean().detach(),
        "nll_per_token": (-masked_mean(policy_log_probs, response_mask)).detach(),
        "num_response_tokens": num_tokens.detach(),
    }
    return loss.detach(), metadata


# --------------------------------------------------------------------------- rewards and advantages


def group_normalize(
    rewards: Tensor, group_size: int, advantage_eps: float = 1e-6, normalize_by_std: bool = True
) -> Tensor:
    """GRPO advantages ``(N,) -> (N,)``: ``A_i = (r_i - mean_g r) / (std_g r + eps)`` within each group.

    Rewards are laid out group by group (``N = n_questions * G``). Without ``normalize_by_std``
    it is ``r_i - mean_g r`` (Dr. GRPO). A group of identical rewards gets advantage 0; the std
    is the unbiased one (``torch.std``), as in the course; a group of 1 has advantage 0.
    """
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().reshape(-1, group_size)  # (n_questions, G)
    centered = grouped - grouped.mean(dim=-1, keepdim=True)
    if normalize_by_std and group_size > 1:
        centered = centered / (grouped.std(dim=-1, keepdim=True) + advantage_eps)
    return centered.reshape(-1)


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, str], dict[str, float]],
    rollout_responses: list[str],
    repeated_ground_truths: list[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Score rollouts with ``reward_fn`` and group-normalize: ``(advantages (N,), raw_rewards (N,), metadata)``.

    ``repeated_ground_truths[i]`` is the answer for ``rollout_responses[i]`` (each question's answer
    repeated ``group_size`` times). Metadata: mean/std/min/max of the reward, the mean of each
    reward component (``format_reward``, ``answer_reward``), the fraction of groups whose rewards
    are all equal (they carry no learning signal).
    """
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError("one ground truth per rollout response is required")
    scores = [reward_fn(r, gt) for r, gt in zip(rollout_responses, repeated_ground_truths)]
    raw_rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    advantages = group_normalize(raw_rewards, group_size, advantage_eps, normalize_by_std)
    return advantages, raw_rewards, reward_metadata(scores, raw_rewards, group_size)


def informative_groups(raw_rewards: Tensor, group_size: int) -> Tensor:
    """``(N,) -> (N / group_size,)`` bool: the groups whose rewards are not all equal. The others get
    zero advantage after group normalization, so they add no policy gradient (DAPO's dynamic
    sampling, Yu et al. 2025, trains on the informative ones only)."""
    grouped = raw_rewards.reshape(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=-1)


def reward_metadata(scores: list[dict[str, float]], raw_rewards: Tensor, group_size: int) -> dict[str, float]:
    """Summary statistics of one rollout batch's rewards (for logging)."""
    meta = {
        "reward_mean": raw_rewards.mean().item(),
        "reward_std": raw_rewards.std().item() if raw_rewards.numel() > 1 else 0.0,
        "reward_max": raw_rewards.max().item(),
        "reward_min": raw_rewards.min().item(),
        "frac_groups_all_equal": 1.0 - informative_groups(raw_rewards, group_size).float().mean().item(),
    }
    for key in scores[0] if scores else ():
        if key != "reward":
            meta[f"{key}_mean"] = sum(float(s[key]) for s in scores) / len(scores)
    return meta


# --------------------------------------------------------------------------- policy-gradient losses


def _per_sequence(values: Tensor) -> Tensor:
    """Rewards/advantages given as ``(B,)`` or ``(B, 1)`` -> ``(B, 1)`` to broadcast over tokens."""
    return values.reshape(-1, 1) if values.dim() == 1 else values


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: Tensor, policy_log_probs: Tensor) -> Tensor:
    """REINFORCE per-token loss ``-A_b * logp[b, t]``: ``(B, 1), (B, T) -> (B, T)``.

    With raw rewards as ``A`` this is the vanilla policy gradient ("no_baseline"); with
    group-normalized advantages it is REINFORCE with a baseline.
    """
    return -_per_sequence(raw_rewards_or_advantages).to(policy_log_probs.dtype) * policy_log_probs


def compute_grpo_no_clip_loss(
    advantages: Tensor, policy_log_probs: Tensor, old_log_probs: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Unclipped importance-weighted loss ``-ratio * A`` with ``ratio = exp(logp - logp_old)``: ``(B, T)``.

    On-policy (one gradient step per rollout batch) its gradient equals REINFORCE with baseline.
    """
    ratio = torch.exp(policy_log_probs - old_log_probs)
    loss = -ratio * _per_sequence(advantages).to(ratio.dtype)
    return loss, {"ratio": ratio.detach()}


def compute_grpo_clip_loss(
    advantages: Tensor, policy_log_probs: Tensor, old_log_probs: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO-Clip (PPO surrogate) per-token loss ``(B, T)``.

    ``-min(ratio * A, clip(ratio, 1 - c, 1 + c) * A)``. Metadata ``"clipped"`` (bool ``(B, T)``)
    marks tokens where the clipped term is strictly the smaller one, i.e. ratio > 1 + c with
    A > 0 or ratio < 1 - c with A < 0: their gradient is zero.
    """
    adv = _per_sequence(advantages).to(policy_log_probs.dtype)
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, {"clipped": (clipped < unclipped).detach(), "ratio": ratio.detach()}


def compute_policy_gradient_loss(
    policy_log_probs: Tensor,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token ``(B, T)`` loss of the chosen variant and its metadata.

    ``"no_baseline"`` needs raw_rewards; ``"reinforce_with_baseline"`` advantages;
    ``"grpo_no_clip"`` advantages + old_log_probs; ``"grpo_clip"`` those + cliprange.
    """
    def need(name: str, value: Any) -> Any:
        if value is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name}")
        return value

    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(need("raw_rewards", raw_rewards), policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(need("advantages", advantages), policy_log_probs), {}
    if loss_type == "grpo_no_clip":
        return compute_grpo_no_clip_loss(need("advantages", advantages), policy_log_probs, need("old_log_probs", old_log_probs))
    if loss_type == "grpo_clip":
        return compute_grpo_clip_loss(
            need("advantages", advantages), policy_log_probs, need("old_log_probs", old_log_probs), need("cliprange", cliprange)
        )
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    *,
    length_normalization: LengthNormalization = "masked_mean",
    normalize_constant: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Backward pass of one policy-gradient micro-batch; returns the (scaled) loss and metadata.

    loss = aggregate_token_loss(per_token_loss, response_mask) / gradient_accumulation_steps,
    where the aggregation is a per-sequence masked mean (default, as the course specifies) or a
    masked sum / constant (Dr. GRPO), then a batch mean. Metadata adds ``clip_fraction``
    (fraction of response tokens clipped; 0 for unclipped losses).
    """
    per_token, meta = compute_policy_gradient_loss(
        policy_log_probs, loss_type, raw_rewards, advantages, old_log_probs, cliprange
    )
    loss = aggregate_token_loss(per_token, response_mask, length_normalization, normalize_constant)
    loss = loss / gradient_accumulation_steps
    loss.backward()
    clipped = meta.get("clipped")
    meta["clip_fraction"] = (
        masked_mean(clipped.float(), response_mask) if clipped is not None else torch.zeros(())
    )
    return loss.detach(), meta


# --------------------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
) -> Tensor:
    """DPO loss (Rafailov et al. 2023, eq. 7), elementwise over pairs.

    ``-log sigmoid(beta * [(logpi(y_w|x) - logref(y_w|x)) - (logpi(y_l|x) - logref(y_l|x))])``,
    each argument the summed log-probability of a whole response given the prompt.
    """
    margin = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)
    return -F.logsigmoid(beta * margin)


def sequence_log_prob(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Summed log-probability of each response: ``(B,)`` from a ``tokenize_prompt_and_output`` batch."""
    device = next(model.parameters()).device
    log_probs = get_response_log_probs(model, batch["input_ids"].to(device), batch["labels"].to(device))["log_probs"]
    return masked_normalize(log_probs, batch["response_mask"].to(device), dim=-1)


def per_instance_dpo_loss(
    lm: torch.nn.Module,
    lm_ref: torch.nn.Module,
    tokenizer: Any,
    beta: float,
    prompt: str,
    response_chosen: str,
    response_rejected: str,
) -> Tensor:
    """DPO loss of one preference pair (the supplement's contract), a scalar.

    The prompt is rendered with the instruction (Alpaca) template and each response ends with
    EOS. Only response tokens are summed: the prompt's log-probabilities are the same for both
    responses and cancel in the DPO margin. The reference model runs without gradients.
    """
    from cs336_alignment.sft_data import instruction_pair_batch

    batch = instruction_pair_batch(tokenizer, [prompt, prompt], [response_chosen, response_rejected])
    policy = sequence_log_prob(lm, batch)
    with torch.no_grad():
        ref = sequence_log_prob(lm_ref, batch).to(policy.device)
    return dpo_loss(policy[0], policy[1], ref[0], ref[1], beta)
