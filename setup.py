"""Build script of lmfloss-kernels.

The pure-Python package (reference, functional API, modules, Triton kernels) always installs.
The C++/CUDA extension ``lmfloss_kernels._C`` (``csrc/``) is built with
``torch.utils.cpp_extension`` and ninja; install with ``pip install --no-build-isolation -e .``
so that it compiles against the torch already installed.

* CPU kernels: always (OpenMP through ``at::parallel_for``).
* CUDA kernels: when ``FORCE_CUDA=1``, or ``TORCH_CUDA_ARCH_LIST`` is set, or a GPU and a CUDA
  toolkit (``CUDA_HOME``) are visible; ``FORCE_ONLY_CPU=1`` skips them. Without a visible GPU the
  architectures default to ``8.0;8.6;8.9;9.0+PTX``.
* CPU code generation: ``-march=x86-64-v3`` (AVX2, FMA: twice the vector width for the tile loops)
  when the build machine's CPU has AVX2 and FMA, else the compiler's default; set
  ``LMFLOSS_CPU_ARCH`` (e.g. ``x86-64`` for a library that must also run on older CPUs, or
  ``native``) to choose.
* ``MAX_JOBS`` defaults to what the cores and the available memory allow (about 2 GiB per nvcc job).
* ``LMFLOSS_LOCAL_VERSION`` (e.g. ``cu130torch2.14``, set by ``scripts/build_wheel.sh``) appends a
  PEP 440 local version label: ``0.1.0+cu130torch2.14``; ``LMFLOSS_SOURCE_REVISION`` (the git
  revision the script found) is recorded in the build metadata.
* Build metadata (torch and CUDA versions, architectures, host and CUDA compilers, with_cuda) is
  written to ``lmfloss_kernels/_build_info.json`` next to the library; the package compares it
  with the running torch at import. The distribution requires the torch major.minor it was built
  against (``torch==2.14.*``): the library links against that torch's C++ ABI.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
VERSION = "0.1.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _version() -> str:
    """VERSION, plus the local label of LMFLOSS_LOCAL_VERSION (the CUDA and torch a wheel was built for)."""
    local = os.environ.get("LMFLOSS_LOCAL_VERSION", "").strip()
    if not local:
        return VERSION
    if not re.fullmatch(r"[a-z0-9]+(\.[a-z0-9]+)*", local):
        raise ValueError(
            f"LMFLOSS_LOCAL_VERSION must be a PEP 440 local label (lower-case letters and digits separated by dots), "
            f"got {local!r}"
        )
    return f"{VERSION}+{local}"


def _available_memory_gib() -> float | None:
    """MemAvailable of /proc/meminfo (what other processes leave free), else the physical memory."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _default_max_jobs() -> str:
    cores = os.cpu_count() or 1
    memory_gib = _available_memory_gib()
    if memory_gib is None:
        memory_gib = 2.0 * cores
    return str(max(1, min(cores, int(memory_gib // 2))))


def _cpu_arch() -> str | None:
    """The -march of the CPU kernels: LMFLOSS_CPU_ARCH, or x86-64-v3 where this CPU has AVX2 and FMA."""
    if os.environ.get("LMFLOSS_CPU_ARCH"):
        return os.environ["LMFLOSS_CPU_ARCH"]
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return None
    return "x86-64-v3" if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= set(flags) else None


def _extension_and_command():
    import torch
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    if _flag("FORCE_ONLY_CPU"):
        with_cuda = False
    else:
        with_cuda = _flag("FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        with_cuda = with_cuda or (torch.cuda.is_available() and cuda_home is not None)
    if with_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA / TORCH_CUDA_ARCH_LIST asked for CUDA kernels, but this torch has no CUDA")
    if with_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())

    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", "csrc/prepared.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # No -std: torch.utils.cpp_extension adds the standard its headers need (C++20 for torch >= 2.12).
    # -fno-math-errno / -fno-trapping-math (no errno, no FP traps: nothing here reads them) let GCC
    # if-convert and vectorise the tile loops; no -ffast-math: NaN and the summation order stay exact.
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    cpu_arch = _cpu_arch()
    if cpu_arch:
        cxx.append(f"-march={cpu_arch}")
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("WITH_CUDA", None))
        # No --use_fast_math: approximate exp/log/division would cost accuracy the tests cannot see
        # here (no GPU), for memory-bound kernels that gain little from it.
        extra["nvcc"] = ["-O3", "-lineinfo"]
        ext_type = cpp_extension.CUDAExtension
    else:
        ext_type = cpp_extension.CppExtension
    extension = ext_type(
        "lmfloss_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    info = {
        "version": _version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_home": cuda_home if with_cuda else None,
        "cuda_arch_list": _cuda_arch_list(torch) if with_cuda else None,
        "compiler": _compiler_version(os.environ.get("CXX", "c++")),
        "cuda_compiler": _compiler_version(os.path.join(cuda_home, "bin", "nvcc"), nvcc=True)
        if with_cuda and cuda_home
        else None,
        "cpu_arch": cpu_arch,
        "python": sys.version.split()[0],
        "source": os.environ.get("LMFLOSS_SOURCE_REVISION"),
    }

    class BuildExtension(cpp_extension.BuildExtension):
        """Builds with ninja, then writes the build metadata next to the library."""

        def run(self):
            super().run()
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("lmfloss_kernels._C")), "_build_info.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                json.dump(info, handle, indent=2)

    return extension, BuildExtension.with_options(use_ninja=True)


def _cuda_arch_list(torch) -> str:
    """The architectures the CUDA code is built for: TORCH_CUDA_ARCH_LIST, else those of the visible GPUs
    (what torch.utils.cpp_extension then targets)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))


def _torch_requirement() -> str:
    """The library links against the torch it was built with: same major.minor at run time."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def _compiler_version(compiler: str, nvcc: bool = False) -> str:
    """The first line of ``compiler --version``; for nvcc, whose first lines are a banner, its release line."""
    try:
        lines = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next((line for line in lines if "release" in line), lines[-1]) if nvcc else lines[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return compiler


extension, build_ext = _extension_and_command()

setup(
    name="lmfloss-kernels",
    version=_version(),
    description="Fused Triton and C++/CUDA kernels for the LMF, Unified Focal and Mixed Focal losses",
    packages=find_packages(include=["lmfloss_kernels", "lmfloss_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[_torch_requirement(), "tqdm"],  # tqdm: the progress bar of calf.ForegroundSizeAccumulator
    ext_modules=[extension],
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
