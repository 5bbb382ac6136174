"""`cs336-basics <command> ...`: thin dispatcher to each module's own ``cli_main(argv)``.

Commands are imported lazily so that ``--help`` stays fast and one command's heavy imports never
slow another. ``dispatch`` is shared by the ``cs336-systems``, ``cs336-alignment`` and ``cs336``
entry points.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train-tokenizer": ("cs336_basics.bpe", "Train a byte-level BPE tokenizer on a text file."),
    "tokenize": ("cs336_basics.tokenize_corpus", "Encode a text file into a flat token-id array."),
    "train": ("cs336_basics.train", "Pretrain a Transformer LM on token-id files."),
    "generate": ("cs336_basics.generate", "Sample text from a checkpoint."),
    "evaluate": ("cs336_basics.evaluate", "Score a checkpoint on a whole token file (loss, perplexity, bits/byte)."),
}


def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    """Run ``<module>.cli_main(rest_of_argv)`` for the command named by ``argv[0]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(f"usage: {prog} <command> [options]   ({prog} <command> --help for its options)\n\ncommands:")
        for name, (_, help_text) in commands.items():
            print(f"  {name:<18} {help_text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    line_buffered_stdout()
    module = importlib.import_module(commands[argv[0]][0])
    return int(module.cli_main(argv[1:]) or 0)


def line_buffered_stdout() -> None:
    """Write stdout a line at a time also into a pipe or file (``| tee run.log``, a batch job's log),
    where Python would otherwise hold a long run's log lines in 8 KB blocks. (A notebook's stdout
    has no ``reconfigure`` and needs none.)"""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)


def main(argv: list[str] | None = None) -> int:
    return dispatch("cs336-basics", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
