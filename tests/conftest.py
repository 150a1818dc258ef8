"""Shared test setup.

Triton kernels run on the CPU through the Triton interpreter unless a CUDA device is present;
TRITON_INTERPRET must be set before anything imports triton, hence here, at collection start.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Modules that hold a ``slow`` test run first, the others after them in their usual order.

    The test command distributes whole modules over worker processes (pytest-xdist,
    ``--dist loadfile`` in collection order): starting the long ones (the wheel builds take
    minutes) first keeps them from being the tail of the run while the other worker idles.
    """
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow)
