from pathlib import Path

import pytest
from cs336_basics.paths import shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (``$CS336_SHARED_DATA`` or ``../shared/data``)."""
    path = shared_data_dir()
    assert path.is_dir(), f"shared data not found at {path}; set CS336_SHARED_DATA"
    return path
