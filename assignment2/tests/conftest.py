from pathlib import Path

import pytest
from cs336_basics.paths import shared_data_dir
from cs336_basics.triton_support import deselect_interpreter_tests


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``$CS336_SHARED_DATA`` or ``../shared/data``)."""
    path = shared_data_dir()
    assert path.is_dir(), f"shared data not found at {path}; set CS336_SHARED_DATA"
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ``test_interp_*`` Triton tests run in a ``TRITON_INTERPRET=1`` child pytest process
    (started by ``test_triton_kernels_in_interpreter``); in the parent they are deselected."""
    deselect_interpreter_tests(config, items)
