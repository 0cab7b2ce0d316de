import os
import sys

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# CI (CI=true) replays the same examples on every run; local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true") else "default")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: also runs on RAL_TEST_DEVICE (python bench.py --what gpu: cuda)")


@pytest.fixture
def device():
    """Where the tests marked `device` run: RAL_TEST_DEVICE, else the CPU."""
    return os.environ.get("RAL_TEST_DEVICE", "cpu")
