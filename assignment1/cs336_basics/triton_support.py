"""Where this package's optional Triton kernels run: CUDA tensors, or CPU tensors under the Triton
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them). Triton is not a hard dependency
(PyTorch's Linux wheels bring it; macOS has none), so the kernel modules are imported lazily."""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


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


def traceable_kernels(name: str) -> ModuleType | None:
    """`import_kernels` for code that ``torch.compile`` traces: plain import statements, which dynamo
    follows (the importlib call behind `import_kernels` breaks the graph). For the kernel modules that
    run under compile; None for others or where Triton is not installed."""
    try:
        if name == "fused_rope":
            from cs336_basics import fused_rope

            return fused_rope
        if name == "fused_swiglu":
            from cs336_basics import fused_swiglu

            return fused_swiglu
        if name == "fused_cross_entropy":
            from cs336_basics import fused_cross_entropy

            return fused_cross_entropy
    except ImportError:
        pass
    return None


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


# ---- operators whose implementation is Triton kernels


def kernel_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: ``fn`` (tensors in, tensors out, kernels launched through `launch`) as the
    operator ``name`` ("namespace::op"), so that ``torch.compile`` keeps the graph whole.

    With real Triton it is a ``torch.library.triton_op``: inductor traces into ``fn`` and launches
    the kernels from its generated code (no Python dispatch or Triton launcher per call, which in a
    compiled training step left the GPU waiting for the host) and sees its PyTorch ops. Under the
    interpreter (``TRITON_INTERPRET=1``, the CPU tests) a kernel is a Python function that
    ``torch.library.wrap_triton`` cannot trace, so it is an opaque ``torch.library.custom_op`` whose
    output shapes/strides come from ``fake`` (which must describe what ``fn`` returns).
    Returns the op; ``register_autograd`` works on both kinds.
    """

    def define(fn: Callable[..., Any]):
        if interpreting():
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fake)
            return op
        return torch.library.triton_op(name, mutates_args=())(fn)

    return define


def launch(kernel):
    """``kernel`` (a ``@triton.jit`` function or ``triton.autotune`` wrapper) ready to be indexed by a
    grid and called, in code that a `kernel_op` body runs.

    While the body is being traced (inductor runs it under a dispatch mode: fake and functional
    tensors) it is wrapped with ``torch.library.wrap_triton`` so the launch is recorded. Otherwise
    (eager code calling the body directly, the interpreter) it is the kernel itself: called on real
    tensors, a wrapped kernel still goes through the higher-order op, which costs host time per launch
    and builds a new autotuner each call, so an autotuned kernel was re-tuned at every launch
    (~0.7 s per FlashAttention call on an H200, found by scripts/bench_attention_short.py)."""
    if interpreting() or _get_current_dispatch_mode() is None:
        return kernel
    return torch.library.wrap_triton(kernel)
