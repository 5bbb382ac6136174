"""`cs336 download`: fetch the real data sets and model used at full scale.

    uv run cs336 download --list
    uv run cs336 download tinystories gsm8k math          # into data/ (or $CS336_DATA)
    uv run cs336 download qwen2.5-math-1.5b --out /big/disk

What lands where (the layout of ``../shared/data``, so every loader works on either):

| name | files |
|---|---|
| tinystories | ``tinystories/TinyStoriesV2-GPT4-{train,valid}.txt`` (2.1 GB + 22 MB) |
| owt | ``owt/owt_{train,valid}.txt`` (the course's OpenWebText sample, 11 GB + 0.3 GB, gunzipped) |
| gsm8k | ``gsm8k/{train,test}.jsonl`` |
| math | ``math/hendrycks_math_<subject>_{train,test}.json`` (JSON lines) and ``math/math500_test.jsonl`` |
| qwen2.5-math-1.5b | ``models/Qwen2.5-Math-1.5B/`` (a ``transformers`` directory, 3.1 GB) |

Downloads stream to ``<file>.part`` with a progress bar and are renamed when complete, so an
interrupted run never leaves a truncated file behind; existing files are skipped (``--force``
refetches). Hugging Face URLs honour ``$HF_ENDPOINT`` (mirrors) and ``$HF_TOKEN``. Offline, each
item fails with one message naming the host, the reason and what to do instead.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from cs336_basics.paths import data_dir

HF = "https://huggingface.co"
GITHUB_RAW = "https://raw.githubusercontent.com"
MATH_SUBJECTS = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                 "number_theory", "prealgebra", "precalculus"]
QWEN_MATH_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json", "merges.txt"]

# Seam for tests (monkeypatch to simulate being offline); never the network in tests.
_urlopen = urllib.request.urlopen
TIMEOUT_S = 30


class DownloadError(RuntimeError):
    """A download that could not complete; the message says why and what to do."""


@dataclass(frozen=True)
class Item:
    name: str
    what: str
    size: str


ITEMS = {
    "tinystories": Item("tinystories", "TinyStories V2 (GPT-4) train + valid text", "2.2 GB"),
    "owt": Item("owt", "OpenWebText sample of the course, train + valid text", "11.3 GB"),
    "gsm8k": Item("gsm8k", "GSM8K train + test (openai/grade-school-math)", "5 MB"),
    "math": Item("math", "MATH (Hendrycks) train + test, 7 subjects, and MATH500", "20 MB"),
    "qwen2.5-math-1.5b": Item("qwen2.5-math-1.5b", "Qwen/Qwen2.5-Math-1.5B weights + tokenizer", "3.1 GB"),
}


def hf_url(repo: str, path: str, kind: str = "datasets") -> str:
    endpoint = os.environ.get("HF_ENDPOINT", HF).rstrip("/")
    prefix = f"{endpoint}/datasets/{repo}" if kind == "datasets" else f"{endpoint}/{repo}"
    return f"{prefix}/resolve/main/{path}"


def _request(url: str) -> urllib.request.Request:
    headers = {"User-Agent": "cs336-download/0.1"}
    if urlparse(url).hostname and "huggingface" in urlparse(url).hostname and os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    return urllib.request.Request(url, headers=headers)


def fetch(url: str, dest: Path, *, force: bool = False, gunzip: bool = False, progress: bool = True) -> Path:
    """Stream ``url`` into ``dest`` (via ``dest.part``); skip if ``dest`` exists unless ``force``."""
    dest = Path(dest)
    if dest.exists() and not force:
        print(f"  exists, skipped: {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    host = urlparse(url).hostname or url
    try:
        with _urlopen(_request(url), timeout=TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name,
                                              disable=not progress) as bar:
                src = gzip.GzipFile(fileobj=resp) if gunzip else resp
                while chunk := src.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        part.unlink(missing_ok=True)
        hint = " (set HF_TOKEN if the repository is gated)" if e.code in (401, 403) else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"could not reach {host} ({reason}). You seem to be offline or behind a firewall: set "
            f"HTTPS_PROXY (or HF_ENDPOINT for a Hugging Face mirror), or copy the file to {dest} by "
            "hand. Nothing was written. (The quickstart needs no download: `uv run cs336 quickstart`.)"
        ) from e
    part.replace(dest)
    return dest


# ---------------------------------------------------------------------------- MATH conversion
def convert_math_tar(tar_path: Path, out_dir: Path) -> dict[str, int]:
    """Convert Hendrycks' ``MATH.tar`` (``MATH/{train,test}/<subject>/<id>.json``, one problem per
    file) into the JSON-lines layout of ``../shared/data/math``. Returns counts per split."""
    rows: dict[tuple[str, str], list[dict]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            parts = Path(m.name).parts
            if not (m.isfile() and m.name.endswith(".json") and len(parts) >= 4 and parts[-3] in ("train", "test")):
                continue
            split, subject = parts[-3], parts[-2]
            row = json.load(io.TextIOWrapper(tar.extractfile(m), encoding="utf-8"))
            rows.setdefault((subject, split), []).append(
                {k: row[k] for k in ("problem", "level", "type", "solution")})
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    for (subject, split), items in sorted(rows.items()):
        with open(out_dir / f"hendrycks_math_{subject}_{split}.json", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)
        counts[split] += len(items)
    return counts


# ---------------------------------------------------------------------------- items
def download_item(name: str, root: Path, force: bool = False) -> list[Path]:
    if name == "tinystories":
        return [fetch(hf_url("roneneldan/TinyStories", f), root / "tinystories" / f, force=force)
                for f in ("TinyStoriesV2-GPT4-valid.txt", "TinyStoriesV2-GPT4-train.txt")]
    if name == "owt":
        return [fetch(hf_url("stanford-cs336/owt-sample", f"owt_{s}.txt.gz"), root / "owt" / f"owt_{s}.txt",
                      force=force, gunzip=True) for s in ("valid", "train")]
    if name == "gsm8k":
        base = f"{GITHUB_RAW}/openai/grade-school-math/master/grade_school_math/data"
        return [fetch(f"{base}/{s}.jsonl", root / "gsm8k" / f"{s}.jsonl", force=force) for s in ("train", "test")]
    if name == "math":
        math_dir = root / "math"
        out = [fetch(f"{GITHUB_RAW}/openai/prm800k/main/prm800k/math_splits/test.jsonl",
                     math_dir / "math500_test.jsonl", force=force)]
        if force or not (math_dir / "hendrycks_math_algebra_train.json").exists():
            tar = fetch("https://people.eecs.berkeley.edu/~hendrycks/MATH.tar", root / "MATH.tar", force=force)
            print(f"  converted MATH: {convert_math_tar(tar, math_dir)}")
            tar.unlink()
        return out + sorted(math_dir.glob("hendrycks_math_*.json"))
    if name == "qwen2.5-math-1.5b":
        dest = root / "models" / "Qwen2.5-Math-1.5B"
        try:
            from huggingface_hub import snapshot_download
        except ImportError:  # plain urllib, file by file
            return [fetch(hf_url("Qwen/Qwen2.5-Math-1.5B", f, kind="model"), dest / f, force=force)
                    for f in QWEN_MATH_FILES]
        try:
            snapshot_download("Qwen/Qwen2.5-Math-1.5B", local_dir=dest, force_download=force)
        except Exception as e:  # huggingface_hub raises many types offline
            raise DownloadError(f"could not download Qwen/Qwen2.5-Math-1.5B ({type(e).__name__}: {e}). "
                                "Offline? Set HF_ENDPOINT for a mirror or copy the model directory to "
                                f"{dest} by hand.") from e
        return [dest]
    raise DownloadError(f"unknown item {name!r}; choose from {', '.join(ITEMS)} or all")


def cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cs336 download", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", help=f"what to fetch: {', '.join(ITEMS)}, or all")
    p.add_argument("--out", type=Path, default=None, help="destination root (default: data/ or $CS336_DATA)")
    p.add_argument("--force", action="store_true", help="download again even if the files exist")
    p.add_argument("--list", action="store_true", help="list what can be downloaded and exit")
    args = p.parse_args(argv)
    if args.list or not args.items:
        print("available (uv run cs336 download NAME ...):")
        for it in ITEMS.values():
            print(f"  {it.name:<20} {it.size:>8}  {it.what}")
        return 0
    names = list(ITEMS) if "all" in args.items else args.items
    unknown = [n for n in names if n not in ITEMS]
    if unknown:
        print(f"error: unknown item(s) {', '.join(unknown)}; choose from {', '.join(ITEMS)} or all",
              file=sys.stderr)
        return 2
    root = args.out or data_dir()
    failed = []
    for name in names:
        print(f"[{name}] {ITEMS[name].what} ({ITEMS[name].size}) -> {root}")
        try:
            for path in download_item(name, root, force=args.force):
                print(f"  ok: {path}")
        except DownloadError as e:
            print(f"error [{name}]: {e}", file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"\n{len(failed)} of {len(names)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())

