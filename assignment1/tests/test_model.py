"""Every model module against an independent computation (torch functional ops, explicit formulas),
and the whole LM against transformers' LlamaForCausalLM with the same weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from cs336_basics import model as M
from cs336_basics.hf_llama import to_hf_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_linear_matches_functional_and_init():
    lin = M.Linear(64, 32)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight), rtol=1e-5, atol=1e-5)
    std = math.sqrt(2 / (64 + 32))
    assert lin.weight.abs().max() <= 3 * std + 1e-6
    big = M.Linear(512, 512)
    big_std = math.sqrt(2 / 1024)  # truncating at ±3σ shrinks the std by a factor 0.9866
    assert abs(big.weight.std().item() - 0.9866 * big_std) < 0.01 * big_std


def test_lm_with_targets_returns_the_loss_of_its_logits():
    from cs336_basics.nn_utils import cross_entropy_torch

    torch.manual_seed(0)
    lm = M.TransformerLM(64, 16, 32, 2, 4, 48)
    ids, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(lm(ids, targets=y), cross_entropy_torch(lm(ids), y), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lm(ids, targets=y), F.cross_entropy(lm(ids).flatten(0, 1), y.flatten()))


def test_embedding_matches_functional():
    emb = M.Embedding(100, 16)
    ids = torch.randint(0, 100, (3, 7))
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))
    assert emb.weight.abs().max() <= 3.0


def test_rmsnorm_matches_formula_and_functional():
    norm = M.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = torch.randn(4, 6, 32)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (32,), norm.weight, eps=1e-5), rtol=1e-5, atol=1e-6)
    xb = x.bfloat16()  # computed in fp32, returned in the input dtype
    out = norm(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_silu_and_softmax():
    x = torch.randn(10, 20) * 5
    torch.testing.assert_close(M.silu(x), F.silu(x))
    torch.testing.assert_close(M.softmax(x, -1), F.softmax(x, -1))
    torch.testing.assert_close(M.softmax(x, 0), F.softmax(x, 0))
    big = torch.tensor([[1000.0, 1001.0, 999.0]])  # stable for huge logits
    torch.testing.assert_close(M.softmax(big, -1), F.softmax(big, -1))


@pytest.mark.parametrize("fuse", [True, False])
def test_swiglu_and_silu_ffn(fuse):
    ffn = M.SwiGLU(16, 40)
    ffn.fuse_projections = fuse
    x = torch.randn(3, 16)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    torch.testing.assert_close(ffn(x), F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))
    plain = M.SiLUFFN(16, 64)
    torch.testing.assert_close(plain(x), F.linear(F.silu(F.linear(x, plain.w1.weight)), plain.w2.weight))


def test_rope_matches_complex_rotation():
    d, theta = 8, 10000.0
    rope = M.RotaryPositionalEmbedding(theta, d, max_seq_len=32)
    x = torch.randn(2, 5, d)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 9, 0, 31]])
    # independent: adjacent pairs as complex numbers times e^{i pos θ^(-2k/d)}
    freqs = theta ** (-torch.arange(0, d, 2).double() / d)
    rot = torch.polar(torch.ones_like(pos[..., None].double() * freqs), pos[..., None].double() * freqs)
    xc = torch.view_as_complex(x.double().reshape(2, 5, d // 2, 2).contiguous())
    expected = torch.view_as_real(xc * rot).reshape(2, 5, d).float()
    torch.testing.assert_close(rope(x, pos), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        M.RotaryPositionalEmbedding(theta, 7, 8)


def test_sdpa_matches_functional_with_mask():
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 4)
    mask = torch.rand(6, 9) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    torch.testing.assert_close(
        M.scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    )
    torch.testing.assert_close(M.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def _reference_mha(x, attn, positions=None, theta=None):
    """Multi-head attention from torch functional ops, heads split by rows h*D:(h+1)*D."""
    b, t, c = x.shape
    h = attn.num_heads
    d = c // h

    def heads(w):
        return F.linear(x, w).view(b, t, h, d).transpose(1, 2)

    q, k, v = heads(attn.q_proj.weight), heads(attn.k_proj.weight), heads(attn.v_proj.weight)
    if theta is not None:
        pos = torch.arange(t) if positions is None else positions
        freqs = theta ** (-torch.arange(0, d, 2).double() / d)
        ang = pos[..., None].double() * freqs
        cos, sin = ang.cos().float(), ang.sin().float()

        def rot(z):
            z1, z2 = z[..., 0::2], z[..., 1::2]
            return torch.stack((z1 * cos - z2 * sin, z1 * sin + z2 * cos), -1).flatten(-2)

        q, k = rot(q), rot(k)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(o.transpose(1, 2).reshape(b, t, c), attn.output_proj.weight)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_mha_causal_with_and_without_rope(backend, fuse, monkeypatch):
    monkeypatch.setattr(M.MultiHeadSelfAttention, "fuse_projections", fuse)
    x = torch.randn(2, 10, 32)
    attn = M.MultiHeadSelfAttention(32, 4, attn_backend=backend)
    torch.testing.assert_close(attn(x), _reference_mha(x, attn), rtol=1e-4, atol=1e-5)
    rope = M.RotaryPositionalEmbedding(500.0, 8, 16)
    attn_r = M.MultiHeadSelfAttention(32, 4, rope=rope, attn_backend=backend)
    torch.testing.assert_close(attn_r(x), _reference_mha(x, attn_r, theta=500.0), rtol=1e-4, atol=1e-5)
    pos = torch.arange(3, 13)
    torch.testing.assert_close(attn_r(x, pos), _reference_mha(x, attn_r, pos, theta=500.0), rtol=1e-4, atol=1e-5)


def test_fused_projections_match_separate_ones_with_gradients():
    """One [q; k; v] and one [W1; W3] matmul give the outputs and every parameter gradient of
    three and two separate ones (the state dict is the same)."""
    lm = M.TransformerLM(50, 16, 32, 2, 4, 40)
    ids = torch.randint(0, 50, (2, 11))

    def run(fuse: bool):
        for m in lm.modules():
            if hasattr(m, "fuse_projections"):
                m.fuse_projections = fuse
        lm.zero_grad(set_to_none=True)
        logits = lm(ids)
        (logits**2).mean().backward()
        return logits, {n: p.grad.clone() for n, p in lm.named_parameters()}

    logits, grads = run(True)
    ref_logits, ref_grads = run(False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_hooked_projections_are_called_not_fused():
    # a wrapper that acts in a Linear's forward hooks (FSDP gathers the weight there) sees the call;
    # the output is the fused one
    lm = M.TransformerLM(50, 16, 32, 1, 4, 40)
    for m in lm.modules():
        if hasattr(m, "fuse_projections"):
            m.fuse_projections = True  # (on a CPU the default is not to fuse)
    ids = torch.randint(0, 50, (2, 7))
    fused = lm(ids)
    calls = []
    block = lm.layers[0]
    for m in (block.attn.k_proj, block.ffn.w3):
        m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    torch.testing.assert_close(lm(ids), fused, rtol=1e-5, atol=1e-6)
    assert calls == [block.attn.k_proj, block.ffn.w3]
    assert not M.unhooked(block.attn.k_proj) and M.unhooked(block.attn.q_proj)


def test_projections_fuse_by_default_where_triton_runs(monkeypatch):
    lm = M.TransformerLM(50, 16, 32, 1, 4, 40)
    ids = torch.randint(0, 50, (2, 7))
    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real_cat(*a, **k))
    monkeypatch.setattr(M, "runs_on", lambda device: False)  # a CPU without the interpreter
    lm(ids)
    assert cats == []  # three and two matmuls, no concatenated weights
    monkeypatch.setattr(M, "runs_on", lambda device: True)  # CUDA (or the interpreter)
    lm(ids)
    assert len(cats) == 2  # [q; k; v] and [W1; W3]
    assert M.fuse_here(False, ids) is False and M.fuse_here(True, ids) is True


def test_attention_backend_callable_and_errors():
    calls = []

    def my_attn(q, k, v, is_causal):
        calls.append((q.shape, is_causal))
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    lm = M.TransformerLM(50, 16, 32, 2, 4, 64, attn_backend=my_attn)
    lm(torch.randint(0, 50, (2, 8)))
    assert calls == [((2, 4, 8, 8), True)] * 2
    with pytest.raises(ValueError, match="attn_backend"):
        M.MultiHeadSelfAttention(32, 4, attn_backend="nope")
    with pytest.raises(ValueError, match="divisible"):
        M.MultiHeadSelfAttention(30, 4)


def test_block_pre_post_and_no_norm():
    x = torch.randn(2, 6, 32)
    rope = M.RotaryPositionalEmbedding(10000.0, 8, 16)
    pre = M.TransformerBlock(32, 4, 64, rope)
    h = x + pre.attn(pre.ln1(x))
    torch.testing.assert_close(pre(x), h + pre.ffn(pre.ln2(h)))
    post = M.TransformerBlock(32, 4, 64, rope, norm="post", ffn="silu")
    assert isinstance(post.ffn, M.SiLUFFN)
    h = post.ln1(x + post.attn(x))
    torch.testing.assert_close(post(x), post.ln2(h + post.ffn(h)))
    none = M.TransformerBlock(32, 4, 64, None, norm="none")
    assert not any("ln" in n for n, _ in none.named_parameters())
    h = x + none.attn(x)
    torch.testing.assert_close(none(x), h + none.ffn(h))
    assert set(pre.state_dict()) == {
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.output_proj.weight",
        "ln1.weight", "ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight", "ln2.weight",
    }


def test_lm_options_and_context_error():
    lm = M.TransformerLM(50, 16, 32, 2, 4, 64, tie_embeddings=True, use_rope=False)
    assert lm.lm_head.weight is lm.token_embeddings.weight
    assert lm.layers[0].attn.rope is None
    assert lm(torch.randint(0, 50, (1, 16))).shape == (1, 16, 50)
    with pytest.raises(ValueError, match="context_length=16"):
        lm(torch.randint(0, 50, (1, 17)))


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_lm_matches_transformers_llama(backend):
    theta = 10000.0
    lm = M.TransformerLM(97, 32, 64, 3, 4, 96, theta, attn_backend=backend).eval()
    with torch.no_grad():  # non-trivial norm weights so the layer norms are really compared
        for n, p in lm.named_parameters():
            if n.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    hf = to_hf_llama(lm, theta, attn_implementation="eager").eval()
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        ours = lm(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_kv_cache_forward_matches_full_forward():
    lm = M.TransformerLM(50, 24, 32, 2, 4, 64).eval()
    ids = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = lm(ids)
        cache = lm.new_kv_cache(2)
        parts = [lm(ids[:, :12], kv_cache=cache)]  # prefill, then a 3-token chunk, then one at a time
        parts.append(lm(ids[:, 12:15], kv_cache=cache))
        parts += [lm(ids[:, i:i + 1], kv_cache=cache) for i in range(15, 20)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.length == 20
