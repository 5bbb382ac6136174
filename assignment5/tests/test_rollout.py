"""The rollout engine against `transformers`' generate and a teacher-forced forward pass.

A tiny random Llama (built from a config, no download) with GPT-2's real tokenizer. Its init
scale is raised so that greedy argmaxes are far from ties.
"""

import pytest
import torch
from cs336_alignment.models import Policy, gpt2_tokenizer, tiny_llama
from cs336_alignment.rollout import Completion, RolloutEngine, SamplingParams, make_engine

PROMPTS = ["Hello world, this is", "The answer is", "a b c d e f g h i j k l m n", "Q"]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), initializer_range=0.2, seed=0)


def hf_greedy(model, tok, prompts, max_new_tokens, **kw):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    return [row[enc.input_ids.shape[1]:].tolist() for row in out]


def teacher_forced_logprobs(model, tok, prompt: str, completion: list[int]) -> torch.Tensor:
    ids = tok.encode(prompt) + completion
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()
    p = len(ids) - len(completion)
    return logits[p - 1:-1].log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_greedy_matches_transformers_generate_token_for_token(model, tok):
    engine = RolloutEngine(Policy(model, tok), max_batch_size=8, check_every=3, len_bucket=8)
    ref = hf_greedy(model, tok, PROMPTS, 12, eos_token_id=None)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=12, n=2))
    for completions, expected in zip(outs, ref):
        assert len(completions) == 2
        for c in completions:
            assert isinstance(c, Completion)
            assert c.token_ids == expected and c.finish_reason == "length"
            assert c.text == tok.decode(expected)
            assert len(c.logprobs) == 12 and all(lp <= 0 for lp in c.logprobs)


def test_waves_and_tiny_top_p_are_greedy(model, tok):
    # max_batch_size 3 < 8 rows: several waves; top_p ~ 0 keeps only the argmax token.
    engine = RolloutEngine(Policy(model, tok), max_batch_size=3, check_every=4, len_bucket=16)
    ref = hf_greedy(model, tok, PROMPTS, 6, eos_token_id=None)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=6, n=2, seed=1))
    assert [[c.token_ids for c in cs] for cs in outs] == [[r, r] for r in ref]


def test_min_new_tokens_and_eos_match_transformers(tok):
    model = tiny_llama(len(tok), initializer_range=0.2, seed=0)
    free = hf_greedy(model, tok, PROMPTS[:2], 8, eos_token_id=None)
    eos = free[0][1]  # make the 2nd greedy token of prompt 0 an end-of-sequence token
    model.generation_config.eos_token_id = eos
    engine = RolloutEngine(Policy(model, tok), max_batch_size=4, check_every=2, len_bucket=8)
    outs = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=8))
    assert outs[0][0].token_ids == free[0][:2] and outs[0][0].finish_reason == "stop"
    for min_new in (0, 3):
        ref = hf_greedy(model, tok, PROMPTS[:2], 8, eos_token_id=[eos, tok.eos_token_id], min_new_tokens=min_new)
        outs = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=8, min_new_tokens=min_new))
        for (c,), r in zip(outs, ref):
            r = r[:r.index(eos) + 1] if eos in r else r
            assert c.token_ids == r
            assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
            assert eos not in c.token_ids[:min_new]


def test_stop_strings_cut_after_the_stop(model, tok):
    engine = RolloutEngine(Policy(model, tok), max_batch_size=8, check_every=4, len_bucket=8)
    full = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=16))[0][0]
    stop = tok.decode(full.token_ids[5:7])  # a string the model produces mid-way
    cut = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=16, stop=(stop, "never!")))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text.endswith(stop) and full.text.startswith(cut.text)
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) <= 7
    assert len(cut.logprobs) == len(cut.token_ids)
    # min_new_tokens: the stop string is only looked for after the first min_new_tokens tokens
    late = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=16, min_new_tokens=8,
                                                       stop=(stop,)))[0][0]
    assert len(late.token_ids) > 8 or late.finish_reason == "length"


def test_sampled_logprobs_equal_teacher_forced_forward_and_seeds_reproduce(tok):
    model = tiny_llama(len(tok), initializer_range=0.05, seed=3)  # flatter: varied samples
    model.generation_config.eos_token_id = [tok.encode(" the")[0], tok.encode(".")[0]]  # rows end at different steps
    engine = RolloutEngine(Policy(model, tok), max_batch_size=8, check_every=2, len_bucket=8)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=4, seed=123)
    outs = engine.generate(PROMPTS[:2], params)
    for prompt, completions in zip(PROMPTS[:2], outs):
        for c in completions:
            expected = teacher_forced_logprobs(model, tok, prompt, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=1e-4)
    again = engine.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in outs]
    other = engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=10, n=4, seed=7))
    assert [[c.token_ids for c in cs] for cs in other] != [[c.token_ids for c in cs] for cs in outs]
    assert len({tuple(c.token_ids) for c in outs[0]}) > 1  # the n samples differ


def test_load_weights_in_place(tok):
    a, b = tiny_llama(len(tok), initializer_range=0.2, seed=0), tiny_llama(len(tok), initializer_range=0.2, seed=1)
    engine = make_engine(Policy(a, tok), max_batch_size=4, len_bucket=8)
    ptrs = [p.data_ptr() for p in a.parameters()]
    engine.load_weights(b)
    assert [p.data_ptr() for p in a.parameters()] == ptrs
    outs = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=6))
    assert [cs[0].token_ids for cs in outs] == hf_greedy(b, tok, PROMPTS[:2], 6, eos_token_id=None)
    with pytest.raises(KeyError):
        engine.load_weights({"not.a.weight": torch.zeros(1)})


def test_basics_transformer_lm_greedy_matches_its_own_forward(tok):
    model_mod = pytest.importorskip("cs336_basics.model")
    torch.manual_seed(0)
    lm = model_mod.TransformerLM(len(tok), 64, d_model=32, num_layers=2, num_heads=4, d_ff=64).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(4.0)  # peakier logits: no near-ties
    # context 64 < the default 128-position bucket: the cache must be clamped to the context
    engine = RolloutEngine(Policy(lm, tok, "basics"), max_batch_size=4)
    outs = engine.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_new_tokens=6))
    for prompt, (c,) in zip(PROMPTS[:3], outs):
        ids = tok.encode(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(lm(torch.tensor([ids]))[0, -1].argmax()))
        assert c.token_ids == ids[-6:]


def test_sampling_params_validation():
    assert SamplingParams(stop=["</answer>"]).stop == ("</answer>",)
    assert SamplingParams(stop="</answer>").stop == ("</answer>",)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_new_tokens": 0}, {"min_new_tokens": 5, "max_new_tokens": 4},
                {"n": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager(tok):
    model = tiny_llama(len(tok), initializer_range=0.2, seed=0).cuda()
    graphs = RolloutEngine(Policy(model, tok), max_batch_size=8, check_every=3, len_bucket=8, cuda_graphs=True)
    eager = RolloutEngine(Policy(model, tok), max_batch_size=8, check_every=3, len_bucket=8, cuda_graphs=False)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, n=2)
    a, b = graphs.generate(PROMPTS, greedy), eager.generate(PROMPTS, greedy)
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, n=3, seed=5)
    a, b = graphs.generate(PROMPTS, sampled), eager.generate(PROMPTS, sampled)
    assert [[c.token_ids for c in cs] for cs in a] == [[c.token_ids for c in cs] for cs in b]
    for prompt, completions in zip(PROMPTS, a):
        for c in completions:
            expected = teacher_forced_logprobs(model, tok, prompt, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-3, rtol=1e-3)
