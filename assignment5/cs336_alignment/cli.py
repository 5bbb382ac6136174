"""`cs336-alignment <command> ...`: thin dispatcher to each module's own ``cli_main(argv)``."""

from __future__ import annotations

import sys

from cs336_basics.cli import dispatch

COMMANDS = {
    "evaluate": ("cs336_alignment.evaluate", "Zero-shot evaluation on MATH / MATH500 / GSM8K / MMLU (+ generation for judges)."),
    "sft": ("cs336_alignment.sft", "Supervised fine-tuning on reasoning traces or prompt/response JSONL."),
    "expert-iteration": ("cs336_alignment.expert_iteration", "Sample, keep correct, SFT, repeat."),
    "grpo": ("cs336_alignment.grpo", "GRPO (and policy-gradient variants) with the rollout engine."),
    "dpo": ("cs336_alignment.dpo", "Direct preference optimization on preference pairs."),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("cs336-alignment", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
