"""The learning-run recipe of docs/benchmarks.md: our 17M model vs transformers' Llama, fixed wall time.

1. ``prepare``: gather the English UTF-8 texts of ``../shared/data/text`` (or any folder), hold out
   the last 5% of every file for validation, train our 10K byte-level BPE on the training part and
   tokenize both parts to ``<out>/{train,val}.bin`` (+ JSON sidecars). CPU only.
2. train each side with the same command, differing only in ``--model-impl``/``--optimizer-impl``
   (the commands are printed by ``prepare``).
3. ``plot``: validation loss against wall time of several runs, as PNG and JSON.

    python scripts/learning_run.py prepare --out .lmdata
    python scripts/learning_run.py plot --runs runs/ours runs/hf --labels ours HF --out docs/learning_run

To repeat on TinyStories: point ``prepare`` at a folder holding TinyStoriesV2-GPT4-{train,valid}.txt
(or tokenize them with ``cs336-basics train-tokenizer`` / ``tokenize``) and drop ``--max-minutes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SKIP = {"german.txt"}  # not English
EOT = "<|endoftext|>"


def english_texts(root: Path) -> list[Path]:
    """Every ``*.txt``/``*.en`` file under ``root`` that is valid UTF-8 (Latin-1 files are skipped)."""
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".txt", ".en") and p.name not in SKIP:
            try:
                p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                print(f"skipping {p} (not UTF-8)", file=sys.stderr)
                continue
            files.append(p)
    return files


def prepare(args) -> None:
    from cs336_basics.bpe import train_bpe
    from cs336_basics.paths import shared_data_dir
    from cs336_basics.tokenize_corpus import tokenize_file
    from cs336_basics.tokenizer import Tokenizer

    root = Path(args.text_dir) if args.text_dir else shared_data_dir() / "text"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_parts, val_parts = [], []
    for p in english_texts(root):
        lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = int(len(lines) * (1 - args.holdout))
        train_parts.append("".join(lines[:cut]))
        val_parts.append("".join(lines[cut:]))
    (out / "train.txt").write_text(EOT.join(train_parts), encoding="utf-8")
    (out / "val.txt").write_text(EOT.join(val_parts), encoding="utf-8")
    print(f"{len(train_parts)} files: train {sum(map(len, train_parts)):,} chars, val {sum(map(len, val_parts)):,} chars")
    vocab, merges = train_bpe(out / "train.txt", args.vocab_size, [EOT])
    Tokenizer(vocab, merges, [EOT]).save(out / "tokenizer")
    for split in ("train", "val"):
        info = tokenize_file(out / "tokenizer", out / f"{split}.txt", out / f"{split}.bin")
        print(split, info)
    common = (f"cs336-basics train --preset tinystories-17m --train-data {out}/train.bin --val-data {out}/val.bin "
              f"--vocab-size {args.vocab_size} --compile --max-minutes MINUTES --eval-interval 100")
    print("ours:", common, "--out-dir runs/ours")
    print("HF:  ", common, "--model-impl hf-llama --optimizer-impl torch-fused --out-dir runs/hf")


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for run, label in zip(args.runs, args.labels or args.runs):
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        curves[label] = {
            "wall_s": [r["wall_s"] for r in rows if "val_loss" in r],
            "step": [r["step"] for r in rows if "val_loss" in r],
            "tokens": [r["tokens"] for r in rows if "val_loss" in r],
            "val_loss": [r["val_loss"] for r in rows if "val_loss" in r],
        }
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, c in curves.items():
        ax.plot([t / 60 for t in c["wall_s"]], c["val_loss"], "o-", ms=3, label=label)
    ax.set(xlabel="wall time (minutes, incl. compile and eval)", ylabel="validation loss (nats/token)",
           title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--text-dir", default="", help="folder of text files (default ../shared/data/text)")
    p.add_argument("--out", default=".lmdata")
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--holdout", type=float, default=0.05, help="fraction of each file kept for validation")
    q = sub.add_parser("plot")
    q.add_argument("--runs", nargs="+", required=True, help="run folders holding metrics.jsonl")
    q.add_argument("--labels", nargs="*")
    q.add_argument("--out", required=True, help="path without suffix: writes .png and .json")
    q.add_argument("--title", default="17M LM, validation loss vs wall time (H100)")
    args = ap.parse_args(argv)
    prepare(args) if args.cmd == "prepare" else plot(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
