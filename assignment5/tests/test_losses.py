"""Loss and normalization functions against hand-computed values and independent autograd references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cs336_alignment import losses
from cs336_alignment.adapters import (
    run_compute_entropy,
    run_compute_group_normalized_rewards,
    run_compute_grpo_clip_loss,
    run_compute_naive_policy_gradient_loss,
    run_compute_policy_gradient_loss,
    run_get_response_log_probs,
    run_grpo_microbatch_train_step,
    run_masked_mean,
    run_masked_normalize,
    run_sft_microbatch_train_step,
)

# ----------------------------------------------------------------------------- entropy, log-probs


def test_entropy_hand_values_and_stability():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 0.0, 0.0], [1e4, 1e4, -1e4, -1e4]])
    got = run_compute_entropy(logits)
    torch.testing.assert_close(got, torch.tensor([math.log(4), 0.0, math.log(2)]), atol=1e-5, rtol=0)
    # masked-out vocabulary entries (-inf) contribute nothing
    masked = torch.tensor([[0.0, 0.0, float("-inf")]])
    torch.testing.assert_close(run_compute_entropy(masked), torch.tensor([math.log(2)]))


def test_entropy_matches_definition():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)) * 3
    p = logits.softmax(-1)
    torch.testing.assert_close(run_compute_entropy(logits), -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5)


class _PlainLM(torch.nn.Module):
    """A plain module returning logits (like cs336_basics' TransformerLM)."""

    def __init__(self, vocab: int = 13, d: int = 8):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.emb(ids).cumsum(dim=1)  # causal: position t sees tokens <= t
        return self.head(h)


class _HFStyleOutput:
    def __init__(self, logits):
        self.logits = logits


class _HFStyleLM(_PlainLM):
    def forward(self, ids):
        return _HFStyleOutput(super().forward(ids))


@pytest.mark.parametrize("cls", [_PlainLM, _HFStyleLM])
def test_get_response_log_probs_vs_log_softmax_gather(cls):
    torch.manual_seed(0)
    model = cls()
    ids = torch.randint(0, 13, (2, 6))
    labels = torch.randint(0, 13, (2, 6))
    out = run_get_response_log_probs(model, ids, labels, return_token_entropy=True)
    logits = _PlainLM.forward(model, ids)
    expected = F.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out["log_probs"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["token_entropy"], losses.compute_entropy(logits))
    assert out["log_probs"].requires_grad and "token_entropy" not in run_get_response_log_probs(model, ids, labels)


# ----------------------------------------------------------------------------- masked ops


def test_masked_mean_and_normalize_hand_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    m = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    torch.testing.assert_close(run_masked_mean(x, m, dim=1), torch.tensor([1.5, 30.0]))
    torch.testing.assert_close(run_masked_mean(x, m, dim=0), torch.tensor([1.0, 11.0, 30.0, 40.0]))
    torch.testing.assert_close(run_masked_mean(x, m), torch.tensor(93.0 / 5))
    torch.testing.assert_close(run_masked_normalize(x, m, dim=1, normalize_constant=2.0), torch.tensor([1.5, 45.0]))
    torch.testing.assert_close(run_masked_normalize(x, m), torch.tensor(93.0))
    torch.testing.assert_close(run_masked_normalize(x, m, dim=-1, normalize_constant=4.0), torch.tensor([0.75, 22.5]))


def test_masked_mean_all_masked_row_is_zero_with_finite_grad():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    m = torch.tensor([[0, 0], [1, 1]])
    got = run_masked_mean(x, m, dim=-1)
    torch.testing.assert_close(got, torch.tensor([0.0, 4.0]))
    got.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0], [0.5, 0.5]]))
    torch.testing.assert_close(run_masked_mean(x, torch.zeros_like(m)), torch.tensor(0.0))


# ----------------------------------------------------------------------------- rewards and advantages


def _fake_reward(response: str, truth: str) -> dict[str, float]:
    fmt = float(response.startswith("<"))
    ans = float(response.strip("<>") == truth)
    return {"format_reward": fmt, "answer_reward": ans, "reward": fmt * ans}


def test_group_normalized_rewards_hand_values():
    responses = ["<1>", "<2>", "<1>", "3",  # group 1: rewards 1, 0, 1, 0
                 "<5>", "<5>", "<5>", "<5>"]  # group 2: all correct
    truths = ["1"] * 4 + ["5"] * 4
    adv, raw, meta = run_compute_group_normalized_rewards(_fake_reward, responses, truths, 4, 1e-6, True)
    torch.testing.assert_close(raw, torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 1]))
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1, 0)
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-6)
    torch.testing.assert_close(adv[:4], expected)
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # identical rewards carry no signal
    adv_nostd, _, _ = run_compute_group_normalized_rewards(_fake_reward, responses, truths, 4, 1e-6, False)
    torch.testing.assert_close(adv_nostd, torch.tensor([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]))
    assert meta["reward_mean"] == pytest.approx(0.75)
    assert meta["format_reward_mean"] == pytest.approx(7 / 8)
    assert meta["answer_reward_mean"] == pytest.approx(6 / 8)
    assert meta["frac_groups_all_equal"] == pytest.approx(0.5)


def test_group_normalize_edge_cases():
    torch.testing.assert_close(losses.group_normalize(torch.tensor([3.0, 7.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError):
        losses.group_normalize(torch.ones(5), 2)


# ----------------------------------------------------------------------------- policy-gradient losses


def test_naive_policy_gradient_loss():
    a = torch.tensor([[2.0], [-1.0]])
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    torch.testing.assert_close(run_compute_naive_policy_gradient_loss(a, logp), torch.tensor([[2.0, 4.0], [-0.5, -3.0]]))
    torch.testing.assert_close(run_compute_naive_policy_gradient_loss(a.squeeze(-1), logp), torch.tensor([[2.0, 4.0], [-0.5, -3.0]]))


def test_grpo_clip_both_sides():
    c = 0.2
    ratios = torch.tensor([[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]])
    adv = torch.tensor([[1.0], [-1.0]])
    old = torch.zeros(2, 4)
    new = ratios.log()
    loss, meta = run_compute_grpo_clip_loss(adv, new, old, c)
    # A>0: min(r, clip(r)) -> 0.5, 0.9, 1.1, 1.2 (clipped at the top only)
    # A<0: min(-r, -clip(r)) -> -0.8 (clipped at the bottom), -0.9, -1.1, -1.5
    expected = -torch.tensor([[0.5, 0.9, 1.1, 1.2], [-0.8, -0.9, -1.1, -1.5]])
    torch.testing.assert_close(loss, expected)
    assert meta["clipped"].tolist() == [[False, False, False, True], [True, False, False, False]]
    # clipped tokens get no gradient, the others get -A * ratio
    new = new.clone().requires_grad_(True)
    run_compute_grpo_clip_loss(adv, new, old, c)[0].sum().backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-0.5, -0.9, -1.1, 0.0], [0.0, 0.9, 1.1, 1.5]]))


def test_dispatcher_and_no_clip():
    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    raw, adv = torch.rand(3, 1, generator=g), torch.randn(3, 1, generator=g)
    pg = run_compute_policy_gradient_loss
    torch.testing.assert_close(pg(logp, "no_baseline", raw_rewards=raw)[0], -raw * logp)
    torch.testing.assert_close(pg(logp, "reinforce_with_baseline", advantages=adv)[0], -adv * logp)
    torch.testing.assert_close(pg(logp, "grpo_no_clip", advantages=adv, old_log_probs=old)[0], -adv * (logp - old).exp())
    clip, _ = pg(logp, "grpo_clip", advantages=adv, old_log_probs=old, cliprange=0.1)
    torch.testing.assert_close(clip, losses.compute_grpo_clip_loss(adv, logp, old, 0.1)[0])
    # on-policy (old == current, detached) the no-clip gradient equals REINFORCE with baseline
    p1, p2 = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    pg(p1, "grpo_no_clip", advantages=adv, old_log_probs=logp.detach())[0].sum().backward()
    pg(p2, "reinforce_with_baseline", advantages=adv)[0].sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad)
    with pytest.raises(ValueError, match="advantages"):
        pg(logp, "grpo_clip", raw_rewards=raw)
    with pytest.raises(ValueError, match="loss_type"):
        pg(logp, "ppo", raw_rewards=raw)


# ----------------------------------------------------------------------------- microbatch steps


def _batch(seed=0, b=4, t=7):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    mask = (torch.rand(b, t, generator=g) > 0.3).long()
    mask[0] = 0  # an all-masked row
    return logp, mask, g


def test_sft_microbatch_step_grad_vs_autograd():
    logp, mask, _ = _batch()
    x = logp.clone().requires_grad_(True)
    loss, meta = run_sft_microbatch_train_step(x, mask, gradient_accumulation_steps=3, normalize_constant=2.0)
    ref = logp.clone().requires_grad_(True)
    unreduced = -(ref * mask).sum(-1) / 2.0  # (B,) per-sequence NLL, computed independently
    (unreduced.mean() / 3).backward()
    torch.testing.assert_close(loss, (unreduced.mean() / 3).detach())
    torch.testing.assert_close(x.grad, ref.grad)
    assert meta["num_response_tokens"] == mask.sum()


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("length_normalization", losses.LENGTH_NORMALIZATIONS)
def test_grpo_microbatch_step_grad_vs_autograd(loss_type, length_normalization):
    logp, mask, g = _batch(1)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g)
    raw, adv = torch.rand(4, 1, generator=g), torch.randn(4, 1, generator=g)
    kw = {"raw_rewards": raw, "advantages": adv, "old_log_probs": old, "cliprange": 0.2}
    x = logp.clone().requires_grad_(True)
    loss, meta = run_grpo_microbatch_train_step(x, mask, 2, loss_type, **kw) if length_normalization == "masked_mean" \
        else losses.grpo_microbatch_train_step(x, mask, 2, loss_type, **kw, length_normalization=length_normalization, normalize_constant=5.0)

    ref = logp.clone().requires_grad_(True)
    ratio = (ref - old).exp()
    per_token = {
        "no_baseline": -raw * ref,
        "reinforce_with_baseline": -adv * ref,
        "grpo_no_clip": -adv * ratio,
        "grpo_clip": -torch.minimum(adv * ratio, adv * ratio.clamp(0.8, 1.2)),
    }[loss_type]
    n = mask.sum(-1).clamp(min=1)
    per_seq = (per_token * mask).sum(-1) / (n if length_normalization == "masked_mean" else 5.0)
    expected = per_seq.mean() / 2
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(x.grad, ref.grad)
    assert 0.0 <= float(meta["clip_fraction"]) <= 1.0
    if loss_type != "grpo_clip":
        assert float(meta["clip_fraction"]) == 0.0


def test_grpo_masked_normalize_defaults_to_sequence_length():
    logp, mask, _ = _batch(2)
    adv = torch.ones(4, 1)
    a = losses.grpo_microbatch_train_step(logp.clone().requires_grad_(True), mask, 1, "reinforce_with_baseline",
                                          advantages=adv, length_normalization="masked_normalize")[0]
    torch.testing.assert_close(a, (-(logp * mask).sum(-1) / logp.shape[1]).mean())


@pytest.mark.parametrize("step", ["sft", "grpo"])
def test_accumulation_equals_one_big_batch(step):
    """k micro-batches with gradient_accumulation_steps=k give the gradient of one batch of all rows."""
    torch.manual_seed(0)
    model = _PlainLM()
    ids, labels = torch.randint(0, 13, (8, 6)), torch.randint(0, 13, (8, 6))
    mask = (torch.rand(8, 6) > 0.3).long()
    adv = torch.randn(8, 1)

    def run(chunks):
        model.zero_grad(set_to_none=True)
        for idx in torch.arange(8).chunk(chunks):
            logp = losses.get_response_log_probs(model, ids[idx], labels[idx])["log_probs"]
            if step == "sft":
                losses.sft_microbatch_train_step(logp, mask[idx], chunks, normalize_constant=3.0)
            else:
                losses.grpo_microbatch_train_step(logp, mask[idx], chunks, "grpo_clip", advantages=adv[idx],
                                                  old_log_probs=logp.detach() - 0.1, cliprange=0.2)
        return [p.grad.clone() for p in model.parameters()]

    for big, small in zip(run(1), run(4)):
        torch.testing.assert_close(big, small, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- DPO


def test_dpo_loss_formula():
    beta = 0.5
    pc, pr, rc, rr = torch.tensor(-3.0), torch.tensor(-5.0), torch.tensor(-4.0), torch.tensor(-4.5)
    margin = (-3.0 - -4.0) - (-5.0 - -4.5)  # 1.5
    expected = -math.log(1 / (1 + math.exp(-beta * margin)))
    assert float(losses.dpo_loss(pc, pr, rc, rr, beta)) == pytest.approx(expected, rel=1e-6)
    # a policy equal to the reference gives log 2
    assert float(losses.dpo_loss(pc, pr, pc, pr, beta)) == pytest.approx(math.log(2), rel=1e-6)


def test_informative_groups_marks_groups_whose_rewards_differ():
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0])  # groups of 3
    assert losses.informative_groups(rewards, 3).tolist() == [False, False, True]
    meta = losses.reward_metadata([{"reward": float(r)} for r in rewards], rewards, 3)
    assert meta["frac_groups_all_equal"] == pytest.approx(2 / 3)
