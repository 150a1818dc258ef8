"""CI must not pass by skipping: under ``CI=true`` everything the suite needs has to be present.

Many tests skip, with the reason, where a part is missing (the C++ extension, a CUDA toolkit for
the build gate, Triton). On a developer's machine that is a convenience; in CI it would turn a
broken build into a green run, so there these checks fail instead.
"""

from __future__ import annotations

import os

import pytest
import torch
from toolchain import cuda_home

import lmfloss_kernels
from lmfloss_kernels import ext

pytestmark = pytest.mark.skipif(os.environ.get("CI") != "true", reason="checks CI's environment (CI=true) only")


def test_the_cpp_extension_is_loaded_with_cpu_kernels():
    assert ext.LOAD_ERROR is None, ext.LOAD_ERROR
    assert "cpu" in ext.KERNEL_DEVICES
    assert "cpu" in lmfloss_kernels.available_backends("cpu")


def test_the_cuda_build_gate_can_run():
    assert torch.version.cuda is not None, (
        "CI needs the CUDA build of torch (torch==2.14.1) for the CUDA build gate (tests/test_wheel.py)"
    )
    assert cuda_home() is not None, "CI needs nvcc (a CUDA toolkit) for the CUDA build gate (tests/test_wheel.py)"


def test_triton_runs_here():
    expected = "a CUDA device" if torch.cuda.is_available() else "the interpreter (TRITON_INTERPRET=1)"
    assert "triton" in lmfloss_kernels.available_backends("cuda" if torch.cuda.is_available() else "cpu"), expected
