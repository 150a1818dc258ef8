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
