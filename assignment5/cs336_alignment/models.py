"""One way to load a policy: a `transformers` directory, a GGUF file, or a `cs336_basics` checkpoint.

Every loader returns a :class:`Policy`: ``.model`` (an ``nn.Module``), ``.logits(input_ids,
attention_mask=None) -> (B, T, V)``, ``.tokenizer`` (HF-like: ``encode``/``decode``/``__call__``,
``eos_token_id``, ``pad_token_id``) and ``.save(dir)``. Training code (SFT, GRPO, DPO) and the
rollout engine only see this interface.

    load_policy("Qwen/Qwen2.5-Math-1.5B-dir")                          # HF directory
    load_policy("../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf")     # GGUF, dequantized
    load_policy("runs/ckpt.pt", tokenizer="runs/tokenizer")           # cs336_basics checkpoint

GGUF needs the ``gguf`` package (the ``gguf`` extra); `transformers` dequantizes the blocks into a
plain dense model, which is what training needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn


@dataclass
class Policy:
    """A causal LM and its tokenizer. ``kind`` says which forward convention ``model`` follows."""

    model: nn.Module
    tokenizer: Any
    kind: Literal["hf", "basics"] = "hf"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(B, T)`` ids -> ``(B, T, V)`` next-token logits.

        ``attention_mask`` (1 = real token) is honoured by HF models; a cs336_basics model has no
        padding mask, so pad on the right (causal attention never looks ahead at the pads).
        """
        if self.kind == "hf":
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.model(input_ids)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the policy so that :func:`load_policy` reads it back (HF dir, or checkpoint + tokenizer)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind == "hf":
            self.model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
        else:
            from cs336_basics.checkpoint import save_checkpoint

            save_checkpoint(self.model, None, 0, out / "model.pt", config=_basics_config(self.model))
            self.tokenizer.save_pretrained(out)
        return out


def load_policy(
    spec: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: str | os.PathLike | None = None,
) -> Policy:
    """Load a policy from a HF directory, a ``.gguf`` file or a cs336_basics checkpoint (``.pt``).

    ``dtype`` defaults to bfloat16 on CUDA and float32 on CPU. ``tokenizer`` is the tokenizer
    directory of a cs336_basics checkpoint (default: the checkpoint's own folder).
    """
    path = Path(spec)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: give a HF directory, a .gguf file or a cs336_basics checkpoint")
    if path.suffix == ".gguf":
        policy = _load_gguf(path, dtype)
    elif path.is_dir() and (path / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        policy = Policy(model, _with_pad(AutoTokenizer.from_pretrained(path)), "hf")
    else:
        ckpt = path / "model.pt" if path.is_dir() else path
        policy = _load_basics(ckpt, Path(tokenizer) if tokenizer else ckpt.parent, dtype)
    policy.model.to(device=device).eval()
    return policy


def _load_gguf(path: Path, dtype: torch.dtype) -> Policy:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError as e:
        raise ImportError("loading a .gguf model needs the `gguf` package: pip install 'cs336-alignment[gguf]'") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    try:  # newer transformers keep GGUF blocks packed unless asked; we need dense, trainable weights
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(gguf_file=path.name, dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kw)
    model.config.quantization_config = None  # dense now: save_pretrained writes a plain checkpoint
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    return Policy(model, _with_pad(tokenizer), "hf")


def _with_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------- cs336_basics models


class BasicsTokenizer:
    """HF-like face of ``cs336_basics.tokenizer.Tokenizer`` (the subset our code and tests use)."""

    chat_template = None

    def __init__(self, tokenizer: Any, eos_token: str = "<|endoftext|>"):
        self.tokenizer = tokenizer
        self.eos_token = self.pad_token = eos_token
        self.eos_token_id = self.pad_token_id = tokenizer.token_id(eos_token)
        self.padding_side = "right"

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i != self.eos_token_id]
        return self.tokenizer.decode(ids)

    def batch_decode(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, text: str | list[str], add_special_tokens: bool = False, **_: Any) -> dict[str, Any]:
        ids = self.encode(text) if isinstance(text, str) else [self.encode(t) for t in text]
        mask = [1] * len(ids) if isinstance(text, str) else [[1] * len(i) for i in ids]
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        self.tokenizer.save(out_dir)


def _basics_config(model: nn.Module) -> dict[str, Any]:
    """The ``config`` entry that ``cs336_basics.generate.load_model_from_checkpoint`` rebuilds a model from."""
    blk = model.layers[0]
    rope = blk.attn.rope
    d_k = model.d_model // model.num_heads
    # RoPE keeps only its cos/sin tables: cos[1, 1] = cos(theta^(-2/d_k)) gives theta back.
    theta = float(torch.arccos(rope.cos[1, 1].double()) ** (-d_k / 2.0)) if rope is not None else 10000.0
    norm = "none" if not hasattr(blk.ln1, "weight") else ("pre" if blk.pre_norm else "post")
    return {
        "model_impl": "cs336", "vocab_size": model.vocab_size, "context_length": model.context_length,
        "d_model": model.d_model, "num_layers": model.num_layers, "num_heads": model.num_heads,
        "d_ff": blk.ffn.w1.weight.shape[0], "rope_theta": theta, "norm": norm,
        "ffn": "swiglu" if hasattr(blk.ffn, "w3") else "silu", "use_rope": rope is not None,
        "tie_embeddings": model.lm_head.weight is model.token_embeddings.weight,
    }


def _load_basics(ckpt: Path, tokenizer_dir: Path, dtype: torch.dtype) -> Policy:
    from cs336_basics.generate import load_model_from_checkpoint
    from cs336_basics.tokenizer import Tokenizer

    if not (tokenizer_dir / "vocab.json").exists():
        raise FileNotFoundError(f"no tokenizer (vocab.json, merges.txt) in {tokenizer_dir}; pass tokenizer=DIR")
    model = load_model_from_checkpoint(ckpt, "cpu")
    return Policy(model.to(dtype), BasicsTokenizer(Tokenizer.from_dir(tokenizer_dir)), "basics")


# ----------------------------------------------------------------------------- test helpers


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A random ``LlamaForCausalLM`` built from a config (no download), in eval mode, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings, rope_theta=10000.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def gpt2_tokenizer(tokenizer_dir: str | os.PathLike | None = None) -> Any:
    """GPT-2's tokenizer as a ``transformers`` fast tokenizer, built offline from vocab.json + merges.txt."""
    from transformers import GPT2TokenizerFast

    if tokenizer_dir is None:
        from cs336_basics.paths import shared_data_dir

        tokenizer_dir = shared_data_dir() / "tokenizers" / "gpt2"
    vocab, merges = str(Path(tokenizer_dir) / "vocab.json"), str(Path(tokenizer_dir) / "merges.txt")
    try:  # transformers >= 5
        tokenizer = GPT2TokenizerFast(vocab=vocab, merges=merges)
    except TypeError:
        tokenizer = None
    if tokenizer is None or len(tokenizer) < 2:  # transformers 4 names the files differently
        tokenizer = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges)
    return _with_pad(tokenizer)
