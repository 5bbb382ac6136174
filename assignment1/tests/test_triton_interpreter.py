"""The CPU twins of the Triton kernel tests (``test_interp_*`` in the files below) in a child
pytest process with ``TRITON_INTERPRET=1``: Triton reads the variable when it is imported."""

from pathlib import Path

import pytest
from cs336_basics.triton_support import interpreting, run_interpreter_tests

HERE = Path(__file__).parent
FILES = ["test_optimizer.py", "test_nn_utils.py", "test_fused_kernels.py"]


@pytest.mark.skipif(interpreting(), reason="this is the parent of the interpreter run")
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    proc = run_interpreter_tests(*(str(HERE / f) for f in FILES))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(interpreting(), reason="the interpreter never wraps kernels")
def test_launch_wraps_kernels_only_while_traced():
    # eager callers must launch the kernel itself: through wrap_triton's higher-order op an autotuned
    # kernel is re-tuned at every call (0.7 s per FlashAttention call on an H200)
    triton = pytest.importorskip("triton")
    from cs336_basics.triton_support import launch
    from torch.utils._python_dispatch import TorchDispatchMode

    @triton.jit
    def kernel(x):
        pass

    assert launch(kernel) is kernel
    with TorchDispatchMode():  # as when inductor traces a kernel_op body (fake, functional tensors)
        wrapped = launch(kernel)
    assert wrapped is not kernel and wrapped.kernel is kernel
