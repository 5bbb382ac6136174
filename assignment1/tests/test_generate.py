"""Generation: KV cache vs full recompute, sampling rules, end-of-text, bad inputs, the CLI."""


import pytest
import torch
from cs336_basics.checkpoint import save_checkpoint
from cs336_basics.config import TrainConfig
from cs336_basics.generate import cli_main, generate, load_model_from_checkpoint, sample_next
from cs336_basics.model import TransformerLM

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
        lm.lm_head.weight.zero_()
        lm.lm_head.weight[7] = 0  # all logits equal: greedy picks id 0
    assert generate(lm, [1], 5, temperature=0, eos_id=0) == [0]
    assert len(generate(lm, [1] * 40, 100, temperature=0)) == 8  # context 48


def test_bad_prompts_are_clear_errors():
    lm = _lm()
    with pytest.raises(ValueError, match="longer than the model's context_length=48"):
        generate(lm, [1] * 49, 5)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(lm, [1, 64], 5)
    with pytest.raises(ValueError, match="empty"):
        generate(lm, [], 5)


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
    rc = cli_main(["--checkpoint", str(tmp_path / "ck.pt"), "--tokenizer-dir", str(tmp_path / "tok"), "--prompt",
                   "Once", "--max-new-tokens", "5", "--seed", "0", "--device", "cpu"])
    assert rc == 0 and capsys.readouterr().out.startswith("Once")
    cfg2 = cfg.replace(vocab_size=300)
    save_checkpoint(TransformerLM(300, 32, 32, 1, 2, 64), None, 5, tmp_path / "ck2.pt", config=cfg2.to_dict())
    rc = cli_main(["--checkpoint", str(tmp_path / "ck2.pt"), "--tokenizer-dir", str(tmp_path / "tok"), "--device", "cpu"])
    assert rc == 2 and "257 tokens but the model's vocab_size is 300" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 10)
    rc = cli_main(["--checkpoint", str(tmp_path / "bad.pt"), "--tokenizer-dir", str(tmp_path / "tok"), "--device", "cpu"])
    assert rc == 2 and "corrupted" in capsys.readouterr().err
