"""Loading of the compiled extension ``lmfloss_kernels._C`` and the check of its build metadata.

The library registers its kernels with the dispatcher (``torch.ops.lmfloss_ext.*``) when it is
imported. Before importing it, the metadata written by ``setup.py`` next to it
(``_build_info.json``) is compared with the running torch: a library built against another
torch major.minor or another CUDA major version, or with CPU kernels for an x86-64 level (AVX2,
AVX-512) that the running CPU lacks, is not loaded (it could fail to link, die of SIGILL or, worse,
misbehave). Any failure gives one warning saying how to fix it, and leaves a reason that the
backends report through ``unavailable_reason``; the other backends keep working.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings

import torch

from .. import _backends

FIX = "rebuild it with `pip install --no-build-isolation -e .` in the source tree (see setup.py for the options)"


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _cuda_major(version: str | None) -> str | None:
    return None if version is None else version.split(".")[0]


# CPU features each x86-64 micro-architecture level of the CPU kernels' -march needs.
_LEVEL_FLAGS = {"x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}}
_LEVEL_FLAGS["x86-64-v4"] = _LEVEL_FLAGS["x86-64-v3"] | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpu_flags() -> set[str] | None:
    """The running CPU's feature flags (Linux), or None when they cannot be read."""
    try:
        with open("/proc/cpuinfo") as handle:
            return set(next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), []))
    except OSError:
        return None


def _mismatch(info: dict, cpu_flags: set[str] | None = None) -> str | None:
    """Why a library with this build metadata cannot be used with the running torch and CPU, or None."""
    # A library built for a newer x86-64 level would die of SIGILL in its first kernel.
    needed = _LEVEL_FLAGS.get(info.get("cpu_arch") or "")
    flags = _cpu_flags() if needed and cpu_flags is None else cpu_flags
    if needed and flags is not None and not needed <= flags:
        missing = ", ".join(sorted(needed - flags))
        return (
            f"its CPU kernels were built for {info['cpu_arch']}, but this CPU lacks {missing} "
            f"(rebuild with LMFLOSS_CPU_ARCH=x86-64)"
        )
    built = info.get("torch", "?")
    if _major_minor(built) != _major_minor(torch.__version__):
        return f"it was built against torch {built}, but torch {torch.__version__} is running"
    if info.get("with_cuda") and _cuda_major(info.get("torch_cuda")) != _cuda_major(torch.version.cuda):
        return (
            f"its CUDA kernels were built for CUDA {info.get('torch_cuda')}, but this torch uses CUDA "
            f"{torch.version.cuda}"
        )
    return None


def load() -> tuple[dict | None, str | None]:
    """(build metadata, None) once the library is loaded, or (None, reason) after one warning."""
    spec = importlib.util.find_spec("lmfloss_kernels._C")
    if spec is None or spec.origin is None:
        reason = "the C++ extension lmfloss_kernels._C is not built"
        return None, _warn(reason)
    info_path = os.path.join(os.path.dirname(spec.origin), "_build_info.json")
    try:
        with open(info_path) as handle:
            info = json.load(handle)
    except (OSError, ValueError) as error:
        return None, _warn(f"its build metadata {info_path} cannot be read ({error})")
    mismatch = _mismatch(info)
    if mismatch is not None:
        return None, _warn(mismatch)
    try:
        importlib.import_module("lmfloss_kernels._C")
    except (ImportError, OSError) as error:
        return None, _warn(f"lmfloss_kernels._C failed to load ({type(error).__name__}: {error})")
    return info, None


def _warn(reason: str) -> str:
    # The package loads the extension when it is imported, so this warning is shown once, at the
    # user's `import lmfloss_kernels`; "auto" does not repeat it when it falls back.
    warnings.warn(
        f"lmfloss_kernels: the C++/CUDA extension is unavailable: {reason}; the 'cpu' and 'cuda' backends are "
        f"off, the others keep working. To fix: {FIX}.",
        RuntimeWarning,
        stacklevel=_backends._user_stacklevel(),
    )
    _backends.announce(reason)
    return reason
