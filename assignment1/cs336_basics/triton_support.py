"""Where this package's optional Triton kernels run: CUDA tensors, or CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them). Triton is not a hard dependency
(PyTorch's Linux wheels bring it; macOS has none), so the kernel modules are imported lazily."""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
from types import ModuleType

import torch


@functools.cache
def import_kernels(name: str) -> ModuleType | None:
    """``cs336_basics.<name>``, or None where Triton is not installed."""
    try:
        return importlib.import_module(f"cs336_basics.{name}")
    except ImportError:
        return None


def runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can take tensors on ``device``: CUDA, or CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def kernels_for(device: torch.device, name: str) -> ModuleType | None:
    """`import_kernels` for tensors on ``device``; None where they cannot run (Triton is then
    not imported at all, as on CPU-only runs)."""
    return import_kernels(name) if runs_on(device) else None


# ---- tests: Triton reads TRITON_INTERPRET when it is imported, so the CPU twins of the kernel
# tests (named ``test_interp_*``) run in a child pytest process started with the variable set.

INTERPRETER_TEST_PREFIX = "test_interp_"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def deselect_interpreter_tests(config, items: list) -> None:
    """A ``pytest_collection_modifyitems`` hook for a conftest: outside the interpreter child the
    ``test_interp_*`` tests are deselected (not reported as skipped); in the child they run."""
    if interpreting():
        return
    child_only = [item for item in items if item.name.startswith(INTERPRETER_TEST_PREFIX)]
    if child_only:
        config.hook.pytest_deselected(items=child_only)
        items[:] = [item for item in items if not item.name.startswith(INTERPRETER_TEST_PREFIX)]


def run_interpreter_tests(*test_files: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the ``test_interp_*`` tests of ``test_files`` in a child pytest with ``TRITON_INTERPRET=1``;
    the caller asserts on the result (return code 0, something passed, nothing skipped)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *test_files, "-k", "interp_"],
        check=False, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=timeout,
    )
