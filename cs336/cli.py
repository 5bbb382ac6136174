"""`cs336 <command> ...`: the root entry point (quickstart, download)."""

from __future__ import annotations

import sys

from cs336_basics.cli import dispatch

COMMANDS = {
    "quickstart": ("cs336.quickstart", "Raw text -> tokenizer -> pretrain -> sample -> SFT -> GRPO -> evaluate, on CPU."),
    "download": ("cs336.download", "Fetch TinyStories, OpenWebText sample, MATH, GSM8K, Qwen2.5-Math-1.5B."),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch("cs336", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
