r"""Shared plumbing of the MONAI and nnU-Net compatible criteria (:mod:`.monai`, :mod:`.nnunet`).

Both front ends express their losses through the region family of
:func:`lmfloss_kernels.reference.region_loss` with ``reduction="mean"``, ``clip=False``:

.. math::

    M = w_F\,\mathrm{mean}_b F_b + w_{FT}\,\mathrm{mean}_b \frac{1}{C}\sum_c (1 - TI_{bc})^{e_c},\qquad
    TI = \frac{TP + s_{nr}}{TP + \delta FN + (1 - \delta) FP + s_{dr}}

A soft Dice ``1 - (2 TP + s) / (G + P + s)`` is ``1 - TI`` with ``delta = 1/2`` and both
smoothing terms halved (``G + P = 2 TP + FN + FP``). A class left out of the region term gets
``e_c = 0``: ``(1 - TI)^0 = 1`` adds the constant ``1/C`` and no gradient, so the mean over the
``K`` kept classes is ``(C/K) R - (C - K)/K`` (:func:`kept_class_scaling`).

The same holds in the family's sigmoid mode (``p = sigmoid(z)`` per channel, TP, FN, FP per
channel), whose focal term is two-sided with ``(positive, negative)`` per-class constants:
binary cross-entropy for ``a = 1, gamma = 0``, MONAI's sigmoid focal loss for 0/1 targets.
"""

from __future__ import annotations

import warnings

import torch

from . import functional
from ._backends import _user_stacklevel
from ._validation import check_ignore_index, check_target
from .functional import _kept_class_scaling as kept_class_scaling  # noqa: F401 (for monai.py, nnunet.py)
from .modules import _check_backend as check_backend  # noqa: F401 (re-exported for monai.py, nnunet.py)

# Smallest eps the region family accepts; unused with clip=False (log q is taken in log space).
_UNUSED_EPS = 1e-7

_warned: set[tuple[str, str]] = set()


def warn_once(owner: str, reason: str, fallback: str) -> None:
    """One warning per (criterion, reason) and process: a delegated option is reported, not repeated."""
    key = (owner, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"{owner}: {reason} is not supported by the fused kernels; computed by {fallback} instead (not fused)",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


def region_mean(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    focal_weight,
    focal_gamma,
    exponent,
    delta: float,
    focal_coef: float,
    tversky_coef: float,
    smooth_nr: float,
    smooth_dr: float,
    batch: bool,
    ignore_index: int | None,
    backend: str,
    dist_sync: bool = False,
    sigmoid: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """``M`` above (no clip) on the chosen backend, one fused pass each way; ``reduction="none"``
    gives the per-image ``L_b``, ``"sum"`` their sum.

    Softmax mode: ``focal_weight`` a per-class sequence or a tensor already in the logits' vector
    dtype on their device; ``focal_gamma`` and ``exponent`` per-class sequences. ``sigmoid=True``
    (independent channels, :func:`lmfloss_kernels.reference.region_loss`): ``focal_weight`` and
    ``focal_gamma`` are ``(positive side, negative side)`` pairs of per-class sequences.
    """
    ignore_index = check_ignore_index(ignore_index, optional=True)
    target = check_target(logits, target, ignore_index=ignore_index)
    extra = {}
    if dist_sync:
        from ._distributed import make_sync

        extra["sync"] = make_sync(True, None)
    if sigmoid:
        extra["sigmoid"] = True
        focal_weight = functional._sides(*focal_weight, logits)
        focal_gamma = functional._sides(*focal_gamma, logits)
    else:
        if not isinstance(focal_weight, torch.Tensor):
            focal_weight = functional._per_class(focal_weight, logits)
        focal_gamma = functional._per_class(focal_gamma, logits)
    return functional._run(
        "region_loss",
        backend,
        logits,
        target,
        focal_weight,
        focal_gamma,
        functional._per_class(exponent, logits),
        delta=delta,
        focal_coef=focal_coef,
        tversky_coef=tversky_coef,
        smooth_nr=smooth_nr,
        smooth_dr=smooth_dr,
        eps=_UNUSED_EPS,
        clip=False,
        batch=batch,
        ignore_index=ignore_index,
        reduction=reduction,
        **extra,
    )


def label_map(target: torch.Tensor) -> torch.Tensor:
    """An integer label map from MONAI's / nnU-Net's ``(B, 1, *S)`` targets, float ones included.

    Float labels are truncated as ``Tensor.long()`` does (what both libraries apply) into int32,
    which the kernels read natively and which keeps negative ignore labels (-1, -100).
    """
    if target.is_floating_point():
        return target.to(torch.int32)
    return target


def host_values(name: str, value, *, non_negative: bool = True) -> tuple[tuple[float, ...], bool] | None:
    """A per-class constant read to the host once, at construction (a GPU tensor would otherwise
    cost a device sync per call): ``(values, given as a scalar)``, or ``None`` for ``None``."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        values, scalar = tuple(value.detach().double().cpu().reshape(-1).tolist()), value.dim() == 0
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values, scalar = (float(value),), True
    else:
        values, scalar = tuple(float(v) for v in value), False
    if non_negative and any(v < 0 for v in values):
        raise ValueError(f"{name} must be non-negative, got {list(values)}")
    return values, scalar


def per_class_values(name: str, host: tuple[tuple[float, ...], bool], length: int) -> tuple[float, ...]:
    """:func:`host_values` for ``length`` classes (a scalar is repeated); a wrong length raises."""
    values, scalar = host
    if scalar:
        return values * length
    if len(values) != length:
        raise ValueError(f"{name} must have one entry per class ({length}), got {len(values)}")
    return values


def uniform_value(name: str, host: tuple[tuple[float, ...], bool], length: int) -> float | None:
    """The common value of a class weight, ``None`` when its entries differ."""
    values = per_class_values(name, host, length)
    return values[0] if all(v == values[0] for v in values) else None
