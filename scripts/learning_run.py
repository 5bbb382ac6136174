"""The learning-run recipe of docs/benchmarks.md: our 17M model vs transformers' Llama, fixed wall time.

1. ``prepare``: gather the English UTF-8 texts of ``../shared/data/text`` (or any folder), hold out
   the last 5% of every file for validation, train our 10K byte-level BPE on the training part and
   tokenize both parts to ``<out>/{train,val}.bin`` (+ JSON sidecars). CPU only.
2. ``run``: train each side, one after the other, with the same ``cs336-basics train`` command
   differing only in ``--model-impl``/``--optimizer-impl`` (``--sides ours hf``), then plot them and
   print the summary table of docs/benchmarks.md (``<out>/learning_run.{png,json}``).
3. ``plot``: validation loss against wall time of several runs, as PNG and JSON, and the summary
   table; also for runs made apart (on a GPU with a per-command time limit, one side per command:
   ``run --sides ours``, then ``run --sides hf``).

    python scripts/learning_run.py prepare --out .lmdata
    PYTHONPATH=assignment1:assignment2 python3 scripts/learning_run.py run --data .lmdata --minutes 10 --out runs/lr
    python scripts/learning_run.py plot --runs runs/lr/ours runs/lr/hf --labels ours HF --out docs/learning_run

To repeat on TinyStories: tokenize TinyStoriesV2-GPT4-{train,valid}.txt with ``cs336-basics
train-tokenizer`` / ``tokenize`` into ``<dir>/train.bin`` and ``<dir>/val.bin``, then ``run --data <dir>
--minutes 0`` (0: no wall-clock limit, all 10,000 steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SKIP = {"german.txt"}  # not English
EOT = "<|endoftext|>"
SIDES = {  # the only flags in which the two runs differ
    "ours": [],
    "hf": ["--model-impl", "hf-llama", "--optimizer-impl", "torch-fused"],
}


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
    print(f"next: python scripts/learning_run.py run --data {out} --minutes 10 --out runs/learning")


def train_command(side: str, args) -> list[str]:
    """The ``cs336-basics train`` command of one side (as ``python -m``, so PYTHONPATH trees work)."""
    data = Path(args.data)
    return [sys.executable, "-m", "cs336_basics.train", "--preset", args.preset, "--train-data", str(data / "train.bin"),
            "--val-data", str(data / "val.bin"), "--max-minutes", str(args.minutes), "--max-steps", str(args.max_steps),
            "--eval-interval", str(args.eval_interval), "--checkpoint-interval", "0",
            "--out-dir", str(Path(args.out) / side), "--overwrite", *(["--compile"] if args.compile else []),
            *SIDES[side], *args.extra]


def summarize(run_dir: Path, skip: int) -> dict:
    """The numbers of the docs' table, from one run's metrics.jsonl."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r]
    if not val or not train:
        raise SystemExit(f"{run_dir}/metrics.jsonl holds no training steps or evaluations: did the run fail?")
    best = min(val, key=lambda r: r["val_loss"])
    tok_s = [r["tok_s"] for r in train if r["step"] >= skip] or [r["tok_s"] for r in train]
    return {
        "best_val_loss": best["val_loss"], "best_step": best["step"], "best_wall_s": best["wall_s"],
        "final_step": val[-1]["step"], "final_val_loss": val[-1]["val_loss"], "final_wall_s": val[-1]["wall_s"],
        "first_step_wall_s": train[0]["wall_s"],  # start-up: compilation of the eval and training graphs
        "median_tok_s": round(statistics.median(tok_s)),
        "val_loss_by_step": {r["step"]: r["val_loss"] for r in val},
        "curve": {k: [r[k] for r in val] for k in ("wall_s", "step", "tokens", "val_loss")},
    }


def run(args) -> None:
    """Each side in its own process, one after the other, then `plot` (curves and summary)."""
    out = Path(args.out)
    for name in ("train.bin", "val.bin"):
        if not (Path(args.data) / name).is_file():
            raise SystemExit(f"{Path(args.data) / name} not found: run `learning_run.py prepare --out {args.data}` first")
    for side in args.sides:
        cmd = train_command(side, args)
        print("$", " ".join(cmd), flush=True)
        log = out / f"{side}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:  # the full log per side; its last lines are printed
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
        print("\n".join(log.read_text().splitlines()[-3:]), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {side} run failed (exit {proc.returncode}); its log: {log}")
    plot(argparse.Namespace(runs=[str(out / s) for s in args.sides], labels=args.sides, out=str(out / "learning_run"),
                            title=args.title, skip=args.skip))


def same_step_gap(summaries: dict[str, dict]) -> float | None:
    """The largest spread of the runs' validation losses at a step they all evaluated: with the same
    initial weights and batches the curves should agree step for step."""
    by_step = [s["val_loss_by_step"] for s in summaries.values()]
    common = set.intersection(*(set(b) for b in by_step)) if len(by_step) > 1 else set()
    return max((max(b[k] for b in by_step) - min(b[k] for b in by_step) for k in common), default=None)


def plot(args) -> None:
    """Validation loss against wall time of each run (PNG), the curves and each run's `summarize`
    in JSON, and the summary as a Markdown table on stdout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or args.runs
    summaries = {label: summarize(Path(run), args.skip) for run, label in zip(args.runs, labels)}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, s in summaries.items():
        ax.plot([t / 60 for t in s["curve"]["wall_s"]], s["curve"]["val_loss"], "o-", ms=3, label=label)
    ax.set(xlabel="wall time (minutes, incl. compile and eval)", ylabel="validation loss (nats/token)",
           title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=120)
    gap = same_step_gap(summaries)
    out.with_suffix(".json").write_text(json.dumps({"runs": summaries, "max_val_loss_gap_same_step": gap}, indent=1))
    rows = [("best validation loss", lambda s: f"{s['best_val_loss']:.3f} at step {s['best_step']}, {s['best_wall_s']:.1f} s"),
            ("last evaluation", lambda s: f"{s['final_val_loss']:.3f} at step {s['final_step']}, {s['final_wall_s']:.1f} s"),
            ("first step logged at (start-up)", lambda s: f"{s['first_step_wall_s']:.1f} s"),
            (f"median in-loop tokens/s from step {args.skip}", lambda s: f"{s['median_tok_s']:,}")]
    print("| | " + " | ".join(summaries) + " |\n|---|" + "---:|" * len(summaries))
    for name, fmt in rows:
        print(f"| {name} | " + " | ".join(fmt(s) for s in summaries.values()) + " |")
    if gap is not None:
        print(f"largest validation-loss gap at the same step: {gap:.4f}")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--text-dir", default="", help="folder of text files (default ../shared/data/text)")
    p.add_argument("--out", default=".lmdata")
    p.add_argument("--vocab-size", type=int, default=10_000)
    p.add_argument("--holdout", type=float, default=0.05, help="fraction of each file kept for validation")
    r = sub.add_parser("run", help="train both sides one after the other, then plot and summarize")
    r.add_argument("--data", default=".lmdata", help="folder with train.bin / val.bin from `prepare`")
    r.add_argument("--out", default="runs/learning", help="folder: one run folder per side, logs, plot, summary")
    r.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    r.add_argument("--preset", default="tinystories-17m")
    r.add_argument("--minutes", type=float, default=10.0, help="wall-clock limit per side (--max-minutes)")
    r.add_argument("--max-steps", type=int, default=10_000)
    r.add_argument("--eval-interval", type=int, default=200)
    r.add_argument("--skip", type=int, default=200, help="steps left out of the median tokens/s (compilation)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    r.add_argument("--title", default="17M LM, validation loss vs wall time")
    r.add_argument("extra", nargs="*", help="more `cs336-basics train` flags for both sides (after --)")
    q = sub.add_parser("plot")
    q.add_argument("--runs", nargs="+", required=True, help="run folders holding metrics.jsonl")
    q.add_argument("--labels", nargs="*")
    q.add_argument("--out", required=True, help="path without suffix: writes .png and .json")
    q.add_argument("--title", default="17M LM, validation loss vs wall time")
    q.add_argument("--skip", type=int, default=200, help="steps left out of the median tokens/s (compilation)")
    args = ap.parse_args(argv)
    {"prepare": prepare, "run": run, "plot": plot}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
