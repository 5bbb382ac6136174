"""Tokenizer benchmark: our BPE training vs Hugging Face ``tokenizers`` (BpeTrainer), and our
encoding (one process, and the parallel ``cs336-basics tokenize`` CLI) vs tiktoken (one thread).

    uv run python scripts/bench_tokenizer.py            # prints a table, writes JSON
    uv run python scripts/bench_tokenizer.py --skip-train --repeats 5   # encoding only (~1 min)

Input: every file under ``../shared/data/text`` joined with ``<|endoftext|>`` (the files that are
not valid UTF-8 are read as Latin-1 and written as UTF-8), ~26.5 MB; training also on the first
1/4 and 1/2 of it (cut at a newline). Each measurement runs in its own subprocess so peak RSS is
clean; RSS is the peak of the whole process tree (our workers included), sampled every 20 ms.
Wall time is measured inside the subprocess around the call itself (no interpreter start-up,
no file loading); CPU time is user+sys of the process tree (wall time is
inflated when other jobs share the cores; CPU time much less so). Sides alternate; with ``--repeats N`` the
fastest of N runs counts (all runs are kept in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "assignment1"))
from cs336_basics.paths import shared_data_dir

EOT = "<|endoftext|>"
PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# CPU seconds of this process + its reaped children (our pool workers), user + sys.
CPU = """
import resource
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
"""

OURS_TRAIN = (
    CPU
    + """
import sys, time
from cs336_basics.bpe import train_bpe
c, t = cpu(), time.perf_counter()
vocab, merges = train_bpe(sys.argv[1], int(sys.argv[2]), ["<|endoftext|>"], progress=False)
print("RESULT", time.perf_counter() - t, cpu() - c, len(vocab))
"""
)

HF_TRAIN = (
    CPU
    + """
import sys, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
c, t = cpu(), time.perf_counter()
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
trainer = trainers.BpeTrainer(
    vocab_size=int(sys.argv[2]), special_tokens=["<|endoftext|>"], show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
)
tok.train([sys.argv[1]], trainer)
print("RESULT", time.perf_counter() - t, cpu() - c, tok.get_vocab_size())
"""
)

OURS_ENCODE = (
    CPU
    + """
import sys, time
import numpy as np
from cs336_basics.tokenizer import Tokenizer
tok = Tokenizer.from_dir(sys.argv[2])
text = open(sys.argv[1], encoding="utf-8", newline="").read()
c, t = cpu(), time.perf_counter()
ids = tok.encode(text)
dt, dc = time.perf_counter() - t, cpu() - c
np.array(ids, dtype=np.uint16).tofile(sys.argv[3])
print("RESULT", dt, dc, len(ids))
"""
)

TIKTOKEN_ENCODE = (
    CPU
    + """
import json, sys, time
import numpy as np, tiktoken
from cs336_basics.tokenizer import bytes_to_unicode
dec = {c: b for b, c in bytes_to_unicode().items()}
vocab = json.load(open(sys.argv[2] + "/vocab.json", encoding="utf-8"))
ranks = {bytes(dec[c] for c in s): i for s, i in vocab.items() if s != "<|endoftext|>"}
enc = tiktoken.Encoding("gpt2-offline", pat_str=PAT, mergeable_ranks=ranks,
                        special_tokens={"<|endoftext|>": 50256})
text = open(sys.argv[1], encoding="utf-8", newline="").read()
c, t = cpu(), time.perf_counter()
ids = enc.encode(text, allowed_special="all")   # one thread (encode_batch would use more)
dt, dc = time.perf_counter() - t, cpu() - c
np.array(ids, dtype=np.uint16).tofile(sys.argv[3])
print("RESULT", dt, dc, len(ids))
""".replace("PAT", repr(PAT))
)


# The CLI, then the CPU-seconds of its reaped children (the pool workers).
CLI_WRAPPER = """
import resource, sys
from cs336_basics.cli import main
rc = main(sys.argv[1:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print("WORKERS_CPU", r.ru_utime + r.ru_stime)
sys.exit(rc)
"""


def build_corpus(out: Path) -> dict:
    files = sorted(p for p in (shared_data_dir() / "text").rglob("*") if p.is_file())
    parts, latin1 = [], []
    for p in files:
        data = p.read_bytes()
        try:
            parts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            parts.append(data.decode("latin-1"))
            latin1.append(p.name)
    out.write_bytes(EOT.join(parts).encode("utf-8"))
    return {"files": len(files), "latin1_files": latin1, "bytes": out.stat().st_size}


def prefix(src: Path, dst: Path, fraction: float) -> int:
    data = src.read_bytes()
    cut = data.rfind(b"\n", 0, int(len(data) * fraction)) + 1
    dst.write_bytes(data[:cut])
    return cut


def measure(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; peak RSS of its process tree, CPU, in-process time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "assignment1"))
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        rss = 0
        try:
            for p in [ps, *ps.children(recursive=True)]:
                rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
        peak = max(peak, rss)
        time.sleep(0.02)
    out, err = proc.communicate()
    wall_total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{err}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes reaped grandchildren
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    _, seconds, cpu_seconds, value = line.split()
    return {
        "seconds": float(seconds),
        "cpu_seconds": float(cpu_seconds),
        "value": int(value),
        "peak_rss_mb": peak / 2**20,
        "cpu_seconds_with_startup": (after.ru_utime + after.ru_stime)
        - (before.ru_utime + before.ru_stime),
        "wall_with_startup": wall_total,
        "load_avg_1m_before": load,
    }


def best(runs: list[dict]) -> dict:
    """The fastest of repeated runs (the least disturbed by other jobs on the machine)."""
    return dict(min(runs, key=lambda r: r["seconds"]))


def run_cli(corpus: Path, tok_dir: Path, out: Path) -> dict:
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI_WRAPPER,
            "tokenize",
            "--tokenizer",
            str(tok_dir),
            "--input",
            str(corpus),
            "--out",
            str(out),
            "--no-progress",
        ],
        check=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "assignment1")),
        capture_output=True,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    workers_cpu = float(proc.stdout.decode().split("WORKERS_CPU")[1].split()[0])
    return {
        "seconds": meta["seconds"],
        "wall_with_startup": wall,
        "value": meta["num_tokens"],
        "cpu_seconds_with_startup": (after.ru_utime + after.ru_stime)
        - (before.ru_utime + before.ru_stime),
        # the worker processes alone; / number of workers = wall time on that many idle cores
        # if the work is balanced (pool start-up and result transfer not included)
        "workers_cpu_seconds": workers_cpu,
        "load_avg_1m_before": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "bench_tokenizer.json"))
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest counts")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-encode", action="store_true")
    args = parser.parse_args()

    from cs336_basics.tokenizer import Tokenizer

    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "train": [],
        "encode": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        results["corpus"] = build_corpus(corpus)
        size = results["corpus"]["bytes"]
        print(
            f"corpus: {results['corpus']['files']} files, {size / 1e6:.1f} MB "
            f"({len(results['corpus']['latin1_files'])} read as Latin-1)"
        )

        if not args.skip_train:
            for frac in (0.25, 0.5, 1.0):
                path = corpus if frac == 1.0 else tmp / f"corpus_{frac}.txt"
                nbytes = size if frac == 1.0 else prefix(corpus, path, frac)
                runs = {"ours": [], "hf": []}
                for _ in range(args.repeats):  # alternate sides so both see the same load
                    runs["ours"].append(measure(OURS_TRAIN, str(path), str(args.vocab_size)))
                    runs["hf"].append(measure(HF_TRAIN, str(path), str(args.vocab_size)))
                ours, hf = best(runs["ours"]), best(runs["hf"])
                row = {
                    "fraction": frac,
                    "mb": nbytes / 1e6,
                    "ours": ours,
                    "hf": hf,
                    "runs": runs,
                    "time_ratio": ours["seconds"] / hf["seconds"],
                    "cpu_ratio": ours["cpu_seconds"] / hf["cpu_seconds"],
                    "rss_ratio": ours["peak_rss_mb"] / hf["peak_rss_mb"],
                }
                results["train"].append(row)
                print(
                    f"train {frac:>4}: ours {ours['seconds']:.2f}s {ours['peak_rss_mb']:.0f}MB | "
                    f"HF {hf['seconds']:.2f}s {hf['peak_rss_mb']:.0f}MB | "
                    f"time x{row['time_ratio']:.2f} rss x{row['rss_ratio']:.2f}",
                    flush=True,
                )

        if not args.skip_encode:
            gpt2 = shared_data_dir() / "tokenizers" / "gpt2"
            tok_dir = tmp / "gpt2"
            Tokenizer.from_files(gpt2 / "vocab.json", gpt2 / "merges.txt", [EOT]).save(tok_dir)
            runs = {"ours_1proc": [], "tiktoken_1thread": [], "cli_all_cores": []}
            for _ in range(args.repeats):
                runs["tiktoken_1thread"].append(
                    measure(TIKTOKEN_ENCODE, str(corpus), str(tok_dir), str(tmp / "tt.bin"))
                )
                runs["ours_1proc"].append(
                    measure(OURS_ENCODE, str(corpus), str(tok_dir), str(tmp / "ours.bin"))
                )
                runs["cli_all_cores"].append(run_cli(corpus, tok_dir, tmp / "cli.bin"))
            same = (
                (tmp / "ours.bin").read_bytes()
                == (tmp / "tt.bin").read_bytes()
                == (tmp / "cli.bin").read_bytes()
            )
            for name, rs in runs.items():
                r = best(rs)
                r["mb_per_s"] = size / 1e6 / r["seconds"]
                r["runs_seconds"] = [x["seconds"] for x in rs]
                results["encode"][name] = r
            e = results["encode"]
            e["identical_ids"] = same
            e["ours_vs_tiktoken"] = e["ours_1proc"]["mb_per_s"] / e["tiktoken_1thread"]["mb_per_s"]
            e["cli_vs_tiktoken"] = (
                e["cli_all_cores"]["mb_per_s"] / e["tiktoken_1thread"]["mb_per_s"]
            )
            # CPU-seconds: less sensitive than wall time to other jobs on the machine
            e["ours_vs_tiktoken_cpu"] = (
                e["tiktoken_1thread"]["cpu_seconds"] / e["ours_1proc"]["cpu_seconds"]
            )

    print()
    if results["train"]:
        print(
            "| corpus | ours time | HF time | ratio | ours peak RSS | HF peak RSS | ratio "
            "| ours CPU | HF CPU | CPU ratio |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results["train"]:
            o, h = r["ours"], r["hf"]
            print(
                f"| {r['fraction']:g} ({r['mb']:.1f} MB) | {o['seconds']:.2f} s | {h['seconds']:.2f} s | "
                f"{r['time_ratio']:.2f}x | {o['peak_rss_mb']:.0f} MB | {h['peak_rss_mb']:.0f} MB | "
                f"{r['rss_ratio']:.2f}x | {o['cpu_seconds']:.1f} s | {h['cpu_seconds']:.1f} s | {r['cpu_ratio']:.2f}x |"
            )
    if results["encode"]:
        e = results["encode"]
        print("\n| encoder | seconds (runs) | MB/s | vs tiktoken | CPU-s (CLI: workers) | load |")
        print("|---|---|---|---|---|---|")
        for name in ("tiktoken_1thread", "ours_1proc", "cli_all_cores"):
            r = e[name]
            runs_s = ", ".join(f"{x:.2f}" for x in r["runs_seconds"])
            cpu = r.get("cpu_seconds", r.get("workers_cpu_seconds"))
            print(
                f"| {name} | {r['seconds']:.2f} ({runs_s}) | {r['mb_per_s']:.2f} | "
                f"{r['mb_per_s'] / e['tiktoken_1thread']['mb_per_s']:.2f}x | {cpu:.2f} | "
                f"{r['load_avg_1m_before']:.1f} |"
            )
        print(f"one process vs tiktoken by CPU-seconds: {e['ours_vs_tiktoken_cpu']:.2f}x")
        w = e["cli_all_cores"]["workers_cpu_seconds"] / 2
        print(
            f"CLI workers' CPU-seconds / 2 (wall on 2 idle cores if balanced): {w:.2f} s "
            f"= {e['tiktoken_1thread']['cpu_seconds'] / w:.2f}x tiktoken's CPU-seconds"
        )
        print(f"identical ids (ours, CLI, tiktoken): {e['identical_ids']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
