"""The course's model sizes (assignment 2, Table 1) and the FLOP count behind every MFU figure.

``MFU = FLOPs per step / step time / dense peak`` of the dtype the matmuls run in, with the
FLOPs of :func:`forward_flops` (3x for a training step) and the datasheet peaks of
``PEAK_FLOPS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB_SIZE = 10_000
ROPE_THETA = 10_000.0


@dataclass(frozen=True)
class ModelSize:
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int


# The course's Table 1 (assignment 2), plus "tiny" so that CPU runs and CI exercise the same code.
MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(d_model=64, num_layers=2, num_heads=4, d_ff=256),
    "small": ModelSize(d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "medium": ModelSize(d_model=1024, num_layers=24, num_heads=16, d_ff=4096),
    "large": ModelSize(d_model=1280, num_layers=36, num_heads=20, d_ff=5120),
    "xl": ModelSize(d_model=1600, num_layers=48, num_heads=25, d_ff=6400),
    "2.7B": ModelSize(d_model=2560, num_layers=32, num_heads=32, d_ff=10240),
}

# Dense peak FLOP/s of the matrix units, by the dtype the matmuls run in (NVIDIA datasheets, SXM).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "H200": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
}


def canonical_size(name: str) -> str:
    """Case-insensitive model-size lookup (``2.7b`` -> ``2.7B``); clear error for unknown names."""
    for key in MODEL_SIZES:
        if key.lower() == name.lower():
            return key
    raise ValueError(f"unknown model size {name!r}; choose from {', '.join(MODEL_SIZES)}")


FLOP_FORMULA = (
    "forward F = 2*B*T*(L*(4*d^2 + 3*d*d_ff) + d*V) + 4*B*L*T^2*d; forward-backward and train = 3*F; "
    "MFU = FLOPs per step / step time / dense peak of the matmul dtype"
)


def forward_flops(
    size: ModelSize, batch_size: int, context_length: int, vocab_size: int = VOCAB_SIZE
) -> int:
    """Matmul FLOPs of one forward pass (a multiply-add counts 2).

    ``F = 2·B·T·(L·(4·d² + 3·d·d_ff) + d·V) + 4·B·L·T²·d``: the Q/K/V/output projections
    (4·d² weights per layer), the SwiGLU's three d x d_ff matrices, the LM head, and the two
    attention products QKᵀ and PV over the full T x T square (what the math backend computes;
    causal kernels skip about half of it). Norms, RoPE, softmax and the embedding lookup are
    left out. Backward is 2·F, so a training step is 3·F (the usual 6·N·tokens + attention).
    """
    s, b, t = size, batch_size, context_length
    weights = s.num_layers * (4 * s.d_model**2 + 3 * s.d_model * s.d_ff) + s.d_model * vocab_size
    return 2 * b * t * weights + 4 * b * s.num_layers * t * t * s.d_model


def peak_flops(device: torch.device, matmul_dtype: str) -> float | None:
    """Datasheet dense peak for the GPU found (None when unknown, e.g. on the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for gpu, peaks in PEAK_FLOPS.items():
        if gpu in name:
            return peaks[matmul_dtype]
    return None
