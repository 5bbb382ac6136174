"""The training half of a GRPO step: length-sorted micro-batches and where the old log-probs come from.

Sorting an optimizer step's rows by length changes only how they are grouped into micro-batches,
so the accumulated gradient must equal the unsorted one and a one-pass full-batch reference
(written out here, not through ``losses``) up to fp32 rounding, with fewer padded positions.
The old log-probs taken from the rollout engine (or from the first optimizer step's own pass)
must equal a no-grad recompute at the response positions.
"""

from __future__ import annotations

import pytest
import torch
from cs336_alignment import toy_task
from cs336_alignment.grpo import (
    PRESETS,
    GRPOConfig,
    backward_micro_batches,
    recompute_old_log_probs,
    train_grpo,
)
from cs336_alignment.losses import get_response_log_probs
from cs336_alignment.models import Policy, gpt2_tokenizer, tiny_llama
from cs336_alignment.rollout import RolloutEngine, SamplingParams
from cs336_alignment.sft_data import pack_prompt_and_output_ids
from cs336_alignment.train_utils import (
    microbatches,
    parse_config,
    place_response_values,
    prompt_token_ids,
    read_log,
    response_ends,
    sort_by_length,
)

CPU = torch.device("cpu")


def _ragged_batch(n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random byte prompts of 3-11 tokens and responses of 1-47 (GSM8K's responses range from ~50 to 512)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(1, 48, (1,), generator=g))) for _ in range(n)]
    prompts = [torch.randint(0, 256, (p,), generator=g).tolist() for p, _ in lengths]
    outputs = [torch.randint(0, 256, (o,), generator=g).tolist() for _, o in lengths]
    return pack_prompt_and_output_ids(prompts, outputs, pad_id=256)


def _cfg(**kw) -> GRPOConfig:
    base = {"model": "unused", "rollout_batch_size": 16, "group_size": 4, "train_batch_size": 16,
            "gradient_accumulation_steps": 4, "epochs_per_rollout_batch": 2, "loss_type": "grpo_clip",
            "sampling_max_tokens": 48, "cliprange": 0.2, "device": "cpu"}
    return GRPOConfig(**{**base, **kw})


def _totals() -> dict:
    return {k: torch.zeros(()) for k in ("loss", "entropy", "clipped", "tokens", "old_diff", "old_tokens")} | {"padded_tokens": 0}


def _step_grads(model, cfg, batch, rows, rewards, advantages, old, first_step=False):
    model.zero_grad(set_to_none=True)
    totals = _totals()
    backward_micro_batches(model, cfg, batch, rows, rewards, advantages, old, CPU, "fp32", totals, first_step=first_step)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, totals


def _reference_grads(model, batch, advantages, old, cliprange, length_normalization, constant):
    """GRPO-Clip on the whole batch in one pass: -min(r A, clip(r) A), per-row reduction, batch mean."""
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"]).logits.float()
    logp = logits.log_softmax(-1).gather(-1, batch["labels"][..., None])[..., 0]
    ratio = torch.exp(logp - old)
    a = advantages[:, None]
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - cliprange, 1 + cliprange) * a)
    mask = batch["response_mask"].float()
    per_row = (per_token * mask).sum(-1)
    per_row = per_row / mask.sum(-1) if length_normalization == "masked_mean" else per_row / constant
    per_row.mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("length_normalization", ["masked_mean", "masked_normalize"])
def test_length_sorted_microbatches_same_gradient_less_padding(length_normalization):
    cfg = _cfg(length_normalization=length_normalization)
    model = toy_task.toy_policy(seed=1).model
    batch = _ragged_batch()
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(16, generator=g)
    with torch.no_grad():  # old log-probs off by ~0.3 nats: ratios outside [0.8, 1.2] on both sides, so clipping acts
        old = get_response_log_probs(model, batch["input_ids"], batch["labels"])["log_probs"]
        old = old + 0.3 * torch.randn(old.shape, generator=g)
    rows = torch.randperm(16, generator=g)
    sorted_rows = sort_by_length(batch, rows)
    assert sorted(sorted_rows.tolist()) == sorted(rows.tolist())
    ends = response_ends(batch["response_mask"][sorted_rows])
    assert (ends[:-1] >= ends[1:]).all()

    plain, t_plain = _step_grads(model, cfg, batch, rows, advantages, advantages, old)
    by_length, t_sorted = _step_grads(model, cfg, batch, sorted_rows, advantages, advantages, old)
    reference = _reference_grads(model, batch, advantages, old, cfg.cliprange, length_normalization,
                                 float(cfg.sampling_max_tokens))
    for name in plain:
        torch.testing.assert_close(by_length[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(by_length[name], reference[name], atol=1e-5, rtol=1e-5, msg=name)
    # the logged sums do not depend on the grouping either (token sums, not means of micro-batch means)
    for key in ("loss", "entropy", "clipped", "tokens"):
        torch.testing.assert_close(t_sorted[key], t_plain[key], atol=1e-5, rtol=1e-5)
    assert 0 < t_sorted["clipped"] < t_sorted["tokens"]
    assert t_sorted["tokens"] == batch["response_mask"].sum()

    # padded positions: each micro-batch is rows x (its longest row's end)
    def padded(order):
        return sum(len(c) * int(response_ends(batch["response_mask"][c]).max()) for c in order.split(4))

    assert t_plain["padded_tokens"] == padded(rows) and t_sorted["padded_tokens"] == padded(sorted_rows)
    assert t_sorted["padded_tokens"] < 0.8 * t_plain["padded_tokens"], (t_sorted["padded_tokens"], t_plain["padded_tokens"])


def test_microbatches_cut_after_the_last_response_token():
    batch = _ragged_batch(8, seed=2)
    rows = sort_by_length(batch, torch.arange(8))
    seen = []
    for chunk, mb in microbatches(batch, rows, 3, CPU):
        width = mb["input_ids"].shape[1]
        assert mb["response_mask"][:, -1].any() and width == int(response_ends(batch["response_mask"][chunk]).max())
        assert batch["response_mask"][chunk, width:].sum() == 0  # nothing cut off
        seen += chunk.tolist()
    assert seen == rows.tolist()


def test_first_step_old_log_probs_equal_a_recompute():
    """With old_log_probs="recompute" the first optimizer step (rollout weights) takes its rows' old
    log-probs from its own pass: they equal a separate no-grad pass, and so does the gradient."""
    cfg = _cfg()
    model = toy_task.toy_policy(seed=2).model
    batch = _ragged_batch(seed=3)
    advantages = torch.randn(16, generator=torch.Generator().manual_seed(3))
    rows = sort_by_length(batch, torch.randperm(16))
    recomputed = torch.zeros(batch["labels"].shape)
    recompute_old_log_probs(model, cfg, batch, torch.arange(16), CPU, "fp32", recomputed)
    filled = torch.zeros(batch["labels"].shape)
    g_fill, t_fill = _step_grads(model, cfg, batch, rows, advantages, advantages, filled, first_step=True)
    g_given, _ = _step_grads(model, cfg, batch, rows, advantages, advantages, recomputed)
    mask = batch["response_mask"]
    torch.testing.assert_close(filled[mask], recomputed[mask], atol=1e-5, rtol=1e-5)
    for name in g_fill:
        torch.testing.assert_close(g_fill[name], g_given[name], atol=1e-5, rtol=1e-5, msg=name)
    assert t_fill["old_diff"] == 0 and t_fill["old_tokens"] == mask.sum()


def test_engine_log_probs_placed_on_the_packed_batch_equal_a_recompute():
    """The rollout engine's sampled log-probs, put at the response positions of the packed batch, equal
    the no-grad recompute pass of the training loop (fp32, CPU; the engine test's model and settings)."""
    tok = gpt2_tokenizer()
    model = tiny_llama(len(tok), initializer_range=0.05, seed=3)
    model.generation_config.eos_token_id = list(range(0, len(tok), 16))  # ~6% of the vocabulary: ragged lengths
    engine = RolloutEngine(Policy(model, tok), max_batch_size=8, check_every=2, len_bucket=8)
    prompts = prompt_token_ids(tok, ["Hello world, this is", "The answer is", "a b c d e f g h i j k l m n", "Q"])
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10, n=4, seed=123))
    completions = [c for group in outs for c in group]
    assert len({len(c.token_ids) for c in completions}) > 1  # ragged: the placement is exercised
    batch = pack_prompt_and_output_ids([p for p in prompts for _ in range(4)], [c.token_ids for c in completions],
                                       tok.eos_token_id)
    placed = place_response_values(batch["response_mask"], [c.logprobs for c in completions])
    recomputed = torch.zeros(batch["labels"].shape)
    recompute_old_log_probs(model, _cfg(), batch, torch.arange(16), CPU, "fp32", recomputed)
    mask = batch["response_mask"]
    torch.testing.assert_close(placed[mask], recomputed[mask], atol=1e-4, rtol=1e-4)
    assert (placed[~mask] == 0).all()
    with pytest.raises(ValueError, match="do not match"):
        place_response_values(batch["response_mask"], [c.logprobs[:-1] for c in completions])


def _toy_run(tmp_path, name, **kw):
    """One GRPO step on the toy task with ragged responses (a response stops at its first digit)."""
    base = {"model": "unused", "out_dir": str(tmp_path / name), "n_grpo_steps": 1, "rollout_batch_size": 64,
            "group_size": 8, "train_batch_size": 32, "gradient_accumulation_steps": 4, "sampling_max_tokens": 8,
            "sampling_min_tokens": 1, "stop": tuple("0123456789"), "learning_rate": 1e-2, "eval_every": 0,
            "eval_max_tokens": 1, "loss_type": "grpo_clip", "device": "cpu", "seed": 0}
    train_grpo(GRPOConfig(**{**base, **kw}), policy=toy_task.toy_policy(seed=0), reward_fn=toy_task.digit_reward,
               train_examples=toy_task.digit_examples(32), eval_examples=[], quiet=True)
    return read_log(tmp_path / name / "log.jsonl", "train")[0]


def test_grpo_step_sorted_vs_unsorted_and_engine_vs_recompute(tmp_path):
    # one optimizer step per GRPO step: the whole logged step is computed at the initial weights
    one = {"train_batch_size": 64}
    plain = _toy_run(tmp_path, "plain", length_sorted_microbatches=False, **one)
    by_length = _toy_run(tmp_path, "sorted", **one)
    for key in ("loss", "entropy", "clip_fraction", "grad_norm", "reward"):
        assert by_length[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
    assert by_length["padded_tokens"] < plain["padded_tokens"]

    # off-policy (2 optimizer steps): recompute runs a no-grad pass over the second step's rows only;
    # the engine's log-probs need none and agree with this pass at the rollout weights
    recompute = _toy_run(tmp_path, "recompute")
    engine = _toy_run(tmp_path, "engine", old_log_probs="engine")
    assert recompute["old_logp_abs_diff"] == 0 and 0 < engine["old_logp_abs_diff"] < 1e-4
    assert 0 < recompute["recompute_tokens"] < recompute["padded_tokens"] and engine["recompute_tokens"] == 0
    assert engine["reward"] == recompute["reward"]
    assert engine["loss"] == pytest.approx(recompute["loss"], abs=1e-3)


def test_old_log_probs_config():
    assert GRPOConfig(model="m", old_log_probs="engine").old_log_probs == "engine"
    for bad in ({"sampling_temperature": 0.7}, {"sampling_top_p": 0.9}):
        with pytest.raises(ValueError, match="old_log_probs='engine' needs sampling_temperature 1"):
            GRPOConfig(model="m", old_log_probs="engine", **bad)
    GRPOConfig(model="m", sampling_temperature=0.7)  # recompute: any temperature
    with pytest.raises(ValueError, match="recompute or engine"):
        GRPOConfig(model="m", old_log_probs="vllm")
    preset = parse_config(GRPOConfig, ["--preset", "smollm2-gsm8k", "--model", "m"], "test", PRESETS)
    assert preset.old_log_probs == "engine" and preset.sampling_temperature == 1 and preset.sampling_top_p == 1
