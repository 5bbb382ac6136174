"""cs336_basics: byte-level BPE tokenizer, Transformer LM, training loop and generation (CS336 assignment 1)."""

__version__ = "0.1.0"
