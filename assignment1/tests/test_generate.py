"""Generation: KV cache vs full recompute, sampling rules, end-of-text, windows past the context,
several samples in one batch, bad inputs, the streaming CLI."""

import io

import pytest
import torch
from cs336_basics.checkpoint import save_checkpoint
from cs336_basics.config import TrainConfig
from cs336_basics.generate import (
    cli_main,
    generate,
    generate_samples,
    load_model_from_checkpoint,
    print_stream,
    sample_next,
    stream_tokens,
)
from cs336_basics.model import TransformerLM
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _lm(**kw):
    torch.manual_seed(0)
    return TransformerLM(64, 48, 32, 2, 4, 64, **kw).eval()


@pytest.mark.parametrize("kw", [{}, {"attn_backend": "sdpa"}, {"use_rope": False, "norm": "post"}])
def test_kv_cache_greedy_equals_no_cache_greedy(kw):
    lm = _lm(**kw)
    with torch.no_grad():  # a sharper model, so greedy is not decided by float noise
        lm.lm_head.weight.mul_(4)
    prompt = [3, 17, 42, 5]
    cached = generate(lm, prompt, 30, temperature=0, use_kv_cache=True)
    plain = generate(lm, prompt, 30, temperature=0, use_kv_cache=False)
    assert cached == plain and len(cached) == 30
    # and both equal an explicit argmax loop over the full sequence
    ids = list(prompt)
    for _ in range(30):
        ids.append(int(lm(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[len(prompt):] == cached


def test_sampled_tokens_with_cache_match_without_same_seed():
    lm = _lm()
    a = generate(lm, [1, 2], 20, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = generate(lm, [1, 2], 20, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5),
                 use_kv_cache=False)
    assert a == b


def test_top_p_and_temperature_rules():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next(logits, 1.0, 0.7, g)) for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 ≥ 0.7 stops there
    assert abs(draws.count(0) / 400 - 0.5 / 0.8) < 0.08
    assert {int(sample_next(logits, 1.0, 0.01, g)) for _ in range(50)} == {0}  # the top token always stays
    assert int(sample_next(logits, 0.0)) == 0
    draws = [int(sample_next(logits, 1.0, 1.0, g)) for _ in range(2000)]
    assert abs(draws.count(3) / 2000 - 0.05) < 0.02


def test_stops_at_eos_and_at_context_end():
    lm = _lm()
    with torch.no_grad():
        lm.lm_head.weight.zero_()  # all logits equal: greedy picks id 0
    assert generate(lm, [1], 5, temperature=0, eos_id=0) == [0]
    # context 48: a prompt of 40 leaves room for 8 more inputs, so 9 tokens can be drawn; a full one, 1
    assert len(generate(lm, [1] * 40, 100, temperature=0, slide=False)) == 9
    assert len(generate(lm, [1] * 48, 100, temperature=0, slide=False)) == 1
    assert len(generate(lm, [1] * 48, 100, temperature=0)) == 100  # sliding on past the context
    assert generate(lm, [1], 0) == []


def _sharp_lm(**kw):
    lm = _lm(**kw)
    with torch.no_grad():  # a sharper model, so greedy is not decided by float noise
        lm.lm_head.weight.mul_(4)
    return lm


@pytest.mark.parametrize("kw", [{}, {"use_rope": False}])
def test_past_the_context_equals_a_naive_loop_over_the_same_windows(kw):
    lm = _sharp_lm(**kw)
    prompt, n, ctx, keep = [3, 17, 42, 5, 9, 11, 2, 8, 1, 60], 130, 48, 24
    cached = generate(lm, prompt, n, temperature=0)
    plain = generate(lm, prompt, n, temperature=0, use_kv_cache=False)
    # by hand: condition on the tokens since the last restart; when no room is left for the last token,
    # restart from the last `keep` tokens
    ids, window = list(prompt), list(prompt)
    for _ in range(n):
        if len(window) > ctx:
            window = window[-keep:]
        nxt = int(lm(torch.tensor([window]))[0, -1].argmax())
        ids.append(nxt)
        window.append(nxt)
    assert cached == plain == ids[len(prompt):]
    assert len(cached) == n > 2 * ctx


def test_kv_cache_work_is_linear_in_the_tokens():
    lm = _lm()
    positions = []
    lm.token_embeddings.register_forward_pre_hook(lambda m, args: positions.append(args[0].shape[-1]))
    generate(lm, [1, 2, 3, 4], 40)  # within the context: the prompt once, then one position per token
    assert sum(positions) == 4 + 40 - 1 and len(positions) == 40
    positions.clear()
    generate(lm, [1, 2, 3, 4], 400)  # sliding: each restart refills 24 positions, every 24 tokens
    assert len(positions) == 400 and sum(positions) < 2 * 400
    positions.clear()
    generate(lm, [1, 2, 3, 4], 40, use_kv_cache=False)  # the reference reruns everything: quadratic
    assert sum(positions) == sum(range(4, 44))


def test_several_samples_in_one_batch():
    lm = _sharp_lm()
    greedy = generate(lm, [5, 6], 30, temperature=0)
    assert generate_samples(lm, [5, 6], 30, 3, temperature=0) == [greedy] * 3
    kw = {"temperature": 1.0, "top_p": 0.9}
    a = generate_samples(lm, [5, 6], 30, 4, generator=torch.Generator().manual_seed(1), **kw)
    b = generate_samples(lm, [5, 6], 30, 4, generator=torch.Generator().manual_seed(1), use_kv_cache=False, **kw)
    assert a == b and len({tuple(x) for x in a}) == 4  # the same draws with or without the cache; all differ
    with torch.no_grad():
        lm.lm_head.weight.zero_()  # uniform over 64 tokens: eos (0) comes at a different step for each sample
    samples = generate_samples(lm, [5, 6], 400, 4, eos_id=0, generator=torch.Generator().manual_seed(0))
    for s in samples:  # each stops at its own first eos, or runs to the end without one
        assert (s[-1] == 0 and 0 not in s[:-1]) or (len(s) == 400 and 0 not in s)
    assert len({len(s) for s in samples}) > 1
    # the stream itself ends once every sample has drawn eos
    steps = list(stream_tokens(lm, [5, 6], 400, eos_id=0, generator=torch.Generator().manual_seed(0),
                               num_samples=4))
    assert len(steps) == max(len(s) for s in samples) < 400


def test_bad_prompts_are_clear_errors():
    lm = _lm()
    with pytest.raises(ValueError, match="longer than the model's context_length=48"):
        generate(lm, [1] * 49, 5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(lm, [1, 64], 5)
    with pytest.raises(ValueError, match="empty"):
        generate(lm, [], 5)
    bad = [({"max_new_tokens": -1}, "max_new_tokens must be >= 0"), ({"temperature": -0.5}, "temperature"),
           ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p must be in"),
           ({"top_p": 1.5}, "top_p must be in"), ({"num_samples": 0}, "num_samples")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):  # at the call, before any token is asked for
            stream_tokens(lm, [1, 2], **{"max_new_tokens": 5, **kw})


VOCAB = {i: bytes([i]) for i in range(256)} | {256: "é".encode(), 257: "€".encode()[:2], 258: "€".encode()[2:],
                                               259: "日本".encode()[1:5], 260: b"<|endoftext|>"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 259), max_size=40))
def test_streamed_text_equals_decoding_the_whole_output(ids):
    out = io.StringIO()
    n = print_stream((torch.tensor([i]) for i in ids + [260, 7]), VOCAB, eos_id=260, out=out)
    assert n == len(ids) + 1  # stops at eos, counts it, prints nothing after it
    assert out.getvalue() == b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace") + "\n"


def test_cli_from_checkpoint_and_vocab_mismatch(tmp_path, capsys):
    from cs336_basics.tokenizer import Tokenizer

    special = "<|endoftext|>"
    vocab = {i: bytes([i]) for i in range(256)} | {256: special.encode()}
    Tokenizer(vocab, [], [special]).save(tmp_path / "tok")
    cfg = TrainConfig(vocab_size=257, context_length=32, d_model=32, num_layers=1, num_heads=2, d_ff=64)
    torch.manual_seed(0)
    lm = TransformerLM(257, 32, 32, 1, 2, 64)
    save_checkpoint(lm, None, 5, tmp_path / "ck.pt", config=cfg.to_dict())
    loaded = load_model_from_checkpoint(tmp_path / "ck.pt")
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), loaded.state_dict().values()))
    args = ["--checkpoint", str(tmp_path / "ck.pt"), "--tokenizer-dir", str(tmp_path / "tok"), "--prompt", "Once",
            "--max-new-tokens", "60", "--seed", "0", "--device", "cpu", "--temperature", "1.5", "--top-p", "1"]
    rc = cli_main(args)
    out = capsys.readouterr()
    tok = Tokenizer.from_dir(tmp_path / "tok")
    new = generate(loaded, tok.encode("Once"), 60, 1.5, 1.0, 256, torch.Generator().manual_seed(0))
    # streamed (60 tokens past the 32-token context): the text of the same draws, decoded at once
    assert rc == 0 and out.out == "Once" + tok.decode([i for i in new if i != 256]) + "\n"
    assert "tokens/s" in out.err
    rc = cli_main(args + ["--num-samples", "3", "--stop-at-context"])
    out = capsys.readouterr().out
    assert rc == 0 and [line for line in out.splitlines() if line.startswith("=== sample")] == \
        ["=== sample 1/3 ===", "=== sample 2/3 ===", "=== sample 3/3 ==="]
    for bad, msg in ((["--temperature", "-1"], "temperature"), (["--num-samples", "0"], "num_samples")):
        assert cli_main(args + bad) == 2 and msg in capsys.readouterr().err
    cfg2 = cfg.replace(vocab_size=300)
    save_checkpoint(TransformerLM(300, 32, 32, 1, 2, 64), None, 5, tmp_path / "ck2.pt", config=cfg2.to_dict())
    rc = cli_main(["--checkpoint", str(tmp_path / "ck2.pt"), "--tokenizer-dir", str(tmp_path / "tok"), "--device", "cpu"])
    assert rc == 2 and "257 tokens but the model's vocab_size is 300" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    rc = cli_main(["--checkpoint", str(tmp_path / "bad.pt"), "--tokenizer-dir", str(tmp_path / "tok"), "--device", "cpu"])
    assert rc == 2 and "corrupted" in capsys.readouterr().err
