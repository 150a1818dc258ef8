"""Where the tests find the build tools of this machine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cuda_home() -> str | None:
    """The CUDA toolkit directory, as scripts/setup_env.sh derives it, or ``None`` without one.

    ``CUDA_HOME`` if set; otherwise the toolkit of the ``nvcc`` on PATH, which may be a wrapper
    script that execs the real one (its ``exec .../bin/nvcc`` line names the toolkit).
    """
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
