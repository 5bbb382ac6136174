"""Sample text from a trained checkpoint: temperature, nucleus (top-p), stop at end-of-text, KV cache.

With the KV cache each new token runs the model on one position against cached keys/values,
so producing n tokens costs O(n) token-forwards instead of O(n²).

    cs336-basics generate --checkpoint runs/lm/checkpoint.pt --tokenizer-dir tok/ --prompt "Once upon a time"
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor

from cs336_basics.checkpoint import CheckpointError, load_model_state, read_checkpoint
from cs336_basics.model import TransformerLM, softmax


def sample_next(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits`` ``(B, V)``. ``temperature == 0`` is greedy. Top-p keeps
    the smallest set of most likely tokens whose probability reaches ``top_p`` (Holtzman et al. 2020)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # always keeps the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_id: int | None = None, generator: torch.Generator | None = None,
             use_kv_cache: bool = True) -> list[int]:
    """Continue ``prompt_ids``; return only the new tokens (ending with ``eos_id`` if it was drawn).

    Stops at ``max_new_tokens``, at ``eos_id``, or when the context is full.
    """
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    if len(prompt_ids) > model.context_length:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens is longer than the model's "
                         f"context_length={model.context_length}")
    if max(prompt_ids) >= model.vocab_size or min(prompt_ids) < 0:
        raise ValueError(f"prompt holds token ids outside the model's vocabulary (vocab_size={model.vocab_size})")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], device=device)  # (1, T)
    cache = model.new_kv_cache(1) if use_kv_cache else None
    new: list[int] = []
    steps = min(max_new_tokens, model.context_length - len(prompt_ids))
    for _ in range(steps):
        inp = ids if cache is None or cache.length == 0 else ids[:, -1:]  # only the new position
        logits = model(inp, kv_cache=cache)[:, -1]  # (1, V)
        nxt = sample_next(logits, temperature, top_p, generator)
        new.append(int(nxt))
        if eos_id is not None and new[-1] == eos_id:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    model.train(was_training)
    return new


def load_model_from_checkpoint(path, device: str | torch.device = "cpu") -> TransformerLM:
    """Rebuild the TransformerLM described by the checkpoint's stored config and load its weights."""
    payload = read_checkpoint(path, map_location=device)
    cfg = payload.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint {path} stores no model config (written by `cs336-basics train`?)")
    if cfg.get("model_impl", "cs336") != "cs336":
        raise CheckpointError(f"checkpoint {path} holds a {cfg['model_impl']!r} model, not a cs336 TransformerLM")
    model = TransformerLM(cfg["vocab_size"], cfg["context_length"], cfg["d_model"], cfg["num_layers"],
                          cfg["num_heads"], cfg["d_ff"], cfg["rope_theta"], norm=cfg["norm"], ffn=cfg["ffn"],
                          use_rope=cfg["use_rope"], tie_embeddings=cfg["tie_embeddings"],
                          attn_backend="sdpa", device=device)
    load_model_state(model, payload["model"], name=f"checkpoint {path}")
    return model.eval()


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cs336-basics generate", description="Sample text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `cs336-basics train`")
    p.add_argument("--tokenizer-dir", required=True, help="tokenizer folder (vocab.json, merges.txt, config)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--eos", default="<|endoftext|>", help="special token that ends the text")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    from cs336_basics.tokenizer import Tokenizer
    from cs336_basics.train import pick_device

    try:
        model = load_model_from_checkpoint(args.checkpoint, pick_device(args.device))
        tok = Tokenizer.from_dir(args.tokenizer_dir)
        if tok.vocab_size != model.vocab_size:
            raise ValueError(f"tokenizer {args.tokenizer_dir} has {tok.vocab_size} tokens but the model's "
                             f"vocab_size is {model.vocab_size}: they were not trained together")
        eos_id = tok.token_id(args.eos)
        prompt_ids = tok.encode(args.prompt) if args.prompt else [eos_id]
        gen = torch.Generator(next(model.parameters()).device)
        if args.seed is not None:
            gen.manual_seed(args.seed)
        else:
            gen.seed()
        new = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, eos_id, gen)
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if new and new[-1] == eos_id:
        new = new[:-1]
    print(args.prompt + tok.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
