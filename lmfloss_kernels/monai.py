r"""MONAI-compatible criteria: ``from lmfloss_kernels.monai import DiceCELoss`` in a MONAI script.

``DiceLoss``, ``DiceCELoss``, ``DiceFocalLoss``, ``TverskyLoss`` and ``FocalLoss`` take MONAI
1.6's constructor arguments with MONAI's defaults and return MONAI's values, gradients and
output shapes; they add one keyword, ``backend`` (as everywhere in this package). Inputs are as
MONAI takes them: logits ``(B, C, *S)`` and a target ``(B, 1, *S)`` label map (integer or float,
with ``to_onehot_y=True``) or a ``(B, C, *S)`` one-hot / soft map.

Fused (through the region family, softmax or sigmoid mode; see :mod:`._compat` for the
mapping), one pass forward and one backward unless noted:

* ``DiceLoss`` / ``DiceCELoss`` / ``TverskyLoss`` with ``softmax=True`` or ``sigmoid=True``,
  ``other_act=None``, ``squared_pred=False``, ``jaccard=False``, ``reduction`` ``"mean"`` or
  ``"sum"``, a class ``weight`` that is ``None`` or the same for every class; any
  ``include_background``, ``to_onehot_y``, ``batch``, ``smooth_nr``, ``smooth_dr``,
  ``lambda_dice`` / ``lambda_ce``; ``ignore_index`` on label maps; ``TverskyLoss`` with
  ``alpha + beta = 1`` (``delta = beta``). A single channel needs ``sigmoid=True`` (MONAI then
  ignores ``to_onehot_y`` and ``include_background``). ``DiceCELoss`` needs
  ``label_smoothing=0`` for ``C > 1``; with ``sigmoid=True`` MONAI 1.6 adds
  ``BCEWithLogitsLoss(pos_weight=weight)`` for one channel (one pass) and the softmax
  cross-entropy for ``C > 1`` (two passes: the sigmoid Dice, then the softmax cross-entropy).
* ``DiceFocalLoss``: MONAI 1.6's focal term is always the sigmoid focal loss of the logits;
  ``sigmoid=True`` is one pass, ``softmax=True`` two (softmax Dice, sigmoid focal).
* ``FocalLoss`` with ``use_softmax=True`` and ``include_background=True``, or
  ``use_softmax=False`` (sigmoid) with any ``include_background``; ``reduction`` ``"mean"`` or
  ``"sum"``, ``gamma``, scalar or per-class ``alpha``, per-class ``weight``, ``ignore_index`` on
  label maps.

The sigmoid focal term (``FocalLoss(use_softmax=False)``, ``DiceFocalLoss``) equals the kernels'
two-sided focal term for 0/1 targets only: a float target that is not 0/1 is delegated unless
``gamma = 0`` and ``alpha=None`` (:func:`_soft_focal_reason`). That check reads the target's values,
so it follows the package's rule for value checks (as the label-range checks do): always on CPU
tensors, on GPU tensors only with the ``check_labels`` option (it costs a device-to-host sync per
call) and never while ``torch.compile`` traces; where it does not run, a float target is taken to
be 0/1, and a soft one gets the kernels' two-sided term.

``reduction="none"`` is fused for ``DiceLoss`` / ``TverskyLoss`` with one kept class (MONAI's
per-(image, class) values are then the region family's per-image ones); with several classes,
and for ``DiceFocalLoss`` / ``FocalLoss`` (per-element values), it is delegated: the region
family sums over classes per image.

Every other combination is computed by MONAI's own class (when MONAI is installed), with a
one-time warning naming the option; without MONAI it raises ``ImportError``.
``GeneralizedDiceLoss`` is not provided: its class weights ``1 / G_c^2`` enter a ratio of sums
over classes, which the per-class Tversky terms of the region family cannot express.

Differences: the fused paths compute in float32 (float64 for float64 logits) and return a
float32 loss for half-precision logits, where MONAI computes in the input's dtype. Soft targets
must lie in ``[0, 1]`` (checked on CPU tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import functional
from ._compat import (
    check_backend,
    host_values,
    kept_class_scaling,
    label_map,
    per_class_values,
    region_mean,
    uniform_value,
    warn_once,
)
from ._validation import _can_inspect, check_bool, check_number

__all__ = ["DiceCELoss", "DiceFocalLoss", "DiceLoss", "FocalLoss", "TverskyLoss"]

_REDUCTIONS = ("none", "mean", "sum")


def _monai_losses():
    try:
        import monai.losses
    except ImportError as error:
        raise ImportError(
            "this combination of options is computed by MONAI's own loss, but MONAI is not installed "
            "(pip install monai), or choose options the fused kernels support (see lmfloss_kernels.monai)"
        ) from error
    return monai.losses


class _MonaiCompatible(nn.Module):
    """Keeps the MONAI constructor arguments, decides per call between the fused path and MONAI's class."""

    _monai_name: str

    def __init__(self, monai_kwargs: dict, backend: str) -> None:
        super().__init__()
        self._monai_kwargs = monai_kwargs
        self.backend = check_backend(backend)
        self._delegate_module: list[nn.Module] = []  # not a submodule: state_dict stays MONAI's

    def _delegate(self, reason: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        owner = f"lmfloss_kernels.monai.{type(self).__name__}"
        module_class = getattr(_monai_losses(), self._monai_name)
        warn_once(owner, reason, f"monai.losses.{self._monai_name}")
        if not self._delegate_module:
            self._delegate_module.append(module_class(**self._monai_kwargs))
        return self._delegate_module[0].to(logits.device)(logits, target)

    def _sigmoid_focal(
        self, logits, target, *, coef: float, sides: tuple, gamma: float, ignore_index, reduction: str = "mean"
    ) -> torch.Tensor:
        """``coef`` times the region family's sigmoid focal term (its own pass), ``sides`` the
        ``(positive, negative)`` per-class weights."""
        num_classes = logits.shape[1]
        gammas = [gamma] * num_classes
        return region_mean(
            logits,
            target,
            focal_weight=sides,
            focal_gamma=(gammas, gammas),
            exponent=[1.0] * num_classes,
            delta=0.5,
            focal_coef=coef,
            tversky_coef=0.0,
            smooth_nr=0.0,
            smooth_dr=0.0,
            batch=False,
            ignore_index=ignore_index,
            backend=self.backend,
            sigmoid=True,
            reduction=reduction,
        )

    def _prepare(
        self, logits: torch.Tensor, target: torch.Tensor, to_onehot_y: bool, ignore_index, *, sigmoid: bool = False
    ) -> tuple:
        """``(target for the region family, is_label_map, reason to delegate or None)``.

        ``sigmoid``: the criterion's probabilities are per-channel sigmoids; a single-channel input
        is then a binary problem with a ``(B, 1, *S)`` 0/1 (or soft) target, where MONAI ignores
        ``to_onehot_y`` and ``include_background``.
        """
        if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(
                f"input and target must be torch.Tensors, got {type(logits).__name__} and {type(target).__name__}"
            )
        if logits.dim() < 3:
            raise ValueError(f"input must have shape (B, C, *spatial), got {tuple(logits.shape)}")
        if target.dim() != logits.dim():
            raise ValueError(
                f"input {tuple(logits.shape)} and target {tuple(target.shape)} must have the same number of "
                f"dimensions; pass a label map as (B, 1, *spatial)"
            )
        single = logits.shape[1] == 1
        if single and not sigmoid:
            return None, False, "a single-channel input without sigmoid (MONAI skips softmax there)"
        if to_onehot_y and not single:
            if target.shape[1] != 1:
                raise ValueError(
                    f"to_onehot_y=True needs a label map of shape (B, 1, *spatial), got target {tuple(target.shape)}"
                )
            return label_map(target), True, None
        if target.shape != logits.shape:
            raise ValueError(
                f"target {tuple(target.shape)} must have the input's shape {tuple(logits.shape)} "
                f"(one-hot) when to_onehot_y=False"
            )
        if ignore_index is not None:
            return None, False, "ignore_index with a one-hot target" if not single else "ignore_index with one channel"
        return (target if target.is_floating_point() else target.to(logits.dtype)), False, None


def _check_activation(sigmoid, softmax, other_act) -> None:
    if other_act is not None and not callable(other_act):
        raise TypeError(f"other_act must be None or callable, got {type(other_act).__name__}")
    if int(bool(sigmoid)) + int(bool(softmax)) + int(other_act is not None) > 1:
        raise ValueError(
            f"at most one of sigmoid=True, softmax=True, other_act may be set, got sigmoid={sigmoid}, "
            f"softmax={softmax}, other_act={other_act!r}"
        )


def _check_reduction(reduction, allowed=_REDUCTIONS) -> str:
    reduction = getattr(reduction, "value", reduction)  # MONAI's LossReduction enum
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}")
    return reduction


def _activation_reason(sigmoid, softmax, other_act) -> str | None:
    if other_act is not None:
        return "other_act"
    if not softmax and not sigmoid:
        return "softmax=False and sigmoid=False (the loss of raw input values)"
    return None


def _kept(num_classes: int, include_background: bool) -> int:
    """Classes in MONAI's Dice / focal terms (a single channel is kept: MONAI ignores the option there)."""
    return num_classes if include_background or num_classes == 1 else num_classes - 1


def _soft_focal_reason(target: torch.Tensor, gamma: float, alpha) -> str | None:
    """Reason to delegate MONAI's sigmoid focal term, or ``None`` when the kernels' term equals it.

    MONAI weighs a target ``y`` by ``exp(gamma * logsigmoid(-z (2y - 1)))`` and ``alpha`` by
    ``alpha y + (1 - alpha)(1 - y)`` (or ``alpha_c`` where ``y == 1``); for ``y`` in ``{0, 1}``
    that is the two-sided focal term of the kernels, for soft ``y`` it is not (except with
    ``gamma = 0`` and no ``alpha``, plain binary cross-entropy). Float targets are therefore
    checked to be 0/1 where the package checks values (:func:`_validation._can_inspect`: CPU tensors,
    GPU tensors with the ``check_labels`` option, nothing under ``torch.compile``); elsewhere they
    are taken to be 0/1, with no device-to-host sync.
    """
    if not target.is_floating_point() or (gamma == 0.0 and alpha is None) or not _can_inspect(target):
        return None
    if bool(((target == 0) | (target == 1)).all()):
        return None
    return "a soft (non 0/1) float target with the sigmoid focal term (MONAI's formula differs there)"


def _sigmoid_focal_sides(alpha, weight, kept: int, num_classes: int) -> tuple[list[float], list[float]]:
    """``(positive, negative)`` per-class weights of MONAI's sigmoid focal term over ``num_classes``
    channels, the first ``num_classes - kept`` (the background) weighted 0.

    Scalar ``alpha``: ``alpha`` on the positive side, ``1 - alpha`` on the negative; per-class
    ``alpha``: ``alpha_c`` on the positive side only; ``weight`` multiplies both sides.
    """
    positive, negative = [1.0] * kept, [1.0] * kept
    if alpha is not None:
        values, scalar = alpha
        if scalar:
            positive, negative = [values[0]] * kept, [1.0 - values[0]] * kept
        else:
            positive = list(per_class_values("alpha", alpha, kept))
    if weight is not None:
        factor = per_class_values("weight", weight, kept)
        positive = [a * w for a, w in zip(positive, factor, strict=True)]
        negative = [a * w for a, w in zip(negative, factor, strict=True)]
    dropped = [0.0] * (num_classes - kept)
    return dropped + positive, dropped + negative


class _RegionLoss(_MonaiCompatible):
    """The Dice / Tversky part shared by ``DiceLoss``, ``DiceCELoss`` and ``TverskyLoss``."""

    # reduction="none" returns MONAI's per-(image, class) values, which the region family gives (as
    # its per-image output) when one class is kept; a criterion with per-element terms cannot.
    _per_image_none = True

    def _region_reason(self, num_classes: int) -> str | None:
        kw = self._monai_kwargs
        reason = _activation_reason(kw["sigmoid"], kw["softmax"], kw["other_act"])
        if reason is None and kw.get("squared_pred"):
            reason = "squared_pred=True"
        if reason is None and kw.get("jaccard"):
            reason = "jaccard=True"
        if reason is None and kw["reduction"] == "none":
            if not self._per_image_none:
                reason = 'reduction="none" (per-element values)'
            elif _kept(num_classes, kw["include_background"]) != 1:
                reason = 'reduction="none" with several classes (per-class values)'
        return reason

    def _region_term(
        self,
        logits,
        target,
        *,
        sigmoid: bool,
        delta,
        smooth_nr,
        smooth_dr,
        scale,
        ignore_index,
        focal: tuple | None = None,
    ) -> torch.Tensor:
        """``scale`` times MONAI's reduced Dice / Tversky term plus, in the same pass, the focal
        term ``focal = (coef, weight, gamma)`` (``weight`` / ``gamma`` as :func:`region_mean` takes
        them in the chosen mode)."""
        kw = self._monai_kwargs
        batch_size, num_classes = logits.shape[:2]
        kept = _kept(num_classes, kw["include_background"])
        factor = scale
        if kw["reduction"] == "sum":
            factor *= kept * (1 if kw["batch"] else batch_size)
        tversky_coef, constant = kept_class_scaling(num_classes, kept, factor)
        exponent = [0.0] * (num_classes - kept) + [1.0] * kept
        if focal is None:
            zeros = [0.0] * num_classes
            focal = (0.0, (zeros, zeros) if sigmoid else zeros, (zeros, zeros) if sigmoid else zeros)
        focal_coef, focal_weight, focal_gamma = focal
        per_image = kw["reduction"] == "none"
        loss = region_mean(
            logits,
            target,
            focal_weight=focal_weight,
            focal_gamma=focal_gamma,
            exponent=exponent,
            delta=delta,
            focal_coef=focal_coef,
            tversky_coef=tversky_coef,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=kw["batch"],
            ignore_index=ignore_index,
            backend=self.backend,
            sigmoid=sigmoid,
            reduction="none" if per_image else "mean",
        )
        loss = loss + constant
        return self._per_class_shape(loss, logits) if per_image else loss

    def _per_class_shape(self, per_image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """MONAI's ``reduction="none"`` shape for the one kept class: ``(B, 1)`` (``(1,)`` with
        ``batch``, where every image carries the shared term), then DiceLoss's broadcast view."""
        values = per_image[:1] if self._monai_kwargs["batch"] else per_image.unsqueeze(1)
        if self._monai_name == "TverskyLoss":
            return values
        return values.reshape(*values.shape[:2], *[1] * (logits.dim() - 2))

    def _softmax_ce(self, logits, target, *, coef: float) -> torch.Tensor:
        """``coef`` times the per-image mean over voxels of the softmax cross-entropy (its own pass)."""
        num_classes = logits.shape[1]
        return region_mean(
            logits,
            target,
            focal_weight=[1.0] * num_classes,
            focal_gamma=[0.0] * num_classes,
            exponent=[1.0] * num_classes,
            delta=0.5,
            focal_coef=coef,
            tversky_coef=0.0,
            smooth_nr=0.0,
            smooth_dr=0.0,
            batch=False,
            ignore_index=None,
            backend=self.backend,
        )


class DiceLoss(_RegionLoss):
    r"""MONAI's ``DiceLoss``: ``1 - (2 TP + smooth_nr) / (G + P + smooth_dr)`` per image and class,
    reduced over ``(B, C)`` (over ``C`` with ``batch=True``). Fused for ``softmax=True`` or ``sigmoid=True`` (see the
    module docstring); ``weight`` must be uniform to fuse."""

    _monai_name = "DiceLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        kwargs["smooth_nr"] = check_number("smooth_nr", smooth_nr, low=0.0)
        kwargs["smooth_dr"] = check_number("smooth_dr", smooth_dr, low=0.0)
        for name in ("include_background", "to_onehot_y", "batch", "soft_label"):
            check_bool(name, kwargs[name])
        super().__init__(kwargs, backend)
        self.register_buffer("class_weight", None if weight is None else torch.as_tensor(weight))
        self._weight_values = host_values("weight", weight)

    def _weight(self, num_classes: int) -> float | None:
        kept = _kept(num_classes, self._monai_kwargs["include_background"])
        if self._weight_values is None or kept == 1:  # MONAI applies no weight to a single class
            return 1.0
        return uniform_value("weight", self._weight_values, kept)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 (MONAI's name)
        kw = self._monai_kwargs
        target_map, is_label_map, reason = self._prepare(
            input, target, kw["to_onehot_y"], kw["ignore_index"], sigmoid=kw["sigmoid"]
        )
        reason = reason or self._region_reason(input.shape[1])
        if reason is None and kw["soft_label"] and not is_label_map:
            reason = "soft_label=True with a soft target"
        weight = self._weight(input.shape[1]) if reason is None else 1.0
        if weight is None:
            reason = "a per-class weight"
        if reason is not None:
            return self._delegate(reason, input, target)
        return self._region_term(
            input,
            target_map,
            sigmoid=kw["sigmoid"],
            delta=0.5,
            smooth_nr=kw["smooth_nr"] / 2,
            smooth_dr=kw["smooth_dr"] / 2,
            scale=weight,
            ignore_index=kw["ignore_index"],
        )


class TverskyLoss(_RegionLoss):
    r"""MONAI's ``TverskyLoss``: ``1 - (TP + smooth_nr) / (TP + alpha FP + beta FN + smooth_dr)``,
    reduced over ``(B, C)``. Fused for ``softmax=True`` or ``sigmoid=True`` and ``alpha + beta = 1``."""

    _monai_name = "TverskyLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        kwargs["alpha"] = check_number("alpha", alpha, low=0.0)
        kwargs["beta"] = check_number("beta", beta, low=0.0)
        kwargs["smooth_nr"] = check_number("smooth_nr", smooth_nr, low=0.0)
        kwargs["smooth_dr"] = check_number("smooth_dr", smooth_dr, low=0.0)
        for name in ("include_background", "to_onehot_y", "batch", "soft_label"):
            check_bool(name, kwargs[name])
        super().__init__(kwargs, backend)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        kw = self._monai_kwargs
        target_map, is_label_map, reason = self._prepare(
            input, target, kw["to_onehot_y"], kw["ignore_index"], sigmoid=kw["sigmoid"]
        )
        reason = reason or self._region_reason(input.shape[1])
        if reason is None and abs(kw["alpha"] + kw["beta"] - 1.0) > 1e-12:
            reason = "alpha + beta != 1"
        if reason is None and kw["soft_label"] and not is_label_map:
            reason = "soft_label=True with a soft target"
        if reason is not None:
            return self._delegate(reason, input, target)
        return self._region_term(
            input,
            target_map,
            sigmoid=kw["sigmoid"],
            delta=kw["beta"],
            smooth_nr=kw["smooth_nr"],
            smooth_dr=kw["smooth_dr"],
            scale=1.0,
            ignore_index=kw["ignore_index"],
        )


class DiceCELoss(_RegionLoss):
    r"""MONAI's ``DiceCELoss``: ``lambda_dice * DiceLoss + lambda_ce * CrossEntropyLoss``, both terms
    from one fused pass (cross-entropy = the focal term with ``gamma = 0``) for ``softmax=True``;
    ``sigmoid=True``: see the module docstring (MONAI 1.6 mixes the two activations for ``C > 1``).

    The cross-entropy uses every channel (``include_background`` concerns the Dice term only); a
    ``(B, 1, *S)`` target is read as class indices, a ``(B, C, *S)`` one as class probabilities,
    as in MONAI. ``weight`` must be uniform to fuse (it then scales the Dice term, and the
    cross-entropy for probability targets or ``"sum"``, as torch's weighted cross-entropy does)."""

    _monai_name = "DiceCELoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        label_smoothing: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction, ("mean", "sum"))
        kwargs["lambda_dice"] = check_number("lambda_dice", lambda_dice, low=0.0)
        kwargs["lambda_ce"] = check_number("lambda_ce", lambda_ce, low=0.0)
        kwargs["label_smoothing"] = check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
        kwargs["smooth_nr"] = check_number("smooth_nr", smooth_nr, low=0.0)
        kwargs["smooth_dr"] = check_number("smooth_dr", smooth_dr, low=0.0)
        for name in ("include_background", "to_onehot_y", "batch"):
            check_bool(name, kwargs[name])
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be None or a torch.Tensor (as MONAI's), got {type(weight).__name__}")
        super().__init__(kwargs, backend)
        self._weight_values = host_values("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        kw = self._monai_kwargs
        sigmoid = kw["sigmoid"]
        target_map, is_label_map, reason = self._prepare(input, target, kw["to_onehot_y"], None, sigmoid=sigmoid)
        reason = reason or self._region_reason(input.shape[1])
        batch_size, num_classes = input.shape[:2]
        if num_classes == 1 and reason is None:
            return self._dice_bce(input, target, target_map)
        if reason is None and kw["label_smoothing"] != 0.0:
            reason = "label_smoothing != 0"
        weight = 1.0
        if reason is None and self._weight_values is not None:
            weight = uniform_value("weight", self._weight_values, num_classes)
            if weight is None:
                reason = "a per-class weight"
        if reason is not None:
            return self._delegate(reason, input, target)
        dice_weight = 1.0 if _kept(num_classes, kw["include_background"]) == 1 else weight
        # torch's weighted cross-entropy: for class indices "mean" divides by the sum of the
        # voxels' weights (a uniform weight cancels), for probabilities by the voxel count.
        ce_scale = weight if (kw["reduction"] == "sum" or not is_label_map) else 1.0
        if kw["reduction"] == "sum":
            ce_scale *= input[0, 0].numel() * batch_size
        ce_coef = kw["lambda_ce"] * ce_scale
        dice = {
            "delta": 0.5,
            "smooth_nr": kw["smooth_nr"] / 2,
            "smooth_dr": kw["smooth_dr"] / 2,
            "scale": kw["lambda_dice"] * dice_weight,
            "ignore_index": None,
        }
        if not sigmoid:
            zeros, ones = [0.0] * num_classes, [1.0] * num_classes
            return self._region_term(input, target_map, sigmoid=False, focal=(ce_coef, ones, zeros), **dice)
        # MONAI 1.6 pairs the sigmoid Dice with the softmax cross-entropy when C > 1: two modes,
        # so two fused passes (the sigmoid Dice, then the softmax cross-entropy).
        loss = self._region_term(input, target_map, sigmoid=True, **dice)
        return loss if ce_coef == 0.0 else loss + self._softmax_ce(input, target_map, coef=ce_coef)

    def _dice_bce(self, logits, target, target_map) -> torch.Tensor:
        """One channel with ``sigmoid=True``: MONAI's Dice plus ``BCEWithLogitsLoss(pos_weight=weight)``,
        one fused pass (binary cross-entropy = the two-sided focal term with ``gamma = 0``)."""
        kw = self._monai_kwargs
        pos_weight = 1.0
        if self._weight_values is not None:
            values, _ = self._weight_values
            if len(values) != 1:
                return self._delegate("a weight of several entries with a single-channel input", logits, target)
            pos_weight = values[0]
        coef = kw["lambda_ce"] * (logits[0, 0].numel() * logits.shape[0] if kw["reduction"] == "sum" else 1.0)
        return self._region_term(
            logits,
            target_map,
            sigmoid=True,
            delta=0.5,
            smooth_nr=kw["smooth_nr"] / 2,
            smooth_dr=kw["smooth_dr"] / 2,
            scale=kw["lambda_dice"],
            ignore_index=None,
            focal=(coef, ([pos_weight], [1.0]), ([0.0], [0.0])),
        )


class DiceFocalLoss(_RegionLoss):
    r"""MONAI's ``DiceFocalLoss``: ``lambda_dice * DiceLoss + lambda_focal * FocalLoss``.

    In MONAI 1.6 the focal term is always the sigmoid focal loss of the raw logits
    (``FocalLoss(use_softmax=False)``), whatever activation the Dice term uses, and both terms
    share ``include_background``, ``weight`` and ``reduction``. Fused: ``sigmoid=True`` in one
    pass (Dice and focal terms both sigmoid); ``softmax=True`` in two (the softmax Dice, then the
    sigmoid focal term). ``weight`` must be uniform; float targets must be 0/1 unless
    ``gamma = 0`` and ``alpha=None`` (see :class:`FocalLoss`)."""

    _monai_name = "DiceFocalLoss"
    _per_image_none = False

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        gamma: float = 2.0,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        lambda_dice: float = 1.0,
        lambda_focal: float = 1.0,
        alpha: float | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        _check_activation(sigmoid, softmax, other_act)
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        kwargs["lambda_dice"] = check_number("lambda_dice", lambda_dice, low=0.0)
        kwargs["lambda_focal"] = check_number("lambda_focal", lambda_focal, low=0.0)
        kwargs["gamma"] = check_number("gamma", gamma, low=0.0)
        kwargs["smooth_nr"] = check_number("smooth_nr", smooth_nr, low=0.0)
        kwargs["smooth_dr"] = check_number("smooth_dr", smooth_dr, low=0.0)
        for name in ("include_background", "to_onehot_y", "batch"):
            check_bool(name, kwargs[name])
        super().__init__(kwargs, backend)
        self._alpha_values = host_values("alpha", alpha, non_negative=False)
        self._weight_values = host_values("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        kw = self._monai_kwargs
        sigmoid = kw["sigmoid"]
        target_map, is_label_map, reason = self._prepare(input, target, kw["to_onehot_y"], None, sigmoid=sigmoid)
        reason = reason or self._region_reason(input.shape[1])
        if reason is None and not is_label_map:
            reason = _soft_focal_reason(target_map, kw["gamma"], self._alpha_values)
        batch_size, num_classes = input.shape[:2]
        kept = _kept(num_classes, kw["include_background"])
        weight = 1.0
        if reason is None and self._weight_values is not None:
            weight = uniform_value("weight", self._weight_values, kept)
            if weight is None:
                reason = "a per-class weight"
        if reason is not None:
            return self._delegate(reason, input, target)
        sides = _sigmoid_focal_sides(self._alpha_values, self._weight_values, kept, num_classes)
        focal_coef = kw["lambda_focal"] * (1.0 / kept if kw["reduction"] == "mean" else float(batch_size))
        dice = {
            "delta": 0.5,
            "smooth_nr": kw["smooth_nr"] / 2,
            "smooth_dr": kw["smooth_dr"] / 2,
            "scale": kw["lambda_dice"] * (1.0 if kept == 1 else weight),  # MONAI weighs no single class
            "ignore_index": None,
        }
        if sigmoid:
            gamma = [kw["gamma"]] * num_classes
            return self._region_term(input, target_map, sigmoid=True, focal=(focal_coef, sides, (gamma, gamma)), **dice)
        loss = self._region_term(input, target_map, sigmoid=False, **dice)
        if focal_coef == 0.0:
            return loss
        return loss + self._sigmoid_focal(
            input, target_map, coef=focal_coef, sides=sides, gamma=kw["gamma"], ignore_index=None
        )


class FocalLoss(_MonaiCompatible):
    r"""MONAI's ``FocalLoss``: softmax ``-alpha_c w_c (1 - p_c)^gamma y_c log p_c`` per element, or
    (``use_softmax=False``, the default) sigmoid, per channel,
    ``w_c [a^+_c y (1 - p)^gamma (-log p) + a^-_c (1 - y) p^gamma (-log(1 - p))]`` for 0/1 ``y``.

    ``"mean"`` divides by ``B K S`` over the ``K`` kept channels (with ``ignore_index``: by the
    valid voxels of the batch, channels not counted), ``"sum"`` sums the per-image, per-class
    spatial means, as MONAI does. Softmax: a scalar ``alpha`` weighs the background
    ``1 - alpha`` and the other classes ``alpha``; fused with ``include_background=True`` only
    (MONAI's softmax then runs over the foreground channels). Sigmoid: a scalar ``alpha`` gives
    ``a^+ = alpha, a^- = 1 - alpha``, a per-class one ``a^+_c = alpha_c, a^- = 1``; any
    ``include_background`` (channels are independent)."""

    _monai_name = "FocalLoss"

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        weight: Sequence[float] | float | int | torch.Tensor | None = None,
        reduction: str = "mean",
        use_softmax: bool = False,
        ignore_index: int | None = None,
        *,
        backend: str = "auto",
    ) -> None:
        kwargs = dict(locals())
        for key in ("self", "__class__", "backend"):
            kwargs.pop(key)
        kwargs["reduction"] = _check_reduction(reduction)
        kwargs["gamma"] = check_number("gamma", gamma, low=0.0)
        for name in ("include_background", "to_onehot_y", "use_softmax"):
            check_bool(name, kwargs[name])
        super().__init__(kwargs, backend)
        self.register_buffer("class_weight", None if weight is None else torch.as_tensor(weight))
        self._alpha_values = host_values("alpha", alpha, non_negative=False)
        self._weight_values = host_values("weight", weight)

    def _sigmoid_focal_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kw = self._monai_kwargs
        batch_size, num_classes = logits.shape[:2]
        kept = _kept(num_classes, kw["include_background"])
        sides = _sigmoid_focal_sides(self._alpha_values, self._weight_values, kept, num_classes)
        ignore_index = kw["ignore_index"]
        focal = {"sides": sides, "gamma": kw["gamma"], "ignore_index": ignore_index}
        if kw["reduction"] == "sum":  # sum over (image, class) of the spatial (valid-voxel) means
            return self._sigmoid_focal(logits, target, coef=1.0, reduction="sum", **focal)
        if ignore_index is None:
            return self._sigmoid_focal(logits, target, coef=1.0 / kept, **focal)
        # MONAI's "mean" divides by the valid voxels of the whole batch (channels not counted), the
        # family averages per image: weigh each image's voxel mean by its valid-voxel count.
        per_image = self._sigmoid_focal(logits, target, coef=1.0, reduction="none", **focal)
        valid = (target != ignore_index).reshape(batch_size, -1).sum(1).to(per_image.dtype)
        return (per_image * valid).sum() / valid.sum().clamp_min(1.0)

    def _class_factor(self, num_classes: int) -> list[float]:
        """Per-class ``alpha_c * weight_c`` (a scalar ``alpha``: ``1 - alpha`` for the background)."""
        factor = [1.0] * num_classes
        if self._alpha_values is not None:
            values, scalar = self._alpha_values
            if scalar:
                factor = [1.0 - values[0]] + [values[0]] * (num_classes - 1)
            else:
                factor = list(per_class_values("alpha", self._alpha_values, num_classes))
        if self._weight_values is not None:
            weight = per_class_values("weight", self._weight_values, num_classes)
            factor = [a * w for a, w in zip(factor, weight, strict=True)]
        return factor

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        kw = self._monai_kwargs
        sigmoid = not kw["use_softmax"]
        target_map, is_label_map, reason = self._prepare(
            input, target, kw["to_onehot_y"], kw["ignore_index"], sigmoid=sigmoid
        )
        if reason is None and kw["reduction"] == "none":
            reason = 'reduction="none" (per-element values)'
        if sigmoid:
            if reason is None and not is_label_map:
                reason = _soft_focal_reason(target_map, kw["gamma"], self._alpha_values)
            if reason is not None:
                return self._delegate(reason, input, target)
            return self._sigmoid_focal_loss(input, target_map)
        if reason is None and not kw["include_background"]:
            reason = "include_background=False (MONAI's softmax then runs over the foreground channels only)"
        if reason is not None:
            return self._delegate(reason, input, target)
        batch_size, num_classes = input.shape[:2]
        factor = self._class_factor(num_classes)
        ignore_index = kw["ignore_index"]
        if ignore_index is not None and kw["reduction"] == "mean":
            # MONAI divides by the valid voxels of the whole batch, not per image: the row family's mean.
            return functional.focal_loss(
                input, target_map, gamma=kw["gamma"], alpha=factor, ignore_index=ignore_index, backend=self.backend
            )
        coef = 1.0 / num_classes if kw["reduction"] == "mean" else float(batch_size)
        return region_mean(
            input,
            target_map,
            focal_weight=factor,
            focal_gamma=[kw["gamma"]] * num_classes,
            exponent=[1.0] * num_classes,
            delta=0.5,
            focal_coef=coef,
            tversky_coef=0.0,
            smooth_nr=0.0,
            smooth_dr=0.0,
            batch=False,
            ignore_index=ignore_index,
            backend=self.backend,
        )
