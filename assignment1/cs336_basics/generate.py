"""Sample text from a trained checkpoint: temperature, nucleus (top-p), stop at end-of-text, KV cache.

With the KV cache each new token runs the model on one position against cached keys/values,
so producing n tokens costs O(n) token-forwards instead of O(n²).

Past the model's context: by default (``slide=True``) generation goes on from the last half of
the context once it is full. The cache is emptied and refilled with those ``context_length // 2``
tokens at positions 0, 1, ... (windows that start at position 0 are what the model saw in
training), so each of the following ``context_length // 2`` tokens again costs one position.
``slide=False`` stops when the context is full instead.

    cs336-basics generate --checkpoint runs/lm/checkpoint.pt --tokenizer-dir tok/ --prompt "Once upon a time"
    cs336-basics generate ... --num-samples 4 --max-new-tokens 1000 --temperature 0.7

Python: ``generate(model, ids, 100)`` (one continuation), ``generate_samples(model, ids, 100, 4)``
(several, one batch), ``stream_tokens(...)`` (the next token of every sample, step by step).
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Iterator

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


def check_request(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                  top_p: float, num_samples: int = 1) -> None:
    """Raise ``ValueError`` with a clear message for a request the model cannot serve."""
    if not prompt_ids:
        raise ValueError("prompt is empty: give at least one token")
    if len(prompt_ids) > model.context_length:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens is longer than the model's "
                         f"context_length={model.context_length}")
    if max(prompt_ids) >= model.vocab_size or min(prompt_ids) < 0:
        raise ValueError(f"prompt holds token ids outside the model's vocabulary (vocab_size={model.vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:  # (also NaN)
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def stream_tokens(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, eos_id: int | None = None, generator: torch.Generator | None = None,
                  num_samples: int = 1, use_kv_cache: bool = True, slide: bool = True) -> Iterator[Tensor]:
    """Yield the next token of each of ``num_samples`` continuations of ``prompt_ids``, ``(num_samples,)``
    per step, all sampled in one batch.

    Ends after ``max_new_tokens`` steps, once every sample has drawn ``eos_id`` (a sample's tokens
    after its ``eos_id`` are meaningless), or, with ``slide=False``, when the context is full. With
    ``slide=True`` a full context restarts from its last ``context_length // 2`` tokens (module
    docstring). Without the cache every step reruns the whole window: the reference for the cache.
    """
    check_request(model, prompt_ids, max_new_tokens, temperature, top_p, num_samples)  # now, not at the first next()
    return _stream(model, prompt_ids, max_new_tokens, temperature, top_p, eos_id, generator, num_samples,
                   use_kv_cache, slide)


@torch.no_grad()
def _stream(model, prompt_ids, max_new_tokens, temperature, top_p, eos_id, generator, num_samples,
            use_kv_cache, slide) -> Iterator[Tensor]:
    device = next(model.parameters()).device
    ctx, keep = model.context_length, max(1, model.context_length // 2)
    was_training = model.training
    model.eval()
    try:
        window = torch.tensor([prompt_ids], device=device).expand(num_samples, -1)  # (N, T): what the model sees
        cache = model.new_kv_cache(num_samples) if use_kv_cache else None
        done = torch.zeros(num_samples, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            if window.shape[1] > ctx:  # the last token has no room: slide, or stop
                if not slide:
                    return
                window = window[:, -keep:]
                if cache is not None:
                    cache.length = 0  # refilled from the kept window by the forward below
            new = window if cache is None else window[:, cache.length:]  # only the positions not yet cached
            logits = model(new, kv_cache=cache)[:, -1]  # (N, V)
            nxt = sample_next(logits, temperature, top_p, generator)  # (N,)
            yield nxt
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):  # (syncs with the device once per step, like reading the token)
                    return
            window = torch.cat([window, nxt[:, None]], dim=1)
    finally:
        model.train(was_training)


def collect_samples(steps: Iterator[Tensor], num_samples: int, eos_id: int | None = None) -> list[list[int]]:
    """The ``num_samples`` token lists of a `stream_tokens` run, each cut after its first ``eos_id``."""
    rows = [step.tolist() for step in steps]
    samples = []
    for i in range(num_samples):
        tokens = [row[i] for row in rows]
        if eos_id is not None and eos_id in tokens:
            tokens = tokens[:tokens.index(eos_id) + 1]
        samples.append(tokens)
    return samples


def generate_samples(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, num_samples: int,
                     temperature: float = 1.0, top_p: float = 1.0, eos_id: int | None = None,
                     generator: torch.Generator | None = None, use_kv_cache: bool = True,
                     slide: bool = True) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt_ids`` sampled in one batch; each list holds only the
    new tokens and ends with ``eos_id`` if that was drawn (see `stream_tokens`)."""
    steps = stream_tokens(model, prompt_ids, max_new_tokens, temperature, top_p, eos_id, generator, num_samples,
                          use_kv_cache, slide)
    return collect_samples(steps, num_samples, eos_id)


def generate(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, eos_id: int | None = None, generator: torch.Generator | None = None,
             use_kv_cache: bool = True, slide: bool = True) -> list[int]:
    """Continue ``prompt_ids``; return only the new tokens (ending with ``eos_id`` if it was drawn).

    Stops at ``max_new_tokens`` or at ``eos_id``; past a full context it slides (module docstring),
    or with ``slide=False`` stops there.
    """
    return generate_samples(model, prompt_ids, max_new_tokens, 1, temperature, top_p, eos_id, generator,
                            use_kv_cache, slide)[0]


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


def print_stream(steps: Iterator[Tensor], vocab: dict[int, bytes], eos_id: int | None, out=None) -> int:
    """Write the text of a one-sample `stream_tokens` to ``out`` as its tokens arrive (a byte-level
    token can end inside a UTF-8 character: an incremental decoder holds such bytes back until the
    character is whole). Returns the number of tokens drawn, ``eos_id`` included (not printed)."""
    out = out or sys.stdout
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    n = 0
    for step in steps:
        token = int(step[0])
        n += 1
        if token == eos_id:
            break
        out.write(decoder.decode(vocab[token]))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    return n


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cs336-basics generate", description="Sample text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `cs336-basics train`")
    p.add_argument("--tokenizer-dir", required=True, help="tokenizer folder (vocab.json, merges.txt, config)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from end-of-text)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="tokens to generate at most (past the model's context too, see --stop-at-context)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1]; 1 = off")
    p.add_argument("--num-samples", type=int, default=1,
                   help="continuations of the prompt, sampled in one batch and printed one after another "
                        "(one sample is printed as it is generated)")
    p.add_argument("--stop-at-context", action="store_true",
                   help="stop when the model's context is full (default: go on from its last half)")
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
        steps = stream_tokens(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, eos_id, gen,
                              args.num_samples, slide=not args.stop_at_context)
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.num_samples == 1:
        sys.stdout.write(args.prompt)
        n_tokens = print_stream(steps, tok.vocab, eos_id)
    else:
        samples = collect_samples(steps, args.num_samples, eos_id)
        n_tokens = sum(len(s) for s in samples)
        for i, s in enumerate(samples):
            print(f"=== sample {i + 1}/{len(samples)} ===")
            print(args.prompt + tok.decode(s[:-1] if s and s[-1] == eos_id else s))
    dt = time.perf_counter() - t0
    print(f"[{n_tokens} tokens in {dt:.1f}s, {n_tokens / max(dt, 1e-9):.0f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
