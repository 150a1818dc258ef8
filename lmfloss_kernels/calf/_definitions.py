"""The CALF transformations by name, their clip and constant factor: shared by the eager and fused code.

This module depends on nothing else of the package, so the eager definition
(:mod:`~lmfloss_kernels.calf.transforms`), the fused Triton kernels
(:mod:`~lmfloss_kernels.calf._triton`) and the C++ wrappers can all import it without importing
each other.
"""

from __future__ import annotations

import math

__all__ = ["CLIPPED_TRANSFORMS", "TRANSFORMS", "clip_limit"]

TRANSFORMS = ("ln", "log10", "fisher", "logit", "arcsine")
CLIPPED_TRANSFORMS = ("fisher", "logit")


def clip_limit(eps: float) -> float:
    """``L = ln((1 - eps) / eps)``: clipping ``z`` to ``[-L, L]`` clips ``σ(z)`` to ``[eps, 1 - eps]``."""
    return math.log1p(-eps) - math.log(eps)
