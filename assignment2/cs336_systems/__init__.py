"""cs336_systems: benchmarking/profiling, FlashAttention-2 (PyTorch + Triton), DDP, ZeRO-1, FSDP (CS336 assignment 2)."""

__version__ = "0.1.0"
