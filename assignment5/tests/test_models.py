"""The policy loader: HF directories, cs336_basics checkpoints, the SmolLM2 GGUF (~1 min of CPU to dequantize)."""

import pytest
import torch
from cs336_alignment.models import BasicsTokenizer, Policy, gpt2_tokenizer, load_policy, tiny_llama


def test_hf_policy_logits_and_save_load_round_trip(tmp_path):
    tok = gpt2_tokenizer()
    assert len(tok) == 50257 and tok.pad_token_id == tok.eos_token_id == 50256
    model = tiny_llama(len(tok), seed=2)
    policy = Policy(model, tok)
    ids = torch.tensor([tok.encode("Hello there, my friend")[:5], tok.encode("a b c d")[:4] + [tok.pad_token_id]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        logits = policy.logits(ids, mask)
        torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask).logits)
        policy.save(tmp_path / "p")
        loaded = load_policy(tmp_path / "p", device="cpu")
        torch.testing.assert_close(loaded.logits(ids, mask), logits)
    assert loaded.tokenizer.encode("Hello there") == tok.encode("Hello there")
    assert loaded.kind == "hf" and loaded.dtype == torch.float32


def test_basics_checkpoint_with_our_tokenizer(tmp_path, shared_data):
    model_mod = pytest.importorskip("cs336_basics.model")
    from cs336_basics.tokenizer import Tokenizer

    gpt2 = shared_data / "tokenizers" / "gpt2"
    ours = Tokenizer.from_files(gpt2 / "vocab.json", gpt2 / "merges.txt", special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    lm = model_mod.TransformerLM(ours.vocab_size, 32, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                                 rope_theta=5000.0).eval()
    policy = Policy(lm, BasicsTokenizer(ours), "basics")
    policy.save(tmp_path / "ckpt")
    loaded = load_policy(tmp_path / "ckpt" / "model.pt", device="cpu", tokenizer=tmp_path / "ckpt")
    ids = torch.tensor([ours.encode("Once upon a time")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(ids), lm(ids))
    hf = gpt2_tokenizer()
    text = "Hello world! It's 3.14 <|endoftext|>"
    assert loaded.tokenizer.encode("Hello world! It's 3.14") == hf.encode("Hello world! It's 3.14")
    assert loaded.tokenizer.eos_token_id == hf.eos_token_id
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    assert loaded.tokenizer(["a b", "c"])["input_ids"] == [hf.encode("a b"), hf.encode("c")]


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_policy(tmp_path / "nope.gguf")


@pytest.mark.slow
def test_gguf_smollm2_loads_dense_with_chat_template():
    pytest.importorskip("gguf")
    from cs336_basics.paths import shared_models_dir

    policy = load_policy(shared_models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
    assert type(policy.model).__name__ == "LlamaForCausalLM" and policy.tokenizer.chat_template
    assert all(type(m).__name__ != "GgufLinear" for m in policy.model.modules())
    ids = torch.tensor([policy.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert policy.logits(ids).shape == (1, ids.shape[1], 49152)
