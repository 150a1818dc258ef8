"""lmfloss-kernels: fused class-imbalance losses for medical imaging (LMF, Unified Focal, Mixed Focal).

Functional API in :mod:`lmfloss_kernels.functional`, ``nn.Module`` criteria at the top level,
eager definitions in :mod:`lmfloss_kernels.reference`. See the README for the backends.
"""

from . import _backends, calf, functional, reference
from ._backends import available_backends
from ._config import get_options, options, set_options
from ._distributed import ddp_scale
from .functional import BackendMismatchError, drw_weights, ldam_margins
from .modules import (
    AsymmetricFocalLoss,
    DiceCELoss,
    DiceFocalLoss,
    DiceLoss,
    FocalLoss,
    FocalTverskyLoss,
    LDAMLoss,
    LMFLoss,
    MixedFocalLoss,
    SigmoidFocalLoss,
    SymmetricFocalLoss,
    TverskyLoss,
    UnifiedFocalLoss,
)

__version__ = "0.1.0"

# Load the C++ extension now, so that a missing or stale build is reported once, at import, with
# the fix (a failure is remembered and reported by the backends, never raised).
_backends.preload("cpu")

__all__ = [
    "AsymmetricFocalLoss",
    "BackendMismatchError",
    "DiceCELoss",
    "DiceFocalLoss",
    "DiceLoss",
    "FocalLoss",
    "FocalTverskyLoss",
    "LDAMLoss",
    "LMFLoss",
    "MixedFocalLoss",
    "SigmoidFocalLoss",
    "SymmetricFocalLoss",
    "TverskyLoss",
    "UnifiedFocalLoss",
    "available_backends",
    "calf",
    "ddp_scale",
    "drw_weights",
    "functional",
    "get_options",
    "ldam_margins",
    "options",
    "reference",
    "set_options",
]
