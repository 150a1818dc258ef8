r"""CALF: dataset imbalance statistics and a statistics-driven choice of transformation loss.

Alam et al., "CALF: A Conditionally Adaptive Loss Function to Mitigate Class-Imbalanced
Segmentation", arXiv 2504.04458. **From the paper** (as far as it could be read): the imbalance of
a data set is measured by the skewness and kurtosis of its per-image foreground sizes; the
candidate losses are the Fisher, Logit, Arcsine, Log10 and Natural-Log transformations and
BCE-Dice; and ``S <= -1`` selects the Fisher transformation. **Ours** (``losses.md`` 4.2): the
expression of each transformation loss (BCE with ``ln`` replaced by ``T``), the clips, the Dice
term, the other rows of the rule table, dropping empty masks and the minimum image count.

* :mod:`~lmfloss_kernels.calf.stats` — :func:`foreground_sizes`, :func:`imbalance_statistics`,
  :class:`ForegroundSizeAccumulator`;
* :mod:`~lmfloss_kernels.calf.transforms` — :func:`transform_loss`;
* :mod:`~lmfloss_kernels.calf.selection` — :data:`DEFAULT_RULES`, :func:`select_loss`,
  :class:`CALFLoss`.

Backends, with the package's names (``backend=`` of :func:`transform_loss`, :class:`CALFLoss`,
:func:`foreground_sizes`): ``"cpu"``, the fused C++ kernels of ``csrc/cpu/calf.cpp`` (CPU
tensors; float16 / bfloat16 / float32 / float64 logits); ``"triton"``, the fused Triton kernels
(CUDA; CPU under ``TRITON_INTERPRET=1``; no float64); ``"reference"``, eager PyTorch. ``"auto"``
takes Triton for CUDA tensors and the C++ kernels for CPU tensors when they can serve them, else
the reference (warning once). There is no C++ CUDA kernel for CALF: ``"cuda"`` is rejected.
As for every loss of the package, a NaN or ±inf logit makes the loss of its image NaN.

Two lines::

    criterion = CALFLoss.from_dataset(train_loader)
    print(criterion.selection)
"""

from .selection import DEFAULT_RULES, CALFLoss, Selection, SelectionRule, select_loss
from .stats import (
    MIN_IMAGES,
    FewImagesWarning,
    ForegroundSizeAccumulator,
    ImbalanceStatistics,
    foreground_sizes,
    imbalance_statistics,
)
from .transforms import TRANSFORMS, bce_dice_loss, clip_limit, transform_loss, transform_loss_reference

__all__ = [
    "DEFAULT_RULES",
    "MIN_IMAGES",
    "TRANSFORMS",
    "CALFLoss",
    "FewImagesWarning",
    "ForegroundSizeAccumulator",
    "ImbalanceStatistics",
    "Selection",
    "SelectionRule",
    "bce_dice_loss",
    "clip_limit",
    "foreground_sizes",
    "imbalance_statistics",
    "select_loss",
    "transform_loss",
    "transform_loss_reference",
]
