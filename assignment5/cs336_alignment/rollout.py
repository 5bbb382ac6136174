"""Batched sampling for rollouts and evaluation: a static KV cache, CUDA-graph decode steps.

    engine = RolloutEngine(policy, max_batch_size=1024)
    outs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=512,
                                                   stop=("</answer>",), n=8, seed=0))
    outs[i][j].text, .token_ids, .logprobs, .finish_reason
    engine.load_weights(trained_model)   # copies in place between GRPO rounds

How it is fast (the decoding loop of gpt-fast, arranged for many sequences at once):
- The model's weights are read once into a flat list of tensors (views of the module's own
  parameters, so ``load_weights`` is an in-place copy) and run by a small functional forward
  for the Llama family (HF Llama/Qwen2/Mistral-style models and cs336_basics' TransformerLM).
- Prompts are left-padded into one batch; all rows share the cache column ``t`` they write,
  so a decode step is a fixed-shape program. On CUDA each (batch, attention-length) bucket is
  captured once as a CUDA graph: a step is one ``replay()`` with no Python per layer and no
  host sync. The host looks at the batch every ``check_every`` steps (EOS, stop strings).
- Attention reads only the first ``t`` cache columns (rounded up to ``len_bucket``), and once
  half the rows are done the survivors are compacted into a smaller batch bucket.
- Sampling noise is drawn by a per-call generator (``seed``), so a call is reproducible.

Log-probs are those of the sampled tokens under the model's own distribution (temperature 1,
no top-p truncation): the ``old_log_probs`` that policy-gradient methods need.

A vLLM backend with the same interface is used by ``make_engine(..., backend="vllm")`` when
``vllm`` is installed; it is never required.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cs336_alignment.models import Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
    max_new_tokens: int = 512
    min_new_tokens: int = 0  # EOS is forbidden before this many tokens, stop strings ignored
    stop: tuple[str, ...] = ()  # stop after any of these strings; the string is kept in the text
    n: int = 1  # samples per prompt
    seed: int | None = None  # same seed, prompts and engine -> same samples

    def __post_init__(self):
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens or self.n < 1:
            raise ValueError("need 1 <= max_new_tokens, 0 <= min_new_tokens <= max_new_tokens and n >= 1")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


# ----------------------------------------------------------------------------- weights as a flat list


@dataclass
class _Layer:
    attn_norm: Tensor
    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    bq: Tensor | None
    bk: Tensor | None
    bv: Tensor | None
    mlp_norm: Tensor
    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor


@dataclass
class _Weights:
    """Views of a Llama-family model's parameters + what the functional forward needs to know."""

    embed: Tensor
    layers: list[_Layer]
    norm: Tensor
    lm_head: Tensor
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    interleaved_rope: bool  # cs336_basics rotates (x[2i], x[2i+1]); HF rotates halves
    rope_table: Any = field(repr=False)  # callable max_len -> (cos, sin), each (max_len, D/2) float32
    max_positions: int | None = None  # the model's context length, where it has a hard one


def _hf_weights(model: nn.Module) -> _Weights:
    cfg, core = model.config, model.model
    names = {type(core.layers[0].self_attn).__name__, type(core.layers[0].mlp).__name__}
    if not hasattr(core.layers[0].mlp, "gate_proj"):
        raise NotImplementedError(f"the built-in engine runs Llama-style models; got {names} (use backend='vllm')")
    rotary = core.rotary_emb
    scale = float(getattr(rotary, "attention_scaling", 1.0))

    def rope_table(max_len: int):
        inv_freq = rotary.inv_freq.float()  # (D/2,): includes any rope scaling the config asks for
        angles = torch.arange(max_len, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq
        return angles.cos() * scale, angles.sin() * scale

    layers = []
    for blk in core.layers:
        a, m = blk.self_attn, blk.mlp
        layers.append(_Layer(
            blk.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
            a.q_proj.bias, a.k_proj.bias, a.v_proj.bias,
            blk.post_attention_layernorm.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
        ))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return _Weights(core.embed_tokens.weight, layers, core.norm.weight, model.lm_head.weight,
                    cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, head_dim,
                    float(cfg.rms_norm_eps), False, rope_table)


def _basics_weights(model: nn.Module) -> _Weights:
    blk0 = model.layers[0]
    if blk0.attn.rope is None or not hasattr(blk0.ffn, "w3") or not blk0.pre_norm or not hasattr(blk0.ln1, "weight"):
        raise NotImplementedError("the built-in engine runs pre-norm SwiGLU RoPE TransformerLMs")
    rope = blk0.attn.rope

    def rope_table(max_len: int):
        if max_len > rope.cos.shape[0]:
            raise ValueError(f"{max_len} positions exceed the model's context length {rope.cos.shape[0]}")
        return rope.cos[:max_len].float(), rope.sin[:max_len].float()

    layers = [
        _Layer(b.ln1.weight, b.attn.q_proj.weight, b.attn.k_proj.weight, b.attn.v_proj.weight,
               b.attn.output_proj.weight, None, None, None, b.ln2.weight, b.ffn.w1.weight, b.ffn.w3.weight,
               b.ffn.w2.weight)
        for b in model.layers
    ]
    return _Weights(model.token_embeddings.weight, layers, model.ln_final.weight, model.lm_head.weight,
                    model.num_heads, model.num_heads, model.d_model // model.num_heads, blk0.ln1.eps, True,
                    rope_table, max_positions=rope.cos.shape[0])


# ----------------------------------------------------------------------------- functional forward


def _rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, w.shape, w, eps)  # one fused kernel; accumulates in fp32 for bf16 inputs


def _rope_tables(cos: Tensor, sin: Tensor, pos: Tensor, dtype: torch.dtype, interleaved: bool):
    """cos/sin at ``pos``, shaped for :func:`_rope`: fp32 (..., D/2) pairs, or HF's (..., D) halves in ``dtype``."""
    cos, sin = cos[pos], sin[pos]
    if interleaved:
        return cos, sin
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """Rotate ``x`` (..., D) with tables from :func:`_rope_tables` (broadcast over heads)."""
    if interleaved:  # cs336_basics: pairs (x[2i], x[2i+1]), in fp32
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2).to(x.dtype)
    x1, x2 = x.chunk(2, -1)  # HF: halves (x[i], x[i + D/2])
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _mlp(x: Tensor, ly: _Layer) -> Tensor:
    return F.linear(F.silu(F.linear(x, ly.w_gate)) * F.linear(x, ly.w_up), ly.w_down)


class _KVCache:
    """``k``/``v``: (layers, B, H_kv, L, D), one allocation each, reused across calls."""

    def __init__(self, w: _Weights, batch: int, length: int, device, dtype):
        shape = (len(w.layers), batch, w.n_kv_heads, length, w.head_dim)
        # zeros, not empty: masked columns get probability 0, and 0 * NaN garbage would be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch, self.length = batch, length


def _prefill(w: _Weights, cache: _KVCache, ids: Tensor, pads: Tensor, dst: Tensor, cos: Tensor,
             sin: Tensor) -> Tensor:
    """Run left-padded prompts ``ids`` (c, P); write their K/V to cache rows ``dst`` (c,).

    Returns the last position's logits (c, V) in float32.
    """
    _c, p = ids.shape
    cols = torch.arange(p, device=ids.device)
    pos = (cols[None, :] - pads[:, None]).clamp(min=0)  # (c, P)
    key_ok = cols[None, None, :] >= pads[:, None, None]  # (c, 1, P): not a pad
    mask = (key_ok & (cols[None, None, :] <= cols[None, :, None])) | torch.eye(p, dtype=torch.bool,
                                                                                device=ids.device)
    mask = mask[:, None]  # (c, 1, P, P); pad queries see themselves only, so no row is empty
    cos_p, sin_p = _rope_tables(cos, sin, pos[:, None], w.embed.dtype, w.interleaved_rope)  # (c, 1, P, .)
    x = F.embedding(ids, w.embed)  # (c, P, C)
    for i, ly in enumerate(w.layers):
        h = _rms_norm(x, ly.attn_norm, w.eps)
        q = F.linear(h, ly.wq, ly.bq).unflatten(-1, (w.n_heads, w.head_dim)).transpose(1, 2)  # (c, H, P, D)
        k = F.linear(h, ly.wk, ly.bk).unflatten(-1, (w.n_kv_heads, w.head_dim)).transpose(1, 2)
        v = F.linear(h, ly.wv, ly.bv).unflatten(-1, (w.n_kv_heads, w.head_dim)).transpose(1, 2)
        q, k = _rope(q, cos_p, sin_p, w.interleaved_rope), _rope(k, cos_p, sin_p, w.interleaved_rope)
        cache.k[i, :, :, :p].index_copy_(0, dst, k)
        cache.v[i, :, :, :p].index_copy_(0, dst, v)
        rep = w.n_heads // w.n_kv_heads
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask)
        x = x + F.linear(o.transpose(1, 2).flatten(2), ly.wo)
        x = x + _mlp(_rms_norm(x, ly.mlp_norm, w.eps), ly)
    h = _rms_norm(x[:, -1], w.norm, w.eps)
    return F.linear(h, w.lm_head).float()


def _decode(w: _Weights, k_all: Tensor, v_all: Tensor, tok: Tensor, t: Tensor, pads: Tensor, cos: Tensor,
            sin: Tensor) -> Tensor:
    """One step for ``b`` rows: token ``tok`` (b,) sits at cache column ``t`` (0-d); K/V caches
    ``k_all``/``v_all`` (layers, b, H_kv, Lb, D) hold columns ``< Lb``. Returns logits (b, V) float32."""
    b, lb = tok.shape[0], k_all.shape[3]
    g = w.n_heads // w.n_kv_heads
    pos = t - pads  # (b,)
    cos_t, sin_t = _rope_tables(cos, sin, pos[:, None], w.embed.dtype, w.interleaved_rope)  # (b, 1, .)
    cols = torch.arange(lb, device=tok.device)
    valid = (cols[None, :] >= pads[:, None]) & (cols[None, :] <= t)  # (b, Lb)
    bias = torch.zeros(valid.shape, device=tok.device, dtype=w.embed.dtype).masked_fill_(~valid, float("-inf"))
    bias = bias.repeat_interleave(w.n_kv_heads, 0)[:, None]  # (b*Hkv, 1, Lb)
    scale = 1.0 / math.sqrt(w.head_dim)
    t1 = t.view(1)
    x = F.embedding(tok, w.embed)  # (b, C)
    for i, ly in enumerate(w.layers):
        h = _rms_norm(x, ly.attn_norm, w.eps)
        q = F.linear(h, ly.wq, ly.bq).view(b, w.n_heads, w.head_dim)
        k = F.linear(h, ly.wk, ly.bk).view(b, w.n_kv_heads, w.head_dim)
        v = F.linear(h, ly.wv, ly.bv).view(b, w.n_kv_heads, w.head_dim)
        q, k = _rope(q, cos_t, sin_t, w.interleaved_rope), _rope(k, cos_t, sin_t, w.interleaved_rope)
        k_all[i].index_copy_(2, t1, k[:, :, None])
        v_all[i].index_copy_(2, t1, v[:, :, None])
        # GQA: the G query heads of a KV head form the rows of one small matrix product
        qg = q.view(b * w.n_kv_heads, g, w.head_dim)
        scores = torch.baddbmm(bias, qg, k_all[i].flatten(0, 1).transpose(1, 2), alpha=scale)  # (b*Hkv, G, Lb)
        o = torch.bmm(scores.softmax(-1), v_all[i].flatten(0, 1))  # (b*Hkv, G, D); softmax accumulates in fp32
        x = x + F.linear(o.reshape(b, -1), ly.wo)
        x = x + _mlp(_rms_norm(x, ly.mlp_norm, w.eps), ly)
    return F.linear(_rms_norm(x, w.norm, w.eps), w.lm_head).float()


def _sample(logits: Tensor, noise: Tensor | None, temperature: float, top_p: float, ban: Tensor,
            eos_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Pick one token per row of ``logits`` (b, V), which it overwrites. ``noise`` ~ Exp(1) (b, V),
    also overwritten (None = greedy); ``ban`` (0-d bool) forbids ``eos_ids`` (min_new_tokens).
    Returns (token ids, their log-probs under the untempered, unbanned distribution)."""
    lse = logits.logsumexp(-1)  # (b,): before the ban, so log-probs are the model's own
    logits[:, eos_ids] = torch.where(ban, float("-inf"), logits[:, eos_ids])  # a chosen token is never banned
    if noise is None:
        tok = logits.argmax(-1)
    elif top_p < 1.0:
        scores = logits / temperature
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        sorted_scores = sorted_scores.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))  # keeps top-1
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        tok = (scores - noise.log_()).argmax(-1)  # Gumbel-max: argmax(s + G), G = -log(Exp(1))
    else:  # the same, scaled by T (same argmax) to save a pass over (b, V)
        tok = torch.sub(logits, noise.log_(), alpha=temperature).argmax(-1)
    return tok, logits.gather(-1, tok[:, None])[:, 0] - lse


# ----------------------------------------------------------------------------- the engine


class RolloutEngine:
    """Batched KV-cache sampler for a :class:`Policy` (see the module docstring)."""

    def __init__(self, policy: Policy, max_batch_size: int = 512, check_every: int = 8, len_bucket: int = 128,
                 cuda_graphs: bool | None = None, prefill_tokens: int = 16384):
        self.policy = policy
        self.max_batch_size = max_batch_size
        self.check_every = check_every
        self.len_bucket = len_bucket
        self.prefill_tokens = prefill_tokens
        self.device, self.dtype = policy.device, policy.dtype
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.weights = _hf_weights(policy.model) if policy.kind == "hf" else _basics_weights(policy.model)
        tok = policy.tokenizer
        eos = getattr(getattr(policy.model, "generation_config", None), "eos_token_id", None)
        eos = {tok.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_set = {i for i in eos if i is not None}
        self.eos_ids = torch.tensor(sorted(self.eos_set), device=self.device)
        self.eos_mask = torch.zeros(self.weights.lm_head.shape[0], dtype=torch.bool, device=self.device)
        self.eos_mask[sorted(self.eos_set)] = True
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._cache: _KVCache | None = None
        self._rope: tuple[Tensor, Tensor] | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- weights

    @torch.no_grad()
    def load_weights(self, source: nn.Module | dict[str, Tensor]) -> None:
        """Copy new policy weights into the engine's model, in place (CUDA graphs stay valid)."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        prefixes = ("_orig_mod.", "module.")
        clean = {}
        for name, value in state.items():
            for p in prefixes:
                name = name.removeprefix(p)
            clean[name] = value
        missing, unexpected = self.policy.model.load_state_dict(clean, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        if missing or unexpected:
            raise KeyError(f"load_weights: missing {missing[:5]}, unexpected {unexpected[:5]}")

    # -- buffers

    def _ensure_buffers(self, batch: int, length: int) -> None:
        length = -(-length // self.len_bucket) * self.len_bucket
        if self.weights.max_positions is not None:  # a short-context model: the bucket must not overshoot it
            length = min(length, self.weights.max_positions)
        c = self._cache
        if c is None or c.batch < batch or c.length < length:
            self._graphs.clear()  # graphs point into the old buffers
            self._pool = None  # a pool whose graphs are all gone cannot be captured into again
            self._cache = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            batch, length = max(batch, c.batch if c else 0), max(length, c.length if c else 0)
            self._cache = _KVCache(self.weights, batch, length, self.device, self.dtype)
            cos, sin = self.weights.rope_table(length)
            self._rope = (cos.to(self.device), sin.to(self.device))
            v = self.weights.lm_head.shape[0]
            dev = self.device
            self._tok = torch.zeros(batch, dtype=torch.long, device=dev)
            self._pads = torch.zeros(batch, dtype=torch.long, device=dev)
            self._done = torch.zeros(batch, dtype=torch.bool, device=dev)
            self._t = torch.zeros((), dtype=torch.long, device=dev)
            self._gen = torch.zeros((), dtype=torch.long, device=dev)  # index of the token being sampled
            self._min_new = torch.zeros((), dtype=torch.long, device=dev)
            self._noise = torch.empty(batch, v, device=dev)
            self._out_tok = torch.zeros(batch, length, dtype=torch.long, device=dev)
            self._out_lp = torch.zeros(batch, length, device=dev)

    def _step(self, b: int, lb: int, params: SamplingParams) -> None:
        """One decode step for the first ``b`` slots, attention over ``lb`` columns (graph-capturable)."""
        c = self._cache
        logits = _decode(self.weights, c.k[:, :b, :, :lb], c.v[:, :b, :, :lb], self._tok[:b], self._t,
                         self._pads[:b], *self._rope)
        self._pick(logits, b, params)
        self._t += 1

    def _pick(self, logits: Tensor, b: int, params: SamplingParams) -> None:
        noise = None if params.temperature == 0 else self._noise[:b]
        tok, lp = _sample(logits, noise, params.temperature, params.top_p, self._gen < self._min_new,
                          self.eos_ids)
        done = self._done[:b]
        tok = torch.where(done, self.pad_id, tok)
        g1 = self._gen.view(1)
        self._out_tok[:b].index_copy_(1, g1, tok[:, None])
        self._out_lp[:b].index_copy_(1, g1, torch.where(done, 0.0, lp)[:, None])
        done |= self.eos_mask[tok]
        self._tok[:b] = tok
        self._gen += 1

    def _run_step(self, b: int, lb: int, params: SamplingParams, generator: torch.Generator) -> None:
        graph = None
        if self.cuda_graphs:
            graph = self._graphs.get((b, lb, params.temperature, params.top_p)) or self._capture(b, lb, params)
        if params.temperature > 0:  # after any capture: its warm-up step overwrites the noise buffer
            self._noise[:b].exponential_(generator=generator)
        if graph is None:
            self._step(b, lb, params)
        else:
            graph.replay()

    def _capture(self, b: int, lb: int, params: SamplingParams) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (cuBLAS picks its kernels), then restore the small state the
        # warm-up advanced, then record. The cache column the warm-up wrote is rewritten identically.
        state = [x.clone() for x in (self._tok, self._done, self._t, self._gen)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(b, lb, params)
        torch.cuda.current_stream().wait_stream(side)
        for x, saved in zip((self._tok, self._done, self._t, self._gen), state):
            x.copy_(saved)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(b, lb, params)
        self._graphs[(b, lb, params.temperature, params.top_p)] = graph
        return graph

    # -- generation

    @torch.inference_mode()
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None,
                 ) -> list[list[Completion]]:
        """Sample ``params.n`` completions per prompt. Outer list: prompts; inner: samples."""
        params = params or SamplingParams()
        tok = self.policy.tokenizer
        ids = [list(p) if not isinstance(p, str) else tok.encode(p, add_special_tokens=False) for p in prompts]
        if any(len(p) == 0 for p in ids):
            raise ValueError("empty prompt: every prompt needs at least one token")
        generator = torch.Generator(self.device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        rows = [(i, j) for i in range(len(ids)) for j in range(params.n)]
        results: list[list[Completion | None]] = [[None] * params.n for _ in ids]
        for start in range(0, len(rows), self.max_batch_size):
            wave = rows[start:start + self.max_batch_size]
            for (i, j), completion in zip(wave, self._generate_wave(ids, wave, params, generator)):
                results[i][j] = completion
        return results  # type: ignore[return-value]

    def _generate_wave(self, ids: list[list[int]], wave: list[tuple[int, int]], params: SamplingParams,
                       generator: torch.Generator) -> list[Completion]:
        dev, b = self.device, len(wave)
        bucket = _bucket(b)
        prompt_len = max(len(ids[i]) for i, _ in wave)
        total = prompt_len + params.max_new_tokens
        self._ensure_buffers(bucket, total)
        c = self._cache
        # Prefill each distinct prompt once; its K/V go to all its sample rows.
        slots_of: dict[int, list[int]] = {}
        for slot, (i, _) in enumerate(wave):
            slots_of.setdefault(i, []).append(slot)
        pads = torch.tensor([prompt_len - len(ids[i]) for i, _ in wave] + [0] * (bucket - b), device=dev)
        self._pads[:bucket] = pads
        first_logits = torch.empty(bucket, self.weights.lm_head.shape[0], device=dev)
        uniq = list(slots_of)
        chunk = max(1, self.prefill_tokens // prompt_len)
        for s in range(0, len(uniq), chunk):
            group = uniq[s:s + chunk]
            batch = torch.tensor([[self.pad_id] * (prompt_len - len(ids[i])) + ids[i] for i in group], device=dev)
            first = torch.tensor([slots_of[i][0] for i in group], device=dev)
            logits = _prefill(self.weights, c, batch, pads[first], first, *self._rope)  # (g, V)
            src = torch.tensor([k for k, i in enumerate(group) for _ in slots_of[i]], device=dev)
            dst = torch.tensor([slot for i in group for slot in slots_of[i]], device=dev)
            first_logits[dst] = logits[src]
            if len(dst) > len(group):  # n > 1: the other samples' slots get a copy of the prompt's K/V
                for kv in (c.k, c.v):
                    kv[:, :, :, :prompt_len].index_copy_(1, dst, kv[:, first[src], :, :prompt_len])
        self._done[:bucket] = torch.arange(bucket, device=dev) >= b  # filler slots are born done
        self._gen.zero_()
        self._min_new.fill_(params.min_new_tokens)
        if params.temperature > 0:
            self._noise[:bucket].exponential_(generator=generator)
        self._pick(first_logits, bucket, params)
        self._t.fill_(prompt_len)

        owner = list(range(b)) + [-1] * (bucket - b)  # slot -> wave row
        out_tok = [[0] * params.max_new_tokens for _ in range(b)]
        out_lp = [[0.0] * params.max_new_tokens for _ in range(b)]
        finish = [None] * b
        stop_at = [params.max_new_tokens] * b  # tokens kept per row
        by_string = set()  # rows ended by a stop string: their text is cut right after it
        fetched = 0
        for step in range(1, params.max_new_tokens + 1):
            last = step == params.max_new_tokens
            if step % self.check_every == 0 or last:
                # .cpu() syncs with the GPU: only every check_every steps
                toks = self._out_tok[:bucket, fetched:step].cpu().tolist()
                lps = self._out_lp[:bucket, fetched:step].cpu().tolist()
                done = self._done[:bucket].cpu().tolist()
                for slot, row in enumerate(owner):
                    if row < 0 or finish[row] is not None:
                        continue
                    out_tok[row][fetched:step], out_lp[row][fetched:step] = toks[slot], lps[slot]
                    end = step  # tokens to look at: up to and including an EOS
                    if done[slot]:
                        end = next(k for k in range(fetched, step) if out_tok[row][k] in self.eos_set) + 1
                    hit = self._find_stop(out_tok[row], fetched, end, params) if params.stop else None
                    if hit is not None:
                        stop_at[row], finish[row] = hit, "stop"
                        by_string.add(row)
                    elif done[slot]:
                        stop_at[row], finish[row] = end, "stop"
                fetched = step
                live = [slot for slot, row in enumerate(owner) if row >= 0 and finish[row] is None]
                if not live or last:
                    break
                if _bucket(len(live)) < bucket:  # half the batch is done: shrink to the live rows
                    bucket, owner = self._compact(live, owner)
            lb = min(c.length, -(-(prompt_len + step) // self.len_bucket) * self.len_bucket)
            self._run_step(bucket, lb, params, generator)

        tok = self.policy.tokenizer
        completions = []
        for row in range(b):
            n = stop_at[row]
            ids_row, text = out_tok[row][:n], tok.decode(out_tok[row][:n], skip_special_tokens=True)
            if row in by_string:
                cut = [text.rfind(s) + len(s) for s in params.stop if s in text]  # ends in the last token
                text = text[:max(cut)] if cut else text
            completions.append(Completion(text, ids_row, out_lp[row][:n], finish[row] or "length"))
        return completions

    def _find_stop(self, toks: list[int], fetched: int, step: int, params: SamplingParams) -> int | None:
        """Tokens to keep if a stop string appears in the text after the first ``min_new_tokens``
        tokens, else None (only the window since the last check, plus a margin, is decoded)."""
        tok = self.policy.tokenizer
        lo = max(params.min_new_tokens, fetched - 16)  # stop strings may straddle the previous window
        if lo >= step or not any(s in tok.decode(toks[lo:step]) for s in params.stop):
            return None
        for n in range(lo + 1, step + 1):  # the shortest prefix holding a stop string
            if any(s in tok.decode(toks[lo:n]) for s in params.stop):
                return n
        return None

    def _compact(self, live: list[int], owner: list[int]) -> tuple[int, list[int]]:
        """Move the live slots to the front and shrink to the next smaller batch bucket."""
        new = _bucket(len(live))
        idx = torch.tensor(live + [live[0]] * (new - len(live)), device=self.device)
        c = self._cache
        c.k[:, :new] = c.k[:, idx]
        c.v[:, :new] = c.v[:, idx]
        for buf in (self._tok, self._pads, self._out_tok, self._out_lp):
            buf[:new] = buf[idx]
        self._done[:new] = torch.arange(new, device=self.device) >= len(live)
        return new, [owner[s] for s in live] + [-1] * (new - len(live))


def _bucket(n: int) -> int:
    """Batch sizes we run at: powers of two (few CUDA graphs, compaction halves)."""
    return 1 << max(0, (n - 1).bit_length())


# ----------------------------------------------------------------------------- vLLM backend


class VLLMEngine:
    """The same interface on top of vLLM (``pip install vllm``); the policy must be a HF model."""

    # knobs of the built-in engine that have no vLLM counterpart (callers may pass them to either backend)
    _BUILTIN_ONLY = ("check_every", "len_bucket", "cuda_graphs", "prefill_tokens")

    def __init__(self, policy: Policy, model_dir: str | None = None, gpu_memory_utilization: float = 0.5,
                 max_batch_size: int | None = None, **kw: Any):
        import tempfile

        from vllm import LLM

        if model_dir is None:
            model_dir = tempfile.mkdtemp(prefix="cs336_vllm_")
            policy.save(model_dir)
        self.policy = policy
        kw = {k: v for k, v in kw.items() if k not in self._BUILTIN_ONLY}
        if max_batch_size is not None:
            kw["max_num_seqs"] = max_batch_size
        self.llm = LLM(model=model_dir, dtype="bfloat16", gpu_memory_utilization=gpu_memory_utilization, **kw)

    def load_weights(self, source: nn.Module | dict[str, Tensor]) -> None:
        state = source.state_dict() if isinstance(source, nn.Module) else source
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(state.items())

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None,
                 ) -> list[list[Completion]]:
        from vllm import SamplingParams as VSamplingParams

        params = params or SamplingParams()
        vp = VSamplingParams(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                             min_tokens=params.min_new_tokens, stop=list(params.stop), n=params.n, seed=params.seed,
                             logprobs=0, include_stop_str_in_output=True)
        # token-id prompts go in as vLLM's TokensPrompt dicts, so rollouts and training see the same tokens
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(inputs, vp, use_tqdm=False)
        return [[Completion(o.text, list(o.token_ids),
                            [lp[t].logprob for lp, t in zip(o.logprobs or [], o.token_ids)],
                            "length" if o.finish_reason == "length" else "stop") for o in out.outputs]
                for out in outs]


def make_engine(policy: Policy, backend: str = "builtin", **kw: Any) -> RolloutEngine | VLLMEngine:
    """``"builtin"`` (always available) or ``"vllm"`` (needs vllm installed)."""
    if backend == "builtin":
        return RolloutEngine(policy, **kw)
    if backend == "vllm":
        return VLLMEngine(policy, **kw)
    raise ValueError(f"unknown rollout backend {backend!r}: 'builtin' or 'vllm'")
