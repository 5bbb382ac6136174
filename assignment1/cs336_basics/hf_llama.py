"""Our TransformerLM as a ``transformers.LlamaForCausalLM`` with the same weights.

Used as the independent reference in tests and as the baseline in benchmarks. The only non-trivial
part of the mapping is RoPE: we rotate adjacent pairs ``(x[2i], x[2i+1])`` while Llama's
``rotate_half`` rotates ``(x[i], x[i + D/2])`` with the same frequency; reordering each head's
q/k projection rows evens-then-odds turns one convention into the other (attention scores are
invariant to a permutation applied to both q and k).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cs336_basics.model import TransformerLM
from cs336_basics.nn_utils import cross_entropy


def rope_row_permutation(num_heads: int, head_dim: int) -> Tensor:
    """Row order of a q/k projection that maps adjacent-pair RoPE to half-split RoPE."""
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return (torch.arange(num_heads)[:, None] * head_dim + within).flatten()


def llama_state_dict(lm: TransformerLM) -> dict[str, Tensor]:
    """Our state dict renamed (and q/k rows permuted) into ``LlamaForCausalLM``'s layout."""
    sd = lm.state_dict()
    perm = rope_row_permutation(lm.num_heads, lm.d_model // lm.num_heads).to(sd["lm_head.weight"].device)
    out = {"model.embed_tokens.weight": sd["token_embeddings.weight"], "model.norm.weight": sd["ln_final.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(lm.num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out |= {
            q + "self_attn.q_proj.weight": sd[p + "attn.q_proj.weight"][perm],
            q + "self_attn.k_proj.weight": sd[p + "attn.k_proj.weight"][perm],
            q + "self_attn.v_proj.weight": sd[p + "attn.v_proj.weight"],
            q + "self_attn.o_proj.weight": sd[p + "attn.output_proj.weight"],
            q + "mlp.gate_proj.weight": sd[p + "ffn.w1.weight"],
            q + "mlp.up_proj.weight": sd[p + "ffn.w3.weight"],
            q + "mlp.down_proj.weight": sd[p + "ffn.w2.weight"],
            q + "input_layernorm.weight": sd[p + "ln1.weight"],
            q + "post_attention_layernorm.weight": sd[p + "ln2.weight"],
        }
    return out


def to_hf_llama(lm: TransformerLM, rope_theta: float, attn_implementation: str = "sdpa", eps: float = 1e-5):
    """A ``LlamaForCausalLM`` computing the same logits as ``lm`` (pre-norm, SwiGLU, RoPE, untied)."""
    from transformers import (  # optional dependency: imported only here
        LlamaConfig,
        LlamaForCausalLM,
    )

    d_ff = lm.layers[0].ffn.w1.weight.shape[0]
    cfg = LlamaConfig(
        vocab_size=lm.vocab_size, hidden_size=lm.d_model, intermediate_size=d_ff, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_heads, max_position_embeddings=lm.context_length,
        rope_theta=rope_theta, rms_norm_eps=eps, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        use_cache=False,
    )
    cfg._attn_implementation = attn_implementation
    w = lm.lm_head.weight
    with torch.device(w.device):
        hf = LlamaForCausalLM(cfg).to(w.dtype)
    missing, unexpected = hf.load_state_dict(llama_state_dict(lm), strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"Llama mapping failed: missing={missing}, unexpected={unexpected}")
    return hf


class HFLogits(nn.Module):
    """``ids -> logits`` around a ``LlamaForCausalLM``, so the training loop treats it like ours."""

    def __init__(self, hf: nn.Module, vocab_size: int, context_length: int):
        super().__init__()
        self.hf, self.vocab_size, self.context_length = hf, vocab_size, context_length

    def forward(self, token_ids: Tensor, targets: Tensor | None = None) -> Tensor:
        """Logits, or with ``targets`` the mean cross-entropy of them (our `nn_utils.cross_entropy`)."""
        logits = self.hf(input_ids=token_ids, use_cache=False).logits
        return logits if targets is None else cross_entropy(logits, targets)
