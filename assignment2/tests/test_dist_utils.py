"""`run_distributed` with ``fork`` after ``torch.compile``: the case that broke ``cd assignment2 && pytest``."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch
    from cs336_systems.dist_utils import run_distributed

    # torch.compile before the process's first backward (as pytest does when a compile test runs
    # before the first test with a backward): without dist_utils's import-time engine start, every
    # forked rank's backward below fails.
    torch.compile(lambda t: t * 2, backend="eager")(torch.randn(3))

    w = torch.ones(3, requires_grad=True)
    (w * 3).sum().backward()  # the parent's own first backward, after the compile


    def job(rank, world_size):
        x = torch.full((3,), float(rank + 1), requires_grad=True)
        (x * x).sum().backward()
        return x.grad.tolist()


    print(run_distributed(job, 2, timeout_s=60))
    """
)


def test_fork_workers_can_backward_after_compile():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]]"
