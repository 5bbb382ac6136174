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
