"""Build script of lmfloss-kernels.

The pure-Python package (reference, functional API, modules, Triton kernels) always installs.
"""

from setuptools import find_packages, setup

setup(
    name="lmfloss-kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for the LMF, Unified Focal and Mixed Focal losses",
    packages=find_packages(include=["lmfloss_kernels", "lmfloss_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
