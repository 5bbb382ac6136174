"""Where data lives.

Two places matter:
- the *shared* test/benchmark data (real public data kept beside the checkout, never copied into
  the repo): ``$CS336_SHARED_DATA`` if set, else ``<repo>/../shared/data``;
- the *downloads* folder for real users: ``$CS336_DATA`` if set, else ``<repo>/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """Folder of the shared real data (GSM8K, MMLU, GPT-2 tokenizer files, English texts...)."""
    env = os.environ.get("CS336_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def shared_models_dir() -> Path:
    """Folder of the shared model files (the SmolLM2-135M-Instruct GGUF)."""
    env = os.environ.get("CS336_SHARED_MODELS")
    return Path(env) if env else shared_data_dir().parent / "models"


def data_dir() -> Path:
    """Folder where downloads and generated corpora land (git-ignored contents)."""
    env = os.environ.get("CS336_DATA")
    return Path(env) if env else REPO_ROOT / "data"
