"""The CALF transformations by name, their clip and constant factor: shared by the eager and fused code.

This module depends on nothing else of the package, so the eager definition
(:mod:`~lmfloss_kernels.calf.transforms`), the fused Triton kernels
(:mod:`~lmfloss_kernels.calf._triton`) and the C++ wrappers can all import it without importing
each other.
"""

from __future__ import annotations

import math

__all__ = ["CLIPPED_TRANSFORMS", "TRANSFORMS", "TRANSFORM_SCALE", "clip_limit"]

TRANSFORMS = ("ln", "log10", "fisher", "logit", "arcsine")
CLIPPED_TRANSFORMS = ("fisher", "logit")

# ℓ_T = TRANSFORM_SCALE[T] * (the per-voxel term the fused kernels sum): log10 is BCE / ln 10, and
# fisher is -½ (softplus(z̃ + ln 2) for y = 1, softplus(-z̃ + ln 2) for y = 0), see calf/_voxel_math.py.
TRANSFORM_SCALE = {"ln": 1.0, "log10": 1.0 / math.log(10.0), "fisher": -0.5, "logit": 1.0, "arcsine": 1.0}


def clip_limit(eps: float) -> float:
    """``L = ln((1 - eps) / eps)``: clipping ``z`` to ``[-L, L]`` clips ``σ(z)`` to ``[eps, 1 - eps]``."""
    return math.log1p(-eps) - math.log(eps)
