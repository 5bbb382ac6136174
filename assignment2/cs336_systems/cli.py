"""`cs336-systems <command> ...`: thin dispatcher to each module's own ``cli_main(argv)``."""

from __future__ import annotations

import sys

from cs336_basics.cli import dispatch

COMMANDS = {
    "benchmark": ("cs336_systems.benchmark", "Time/profile the cs336_basics LM at the course's sizes."),
    "attention-bench": ("cs336_systems.attention_bench", "Naive vs compiled vs SDPA vs FlashAttention."),
    "mixed-precision": ("cs336_systems.mixed_precision", "The accumulation experiment and autocast dtypes."),
    "flash-bench": ("cs336_systems.flash_bench", "FlashAttention leaderboard harness and sweep."),
    "allreduce-bench": ("cs336_systems.collectives", "All-reduce time and bandwidth over sizes/world sizes."),
    "ddp-bench": ("cs336_systems.parallel_bench", "Step time per DDP variant / ZeRO-1 / FSDP."),
    "train": ("cs336_systems.parallel", "Train the LM data-parallel (--parallel MODE; under torchrun)."),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("cs336-systems", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
