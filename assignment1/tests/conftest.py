from pathlib import Path

import pytest
import torch
from cs336_basics.paths import shared_data_dir
from cs336_basics.triton_support import deselect_interpreter_tests


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``$CS336_SHARED_DATA`` or ``../shared/data``)."""
    path = shared_data_dir()
    assert path.is_dir(), f"shared data not found at {path}; set CS336_SHARED_DATA"
    return path


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and never fights other processes for cores.
    Used by the model/training test modules (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """test_interp_* (Triton kernels on CPU) run in a TRITON_INTERPRET=1 child process."""
    deselect_interpreter_tests(config, items)
