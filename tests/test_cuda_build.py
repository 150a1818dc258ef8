"""CUDA build gate: the extension's CUDA kernels compile and the library loads, without a GPU.

Builds ``lmfloss_kernels._C`` with ``FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=8.0`` into a
temporary directory (the editable install stays CPU-only) and loads the result in a fresh
interpreter, checking that CUDA kernels were registered for every op. So a CUDA compile or link
error fails CI on a machine without a GPU. Needs nvcc and a CUDA build of torch; skipped, with
the reason, where either is missing. One architecture, the oldest the package supports (code that
needs a newer one fails there; the sources have no per-architecture branches, and the GPU check
compiles for the device itself): each architecture is a full device compile, some 7 minutes on a
loaded 2-core machine. Deselect locally with ``-m "not slow"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCH = "8.0"
OPS = ("row_loss_forward", "row_loss_backward", "region_loss_forward", "region_loss_backward")


def _cuda_home() -> str | None:
    """The toolkit directory; a `nvcc` on PATH may be a wrapper script that execs the real one."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with open(nvcc, "rb") as handle:
        head = handle.read(4096)
    for line in head.decode(errors="ignore").splitlines():
        if line.startswith("exec ") and "/bin/nvcc" in line:
            return line.split()[1].rsplit("/bin/nvcc", 1)[0]
    return str(Path(os.path.realpath(nvcc)).parents[1])


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is a CPU build: CUDA kernels cannot be compiled")
@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit (nvcc) found")
def test_cuda_extension_compiles_and_loads(tmp_path):
    env = dict(
        os.environ,
        CUDA_HOME=_cuda_home(),
        FORCE_CUDA="1",
        TORCH_CUDA_ARCH_LIST=ARCH,
        MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
    )
    env.pop("FORCE_ONLY_CPU", None)
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
         str(tmp_path / "temp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert build.returncode == 0, f"CUDA build failed:\n{build.stdout[-6000:]}\n{build.stderr[-6000:]}"
    package = tmp_path / "lib" / "lmfloss_kernels"
    (library,) = package.glob("_C*.so")
    info = json.loads((package / "_build_info.json").read_text())
    assert info["with_cuda"] is True and info["cuda_arch_list"] == ARCH
    # A fresh interpreter that has not loaded the editable (CPU-only) library.
    check = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(library)!r})\n"
        "has = torch._C._dispatch_has_kernel_for_dispatch_key\n"
        f"missing = [op for op in {OPS!r} for key in ('CPU', 'CUDA') if not has('lmfloss_ext::' + op, key)]\n"
        "sys.exit(f'no kernel for {missing}' if missing else 0)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, f"the CUDA library does not load:\n{loaded.stdout}\n{loaded.stderr}"
